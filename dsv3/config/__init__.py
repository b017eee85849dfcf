"""Configuration: the dataclass schema, its Hydra registration, and `validate`, which runs every package's
config rules (the registry: `rules.py`)."""
from dsv3.config.schema import (CheckpointConfig, Config, DataConfig, KernelsConfig, ModelConfig, OptimConfig,
                                ParallelConfig, PrecisionConfig, TrainConfig)
from dsv3.config.validate import ConfigError, validate

__all__ = ["CheckpointConfig", "Config", "ConfigError", "DataConfig", "KernelsConfig", "ModelConfig", "OptimConfig",
           "ParallelConfig", "PrecisionConfig", "TrainConfig", "validate"]
