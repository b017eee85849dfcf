"""Optional Weights & Biases logging (`logging.wandb=true`): the numeric metrics of every logged record,
the resolved config, and the run directory's name. `wandb` is not a dependency of dsv3: validation
refuses `logging.wandb=true` without it (`pip install wandb`). `logging.wandb_mode=offline` writes the
run under <run_dir>/wandb with no network (upload later with `wandb sync`)."""
import hashlib
import importlib.util
import os
import re

from dsv3.config.schema import LoggingConfig


def wandb_available() -> bool:
    return importlib.util.find_spec("wandb") is not None


class WandbSink:
    def __init__(self, cfg: LoggingConfig, run_dir: str, run_name: str, config: dict):
        import wandb  # validated to be importable (dsv3/train/config_rules.py)

        os.makedirs(run_dir, exist_ok=True)
        # resume="allow" with a fixed id: a resumed training run continues the same W&B run
        digest = hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:8]
        run_id = cfg.wandb_id or re.sub(r"[^A-Za-z0-9_-]", "-", f"{run_name}-{digest}")  # W&B's id alphabet
        self.run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, name=cfg.wandb_name or run_name,
                              id=run_id, resume="allow", dir=run_dir, mode=cfg.wandb_mode, config=config)

    def log(self, step: int, metrics: dict) -> None:
        self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        self.run.finish()
