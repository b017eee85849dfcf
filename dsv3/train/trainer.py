"""The pretraining loop: data by global sample index, gradient accumulation, AdamW with the V3 schedules,
aux-loss-free bias updates, periodic validation, metrics and atomic checkpoints.

Per-step losses do not depend on the plan: the global batch of a step is the same set of samples
however it is split over ranks and micro-batches, every micro-batch has the same number of tokens,
and each rank's share is weighted so that the gradients average to the whole batch's mean loss.
The parallel plan (dsv3/parallel/plan.py) runs the step, reduces the gradients and maps checkpoints;
the loop does not know which dimensions it is made of.
"""
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass

import torch
from omegaconf import OmegaConf

from dsv3 import exit_codes
from dsv3.config import precision
from dsv3.config.schema import Config
from dsv3.data.loading import build_data
from dsv3.kernels.ops import resolve_grouped_gemm_impl
from dsv3.model import Transformer, init_weights
from dsv3.model.moe import MoE
from dsv3.model.step_aux import StepAux
from dsv3.parallel.mesh import Env, all_reduce_sum
from dsv3.parallel.plan import build_plan
from dsv3.planner.report import memory_line
from dsv3.train import schedules
from dsv3.train.balance import update_router_biases
from dsv3.train.checkpoint import load_checkpoint, save_checkpoint
from dsv3.train.compile import compile_regions
from dsv3.train.heldout import heldout_figures
from dsv3.train.loss_scale import loss_scaler
from dsv3.train.metrics import MetricsLogger
from dsv3.train.nonfinite import NonFiniteSteps, agree_on_step, model_is_finite
from dsv3.train.perf import Throughput
from dsv3.train.profiling import StepProfiler
from dsv3.train.recompute import apply_activation_checkpointing
from dsv3.train.resume import checkpoint_to_resume
from dsv3.train.routing_stats import ExpertLoadLog, RoutedTokenCounter
from dsv3.train.stop_signals import StopSignals
from dsv3.train.weights import load_initial_weights

log = logging.getLogger("dsv3")


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0


def build_model(cfg: Config, device: torch.device) -> Transformer:
    compute_dtype = precision.compute_dtype(cfg.precision.dtype, device.type)
    impl = resolve_grouped_gemm_impl(cfg.kernels.grouped_gemm, device, compute_dtype)
    model = Transformer(cfg.model, grouped_gemm=impl)
    init_weights(model, seed=cfg.train.seed, std=cfg.model.init_std)
    model = model.to(device)
    if cfg.precision.dtype == "fp8":  # the FP8 recipe is applied from outside the model, like the plan
        from dsv3.fp8 import convert_to_fp8

        fp8_impl = resolve_grouped_gemm_impl(cfg.kernels.grouped_gemm, device, compute_dtype, fp8=True)
        log.info("%s", convert_to_fp8(model, cfg.precision.fp8, fp8_impl, device))
    if cfg.train.activation_checkpointing != "none":
        n = apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
        log.info("activation checkpointing: %s (%d modules recompute in the backward)",
                 cfg.train.activation_checkpointing, n)
    return model


