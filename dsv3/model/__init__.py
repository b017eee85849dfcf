"""The DeepSeek-V3 model as plain nn.Modules; nothing here knows about parallelism."""
from dsv3.model.init import init_weights
from dsv3.model.transformer import Block, LossParts, MTPModule, Transformer

__all__ = ["Block", "LossParts", "MTPModule", "Transformer", "init_weights"]
