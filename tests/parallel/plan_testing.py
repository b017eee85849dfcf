"""What the plan-parity tests of this folder (composed plans, pipelines, ZeRO) share: one argument list
for every run; tests/parallel/conftest.py runs each (steps, processes, overrides) once per session."""
import functools

# 4 layers: pp=4 and dualpipev at pp=2 (4 stages) get a layer per stage; micro-batches of one sample
# give m = 8 per step (dualpipe at pp=4 needs >= 8; at pp=2 x dp=2, m = 4 per dp rank, even and >= 4),
# the same split as the single-process reference. bias_update_speed large enough that the router bias
# updates (counts summed over every rank and stage copy of a layer) move the losses.
PLAN_ARGS = ["+experiment=moe_tiny", "model.n_layers=4", "data.seq_len=32", "train.global_batch_size=8",
             "train.micro_batch_size=1", "train.val_samples=4", "train.bias_update_speed=0.01",
             "checkpoint.every=2", "checkpoint.keep=0"]
# grad_norm: AdamW is nearly invariant to a gradient's scale, so a wrongly scaled gradient barely moves
# the losses; the global gradient norm shows it at once.
PLAN_KEYS = ("loss", "mtp_loss", "balance_loss", "grad_norm", "max_vio")


@functools.lru_cache(maxsize=None)
def _shards() -> str:
    from dsv3.config.schema import DataConfig
    from dsv3.data.embedded import stdlib_shards

    return stdlib_shards(DataConfig(), 512)


def plan_args(steps: int) -> list[str]:
    """The arguments of every run here, on the cached shards of the embedded corpus."""
    return PLAN_ARGS + [f"train.max_steps={steps}", "data=shards", f"data.path={_shards()}"]
