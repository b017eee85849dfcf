"""The one validation step: every package's config rules (`dsv3.config.rules`), run once before any
process does work. Each rule raises `ConfigError(key, value, allowed)`; the launcher prints its one
line and exits 2."""
from dsv3.config.errors import ConfigError
from dsv3.config.rules import World, registered_rules
from dsv3.config.schema import Config

__all__ = ["ConfigError", "validate"]


def validate(cfg: Config, world_size: int = 1, local_world_size: int | None = None) -> None:
    """Check every rule; raise ConfigError naming the first offending key. `world_size`: the number of
    processes the run will have (torchrun's WORLD_SIZE), which the parallel plan must fill;
    `local_world_size`: ranks per node (default: all of them on one node)."""
    world = World(world_size, world_size if local_world_size is None else local_world_size)
    for rule in registered_rules():
        rule(cfg, world)
