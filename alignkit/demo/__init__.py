"""The offline toy world used by `alignkit demo` and the tests."""