class Trainer:
    def __init__(self, cfg: Config, run_dir: str, env: Env):
        self.cfg, self.run_dir, self.env = cfg, run_dir, env
        t = cfg.train
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        torch.manual_seed(t.seed)
        resume = checkpoint_to_resume(cfg)  # verified, its config compared: before any work

        # global sample index -> sample, over one corpus or a weighted blend (stateless: resumable exactly)
        self.train_data, self.val_data = self.make_data()

        self.model = build_model(cfg, env.device)
        if resume is None and cfg.checkpoint.init_from is not None:
            # Before the plan: the weights are loaded whole, and the plan slices them like initialized ones.
            load_initial_weights(cfg.checkpoint.init_from, self.model, cfg.model)
            log.info("initialized weights from %s", cfg.checkpoint.init_from)
        self.plan = build_plan(self.model, cfg, env)
        self.dp, self.dp_rank = self.plan.dp, self.plan.dp_rank
        self.moe_layers = self.model.moe_layers()
        if t.compile:
            log.info("train.compile: %d regions compiled on first use (dsv3/train/compile.py)",
                     compile_regions(self.model))
        self.optimizer = self.plan.build_optimizer(cfg.optim)
        self.state = TrainState()
        self.nonfinite = NonFiniteSteps(t.on_nonfinite, t.max_consecutive_skips)
        self.autocast = precision.autocast(cfg.precision.dtype, env.device.type)
        self.scaler = loss_scaler(cfg.precision)  # fp16 only
        sinks = []
        if cfg.logging.wandb and env.is_main:
            from dsv3.train.wandb_sink import WandbSink

            sinks.append(WandbSink(cfg.logging, run_dir, cfg.run_name, asdict(cfg)))
        self.metrics = MetricsLogger(run_dir, env.is_main, t.max_steps, sinks=sinks)
        self.expert_loads = ExpertLoadLog(run_dir, env.is_main)
        self.profiler = StepProfiler(t.profile_steps, run_dir, env.rank, env.device)
        self.throughput = Throughput(cfg.model, cfg.data.seq_len, env.world_size, env.device,
                                     precision.compute_dtype(cfg.precision.dtype, env.device.type),
                                     cfg.logging.peak_tflops, cfg.hardware)
        if resume is not None:
            scaler = {"loss_scaler": self.scaler.state_dict()} if self.scaler is not None else {}
            saved = load_checkpoint(resume, self.model, self.optimizer, self.plan, optional_train=scaler)
            self.state = TrainState(step=int(saved["step"]), consumed_samples=int(saved["consumed_samples"]))
            log.info("resumed from %s at step %d", resume, self.state.step)
            if self.scaler is not None and "loss_scaler" in saved:
                self.scaler.load_state_dict(saved["loss_scaler"])
            elif self.scaler is not None:
                log.info("the checkpoint has no fp16 loss scale (saved in another precision): starting at %g",
                         self.scaler.scale)
        if env.is_main:
            n_params = self.plan.n_params
            log.info("model: %.2fM parameters, %d MoE layers (MTP modules included); data: %d train / %d val "
                     "samples of %d tokens; device %s, %s, world size %d: %s", n_params / 1e6,
                     self.plan.n_moe_layers, len(self.train_data), len(self.val_data), cfg.data.seq_len, env.device,
                     cfg.precision.dtype, env.world_size, self.plan.describe())
            log.info("data: %s%s%s", self.train_data.describe(),
                     f"; FIM on {cfg.data.fim_rate:.0%} of training documents" if cfg.data.fim_rate else "",
                     "; attention masked at document boundaries" if cfg.data.document_masks else "")
            log.info("memory: %s", memory_line(cfg, env.world_size, env.device.type))   # launch/plan.py's model

    # -- data (what a fine-tuning trainer replaces) -----------------------------------------------------
    def make_data(self):
        """(train, val): `len()`, `batch(global sample indices)`, `describe()`, `report()`."""
        return build_data(self.cfg.data, self.cfg.model.vocab_size, self.cfg.train.seed)

    def _val_batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        data = self.val_data.batch(indices)
        batch = data.tokens.to(self.env.device)
        docs = None if data.documents is None else data.documents[:, :-1].to(self.env.device)
        return batch[:, :-1], batch[:, 1:], docs

    def tokenizer_file(self) -> str | None:
        """The tokenizer.json the run's token ids mean, carried by every checkpoint (so that an export is
        self-contained). A blend's corpora share one (validated)."""
        path = os.path.join(self.train_data.corpora[0].directory, "tokenizer.json")
        return path if os.path.isfile(path) else None

    def loss_normalizer(self, batch_size: int, n_micro: int) -> float | None:
        """Divisor of each micro-batch's summed CE (None: its mean). Pretraining counts every label, and
        every micro-batch has as many, so the mean per micro-batch is already the global batch's mean."""
        return None

    # -- state -------------------------------------------------------------------------------------------
    def save(self) -> None:
        if not model_is_finite(self.model, self.env.device):  # never let a diverged model replace good ones
            self._stop_diverged("the model has non-finite parameters")
        train_state = asdict(self.state)
        if self.scaler is not None:
            train_state["loss_scaler"] = self.scaler.state_dict()
        path = save_checkpoint(self.cfg.checkpoint.dir, self.state.step, self.model, self.optimizer,
                               train_state, OmegaConf.to_yaml(OmegaConf.structured(self.cfg)),
                               keep=self.cfg.checkpoint.keep, plan=self.plan, tokenizer=self.tokenizer_file())
        log.info("saved %s", path)

    def _stop_diverged(self, why: str) -> None:
        log.error("stopping at step %d: %s; nothing saved, the checkpoints in %s are untouched (lower optim.lr, "
                  "raise optim.warmup_steps or set optim.grad_clip, then resume with "
                  "train.resume_allow_changes=[optim])", self.state.step, why, self.cfg.checkpoint.dir)
        self.close()
        raise SystemExit(exit_codes.DIVERGED)

    # -- steps -------------------------------------------------------------------------------------------
    def _batch(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Inputs, labels and (with data.document_masks) the inputs' document numbers."""
        batch = self.train_data.batch(range(first, first + count))
        tokens = batch.tokens.to(self.env.device)
        docs = None if batch.documents is None else batch.documents[:, :-1].to(self.env.device)
        return tokens[:, :-1], tokens[:, 1:], docs

    def train_step(self) -> dict:
        cfg, t, st = self.cfg, self.cfg.train, self.state
        unit = t.micro_batch_size * self.dp
        batch_size = schedules.global_batch_size(st.consumed_samples, t, unit)
        n_micro = batch_size // unit
        lam = schedules.mtp_weight(st.step, t)
        # alpha, scaled like the micro-batch's share of the loss; each forward of the step gets a fresh copy
        scale = self.scaler.scale if self.scaler is not None else 1.0
        aux = StepAux(balance_coeff=t.balance_loss_alpha / n_micro,
                      loss_normalizer=self.loss_normalizer(batch_size, n_micro), grad_scale=scale)
        first = st.consumed_samples + self.dp_rank * (batch_size // self.dp)

        def micro_batch(j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
            return self._batch(first + j * t.micro_batch_size, t.micro_batch_size)

        # main CE, MTP CE, balance loss of what this rank computed; the expert counts of its MoE layers
        sums, loads = self.plan.train_step(micro_batch, n_micro, lam, aux, self.autocast)
        grad_norm = self.plan.reduce_and_clip(cfg.optim.grad_clip, grad_scale=scale)
        # the global batch's means, and whether every rank's losses and gradient norm are finite
        sums, finite = agree_on_step(sums, grad_norm, self.plan.global_loss_parts)
        overflow = False
        if self.scaler is not None:  # an fp16 overflow is skipped and backs the scale off
            overflow = self.scaler.record(finite, losses_finite=bool(torch.isfinite(sums).all()))
        lr = schedules.learning_rate(st.step, cfg.optim)
        if finite:
            self.plan.optimizer_step(lr)
        else:  # not applied (train.on_nonfinite)
            self.optimizer.zero_grad(set_to_none=True)
        balance = update_router_biases(self.moe_layers, loads, schedules.bias_update_speed(st.step, t) if finite
                                       else 0.0, self.plan.sum_router_loads, self.plan.all_layers)
        no_moe = torch.zeros(0, cfg.model.n_routed_experts, device=self.env.device)  # a stage without MoE layers
        self.expert_loads.add(balance.pop("expert_load", no_moe))
        st.step += 1
        st.consumed_samples += batch_size
        data = self.train_data.report(st.consumed_samples - batch_size, st.consumed_samples, st.step)
        return {"loss": sums[0].item(), "mtp_loss": sums[1].item(), "balance_loss": sums[2].item(), "lr": lr,
                "grad_norm": grad_norm.item(), "global_batch": batch_size, "mtp_weight": lam,
                "skipped": int(not finite), **self._scaler_metrics(scale, overflow), **balance, **data, **self.plan.step_metrics()}

    def _scaler_metrics(self, scale: float, overflow: bool) -> dict:
        if self.scaler is None:
            return {}
        return {"loss_scale": scale, "overflow": int(overflow), "overflows": self.scaler.skipped_steps}

    def validation_metrics(self) -> dict:
        """What a periodic validation logs (a fine-tuning trainer may measure something else)."""
        return self.evaluate()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Figures on a fixed slice of the held-out split (the same samples for every plan): the mean
        next-token loss; where one process holds the whole model also accuracy and the MTP module's
        (dsv3/train/heldout.py); and the load balance over the whole slice (MaxVio_global)."""
        t = self.cfg.train
        n = min(len(self.val_data), t.val_samples)
        mine = list(range(self.dp_rank, n, self.dp))
        chunks = [mine[i:i + t.micro_batch_size] for i in range(0, len(mine), t.micro_batch_size)]
        # A forward may exchange tokens with other ranks (expert parallelism): all run as many as the busiest.
        busiest = -(-n // self.dp)
        chunks += [[]] * (-(-busiest // t.micro_batch_size) - len(chunks))
        # evaluation forwards get no StepAux: per-chunk sums over the labels that count (dsv3/train/heldout.py)
        names = self.plan.eval_names
        total = torch.zeros(len(names), device=self.env.device)
        main_model = [not name.startswith("mtp.") for name, m in self.model.named_modules() if isinstance(m, MoE)]
        counter = RoutedTokenCounter(self.moe_layers, self.cfg.model.n_routed_experts, self.env.device, main_model)
        with counter:
            for chunk in chunks:
                counter.counting = bool(chunk)
                tokens, labels, docs = self._val_batch(chunk or [0])  # [0]: a filler, not counted
                sums = self.plan.eval_sums(tokens, labels, docs, self.autocast)  # None off the last stage
                if chunk and sums is not None:
                    total += torch.stack([sums[name].float() for name in names])
        all_reduce_sum(total)
        return {**heldout_figures(dict(zip(names, total))),
                **counter.max_vio(self.plan.sum_router_loads, self.plan.all_layers)}

    def run(self) -> None:
        t, c = self.cfg.train, self.cfg.checkpoint
        if self.state.step >= t.max_steps:
            log.info("nothing to do: step %d >= train.max_steps=%d", self.state.step, t.max_steps)
        with StopSignals(c.on_signal) as stop:
            while self.state.step < t.max_steps:
                with self.profiler.step(self.state.step + 1):  # writing a trace is not part of the step's time
                    start = time.time()
                    metrics = self.train_step()
                    elapsed = time.time() - start
                if "tokens_per_s" not in metrics:
                    metrics["tokens_per_s"] = metrics["global_batch"] * self.cfg.data.seq_len / elapsed
                metrics["step_time_s"] = elapsed
                metrics.update(self.throughput.figures(metrics["tokens_per_s"]))
                step = self.state.step
                last = step == t.max_steps
                # an fp16 overflow is the loss scale's to fix, not divergence
                self.nonfinite.record(not metrics["skipped"] or bool(metrics.get("overflow")))
                if metrics.get("overflow"):
                    log.info("step %d: fp16 gradients overflowed at loss scale %g: not applied, the scale is now %g",
                             step, metrics["loss_scale"], self.scaler.scale)
                elif metrics["skipped"]:
                    log.warning("step %d: non-finite loss %.4g or gradient norm %.4g on some rank: not applied "
                                "(%s)", step, metrics["loss"], metrics["grad_norm"], "train.on_nonfinite=stop"
                                if t.on_nonfinite == "stop" else f"{self.nonfinite.consecutive} in a row, at most "
                                f"train.max_consecutive_skips={t.max_consecutive_skips}")
                    if self.nonfinite.must_stop:
                        self.metrics.log(step, metrics)
                        self._stop_diverged(f"{self.nonfinite.consecutive} non-finite step(s) in a row")
                validated = bool(t.val_every and step % t.val_every == 0) or last
                if validated:
                    metrics.update(self.validation_metrics())
                if step % t.log_every == 0 or last or validated or metrics["skipped"]:
                    self.metrics.log(step, metrics)
                    self.expert_loads.write(step, self.cfg.model.n_routed_experts, self.plan.all_layers)
                # not in a run of skipped steps: a checkpoint of the same weights would prune a good one
                saved = (c.every and step % c.every == 0 and not self.nonfinite.consecutive) or last
                if saved:
                    self.save()
                signum = stop.agreed(self.env.device)
                if signum and not last:
                    if not saved:
                        self.save()
                    log.warning("stopping after step %d on %s; resume with train.resume=auto", step,
                                signal.Signals(signum).name)
                    self.close()
                    raise SystemExit(exit_codes.signalled(signum))
        self.close()

    def close(self) -> None:
        self.profiler.close()
        self.metrics.close()
        self.expert_loads.close()


def train(cfg: Config, run_dir: str, env: Env) -> None:
    os.makedirs(run_dir, exist_ok=True)
    Trainer(cfg, run_dir, env).run()
