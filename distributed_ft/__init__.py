"""distributed_ft: fine-tune pretrained transformers from one process to a multi-node GPU cluster."""

__version__ = "0.1.0"
