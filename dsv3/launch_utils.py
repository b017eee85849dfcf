"""What every entry point does first: logging on the main rank, config validation with exit code 2."""
import logging
import os
import sys

from dsv3.config import ConfigError, validate
from dsv3.config.schema import Config


def setup_logging(run_dir: str | None = None) -> None:
    """INFO on the main rank (stdout and <run_dir>/train.log), warnings only elsewhere."""
    rank = int(os.environ.get("RANK", "0"))
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if run_dir is not None and rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(run_dir, "train.log")))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, handlers=handlers, force=True,
                        format="%(asctime)s %(message)s" if rank == 0 else f"[rank {rank}] %(message)s",
                        datefmt="%H:%M:%S")


def validate_or_exit(cfg: Config) -> None:
    """One line naming the key, the value and what is allowed, then exit 2 — before any work."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        validate(cfg, world_size=world, local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
