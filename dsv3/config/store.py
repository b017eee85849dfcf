"""Registers the dataclass schema with Hydra and turns a composed DictConfig into typed objects."""
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from dsv3.config.schema import Config


def register() -> None:
    """Make `base_config` (the schema) available to `configs/config.yaml`'s defaults list."""
    ConfigStore.instance().store(name="base_config", node=Config)


def to_config(cfg: DictConfig) -> Config:
    """Resolve interpolations and return the typed `Config` object."""
    return OmegaConf.to_object(cfg)
