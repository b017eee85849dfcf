"""Every experiment preset that names its hardware validates for that machine's GPUs, and the planner
says it fits (with the preset's activation checkpointing); the presets meant to show a limit (V3's
context extension at 32K and 128K on 2,048 GPUs, 128K context on 64 GPUs: recomputation is not enough
without context parallelism) say that they do not, and why."""
import dataclasses
import os

import pytest
from hydra import compose, initialize_config_dir

from dsv3.config.store import register, to_config
from dsv3.config.validate import validate
from dsv3.planner.report import make_report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FITS = {"rtx_card": True, "h100_card": True, "node_16b": True, "cluster_16b": True, "cluster_16b_ext32k": True,
        "cluster_16b_ext128k": False, "v3_671b": True, "v3_671b_ext32k": False, "v3_671b_ext128k": False}


def preset(name: str):
    register()
    with initialize_config_dir(config_dir=f"{ROOT}/configs", version_base="1.3"):
        return to_config(compose("config", overrides=[f"+experiment={name}", "checkpoint.dir=x"]))


def test_every_preset_with_hardware_is_planned_here():
    names = sorted(f[:-5] for f in os.listdir(f"{ROOT}/configs/experiment") if f.endswith(".yaml"))
    assert sorted(n for n in names if preset(n).hardware.name) == sorted(FITS)


@pytest.mark.parametrize("name", sorted(FITS))
def test_preset_validates_and_the_planner_says_whether_it_fits(name):
    cfg = preset(name)
    hw = cfg.hardware
    world = hw.nodes * hw.gpus_per_node
    # as launch/plan.py does: no corpus, no previous phase's weights are read
    unread = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source="stdlib", path=None),
                                 checkpoint=dataclasses.replace(cfg.checkpoint, init_from=None))
    validate(unread, world_size=world, local_world_size=hw.gpus_per_node)
    report = make_report(cfg, world, "cuda", search_micro_batch=False)
    assert report.fits is FITS[name], report.verdict
    if report.fits is False:
        assert report.verdict.startswith("does not fit") and "activations" in report.verdict
        assert report.least_recompute_that_fits is None   # no recomputation mode would make it fit either
    assert report.timing is not None and report.timing.step_s > 0
