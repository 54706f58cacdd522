"""Data: loading, schema detection and validation, chat tokenisation, collation."""
