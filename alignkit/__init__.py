"""alignkit: post-train small language models to follow instructions, and measure the result."""

__version__ = "0.1.0"
