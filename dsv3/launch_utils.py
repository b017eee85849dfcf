"""What every entry point does first: logging on the main rank, config validation with exit code 2."""
import logging
import os
import sys
import time
from typing import Callable, TypeVar

from dsv3 import exit_codes
from dsv3.config import ConfigError, validate
from dsv3.config.schema import Config

T = TypeVar("T")

# How long a rank other than 0 waits before reporting a config error itself. Every rank validates the
# same config, so rank 0 usually fails alike and torchrun ends the others within this delay (it polls
# its workers every 0.1 s): the line appears once. A rank that outlives it found an error rank 0 did
# not (a file only its node lacks) and says so with its rank.
_PEER_REPORT_DELAY_S = 3.0


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


def exit_on_config_error(e: Exception) -> None:
    """Print the one line of a config error (the key, the value and what is allowed) or of a checkpoint
    that cannot be used, once per job, and exit 2."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(f"error: {e}", file=sys.stderr, flush=True)
    else:
        time.sleep(_PEER_REPORT_DELAY_S)
        print(f"[rank {rank}] error: {e}", file=sys.stderr, flush=True)
    sys.exit(exit_codes.BAD_INPUT)


def validate_or_exit(cfg: Config) -> None:
    """Validate before any work; a config error ends the process with exit code 2."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        validate(cfg, world_size=world, local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    except ConfigError as e:
        exit_on_config_error(e)


def start_from_checkpoint(cfg: Config, prepare: Callable[[Config], T]) -> tuple[T, str]:
    """What a post-training entry point does first: `prepare(cfg)` completes the config from the
    checkpoint it names (a config error there exits 2, as validation's does), then validation and
    logging into Hydra's run directory. Returns what `prepare` returned and the run directory."""
    try:
        prepared = prepare(cfg)
    except ConfigError as e:
        exit_on_config_error(e)
    validate_or_exit(cfg)
    from hydra.core.hydra_config import HydraConfig

    run_dir = HydraConfig.get().runtime.output_dir
    setup_logging(run_dir)
    return prepared, run_dir
