"""Pretrain a DeepSeek-V3-architecture model.

    torchrun --nproc_per_node=1 launch/pretrain.py +experiment=moe_small

Under torchrun every rank composes the same config; the run directory defaults to runs/<run_name>
(never a timestamp), so all ranks agree on it. Override with hydra.run.dir=... on every rank alike.
Exit codes: dsv3/exit_codes.py (2: bad config or checkpoint, 3: diverged, 128 + signal: stopped).
"""
import logging
import os
import signal
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsv3 import exit_codes  # noqa: E402
from dsv3.config import ConfigError  # noqa: E402
from dsv3.config.store import register, to_config  # noqa: E402
from dsv3.launch_utils import exit_on_config_error, setup_logging, validate_or_exit  # noqa: E402

register()


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    cfg = to_config(dcfg)
    if cfg.checkpoint.init_from is not None:
        # a run's checkpoint directory means its latest step: how a phase starts from the previous one's end
        # (context extension after pretraining); what is not a checkpoint at all, the rule names
        from dsv3.train.weights import checkpoint_step

        try:
            cfg.checkpoint.init_from = checkpoint_step(cfg.checkpoint.init_from)
        except FileNotFoundError:
            pass
    validate_or_exit(cfg)
    run_dir = HydraConfig.get().runtime.output_dir
    setup_logging(run_dir)

    from dsv3.parallel.mesh import process_env
    from dsv3.train.checkpoint import CheckpointError
    from dsv3.train.trainer import train

    with process_env(cfg.train.device) as env:
        try:
            train(cfg, run_dir, env)
        except (ConfigError, CheckpointError) as e:  # what only the run's files can tell, before any step
            exit_on_config_error(e)
        except KeyboardInterrupt:  # a second Ctrl-C, or Ctrl-C with checkpoint.on_signal=false
            logging.getLogger("dsv3").warning("interrupted: the step in progress is abandoned, nothing saved")
            sys.exit(exit_codes.signalled(signal.SIGINT))


if __name__ == "__main__":
    main()
