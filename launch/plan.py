"""Plan a run before starting it: memory per rank and whether it fits, FLOPs, bytes on the wire, time.

    python launch/plan.py +experiment=rtx_card                       # the preset's own hardware
    python launch/plan.py +experiment=moe_small +hardware=h100_80gb  # an experiment without one
    python launch/plan.py +experiment=v3_671b parallel.pp_schedule=1f1b train.micro_batch_size=2
    python launch/plan.py --json +experiment=v3_671b                 # the same numbers for a script

The world is the hardware's GPUs (nodes x gpus_per_node); without hardware, --world-size N (default:
the smallest world the plan needs). The config is validated for that world first (exit 2 naming the key).
"""
import dataclasses
import json
import os
import sys

from hydra import compose, initialize_config_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dsv3.config import ConfigError, validate  # noqa: E402
from dsv3.config.store import register, to_config  # noqa: E402


def parse_args(argv: list[str]) -> tuple[bool, int | None, list[str]]:
    """--json and --world-size N are ours; the rest are Hydra overrides."""
    as_json, world, overrides, args = False, None, [], iter(argv)
    for a in args:
        if a == "--json":
            as_json = True
        elif a == "--world-size" or a.startswith("--world-size="):
            value = a.split("=", 1)[1] if "=" in a else next(args, "")
            if not value.isdigit() or int(value) < 1:
                print(f"error: --world-size={value!r}: must be an integer >= 1", file=sys.stderr)
                sys.exit(2)
            world = int(value)
        else:
            overrides.append(a)
    return as_json, world, overrides


def main(argv: list[str]) -> None:
    as_json, world_flag, overrides = parse_args(argv)
    register()
    # compose, not @hydra.main: planning writes no run directory
    with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base="1.3"):
        cfg = to_config(compose("config", overrides=["checkpoint.dir=unused", *overrides]))
    hw, p = cfg.hardware, cfg.parallel
    if hw.name:
        world, per_node = hw.nodes * hw.gpus_per_node, hw.gpus_per_node
        if world_flag is not None and world_flag != world:
            print(f"error: --world-size={world_flag}: the hardware {hw.name} has {world} GPUs", file=sys.stderr)
            sys.exit(2)
    else:
        world = world_flag or p.pp * (p.dp if p.dp > 0 else p.ep)
        per_node = world
    # Planning reads no files: the rules that do (data.path, blends, FIM sentinels, the weights a phase
    # starts from) are left out.
    unread = dataclasses.replace(cfg.data, source="stdlib", path=None, blend=[], fim_rate=0.0, tokenizer=None)
    no_weights = dataclasses.replace(cfg.checkpoint, init_from=None)
    try:
        validate(dataclasses.replace(cfg, data=unread, checkpoint=no_weights), world_size=world,
                 local_world_size=per_node)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    from dsv3.planner.report import make_report

    report = make_report(cfg, world, "cuda" if hw.name and hw.compute_capability else "cpu")
    print(json.dumps(report.to_json(), indent=1) if as_json else report.table())


if __name__ == "__main__":
    main(sys.argv[1:])
