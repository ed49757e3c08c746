"""alignkit: preference alignment over QLoRA adapters, from labels to compared models."""

__version__ = "0.1.0"
