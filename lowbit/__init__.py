"""lowbit: a post-training quantization compiler."""

__version__ = "0.1.0"
