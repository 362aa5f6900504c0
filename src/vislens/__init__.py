"""vislens: look inside vision-language models."""

__version__ = "0.1.0"
