"""GRPO on the DeepSeek-V3 model (DeepSeekMath §4; R1 report §2.2): sample G completions per prompt from
the current policy, score them with rule rewards, and take `rl.mu` optimizer steps on the clipped-ratio
objective with group-normalized advantages (dsv3/rl/grpo_loss.py).

The pretraining trainer runs it: the same model building, parallel plan (data parallel: every rank
samples a share of the prompts, all ranks see every group, rank r trains on samples r, r + dp, ...),
AdamW, schedules, atomic checkpoints, exact resume and metrics. A step's gradient does not depend on the
plan: the token weights of the loss come from the whole batch, each rank's sum is scaled by dp (the plan
averages gradients over the replicas), and every rank pads its rows to the batch's width.

MoE in RL, where the frameworks are silent:
- `rl.expert_bias`: `freeze` keeps the aux-loss-free routing bias as the start model left it; `update`
  keeps balancing it on the RL batches' expert loads, after every optimizer step, as in pretraining.
- The sampler-vs-trainer log-probability difference is logged (`logprob_diff/*`): the cached decoder
  and the full forward compute the same function in another order, and a routing flip between them
  shows there.
- `rl.router_replay`: the sampler records every position's experts in every MoE layer, and the training
  forwards route with them (StepAux.forced_experts): the gating weights stay the current router's scores
  of those experts, so the router still learns (the contract of Megatron's routing replay and of
  "Rollout Routing Replay", R3). `routing_drift/*` is the share of tokens whose replayed experts the
  trainer's router would not choose now: what replay keeps out of `logprob_diff/*`.
- `rl.mtp`: `off` leaves the MTP modules untouched; `train` trains them on the sampled completions
  (their CE on the completion tokens, weight train.mtp_loss_weight), so MTP drafts keep up with the policy.
"""
import dataclasses
import logging
import os
import time
from collections import defaultdict

import torch
import torch.distributed as dist

from dsv3.config.schema import Config
from dsv3.data.tokenizer import eos_id
from dsv3.generate import Generator, SamplingParams, routing_layers
from dsv3.model.step_aux import StepAux, add_loads
from dsv3.model.transformer import IGNORE
from dsv3.parallel.mesh import Env, all_reduce_sum
from dsv3.rl.evaluate import evaluate
from dsv3.rl.grpo_loss import clipped_objective, group_advantages, token_logprobs, token_weights
from dsv3.rl.rewards import WeightedReward
from dsv3.rl.rollout import PromptStream, Sampler
from dsv3.rl.tasks import mixture
from dsv3.train import schedules
from dsv3.train.balance import update_router_biases
from dsv3.train.nonfinite import agree_on_step
from dsv3.train.trainer import Trainer, build_model
from dsv3.train.weights import load_initial_weights

log = logging.getLogger("dsv3")


class GRPOTrainer(Trainer):
    def __init__(self, cfg: Config, run_dir: str, env: Env, tokenizer):
        self.tokenizer = tokenizer
        super().__init__(cfg, run_dir, env)
        r = cfg.rl
        self.eos = eos_id(tokenizer)
        self.reference = self._reference() if r.beta > 0 else None
        params = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                top_k=r.top_k, num_samples=r.num_generations, record_routing=r.router_replay)
        self.sampler = Sampler(Generator(self.model, tokenizer), self.train_data, WeightedReward(cfg.rewards), params,
                               r.system_prompt, cfg.train.seed)
        if env.is_main:
            log.info("GRPO: %d prompts x G=%d per step, mu=%d, eps=(%g, %g), beta=%g (%s)%s, %s aggregation, "
                     "advantages %s, expert bias %s, router replay %s, MTP %s; held-out evaluation: %d problems",
                     r.prompts_per_step, r.num_generations, r.mu, r.epsilon, r.epsilon_high, r.beta, r.kl_estimator,
                     "" if r.beta > 0 else ": no reference model", r.loss_aggregation,
                     "/ group std" if r.scale_advantages else "- group mean only", r.expert_bias,
                     "on" if r.router_replay else "off", r.mtp,
                     len(self.val_data))

    # -- data: training prompts and held-out problems -----------------------------------------------------
    def make_data(self):
        r, tasks = self.cfg.rl, self.cfg.tasks
        held_out = mixture(tasks.families, r.eval_difficulties or tasks.difficulties, "held_out", r.eval_problems,
                           tasks.seed, tasks.held_out_fraction)
        return PromptStream(tasks, r.prompt_pool, self.cfg.train.seed), held_out

    def tokenizer_file(self) -> str:
        """The extended tokenizer, written next to the checkpoints (where launch/generate.py looks) and
        copied into every checkpoint."""
        path = os.path.join(self.cfg.checkpoint.dir, "tokenizer.json")
        if self.env.is_main and not os.path.isfile(path):
            os.makedirs(self.cfg.checkpoint.dir, exist_ok=True)
            self.tokenizer.save(path)
        return path

    def _reference(self) -> torch.nn.Module:
        """The start model, frozen: loaded from checkpoint.init_from also when the run resumes."""
        ref = build_model(self.cfg, self.env.device)
        load_initial_weights(self.cfg.checkpoint.init_from, ref, self.cfg.model)
        ref.eval().requires_grad_(False)
        return ref

    # -- the step --------------------------------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg, r, st = self.cfg, self.cfg.rl, self.state
        start = time.perf_counter()
        with self.autocast:
            batch, drawn = self.sampler.collect(st.consumed_samples, r.prompts_per_step, r.dynamic_sampling,
                                                r.max_sampling_rounds)
        sampled = time.perf_counter()
        metrics = dict(batch.stats)
        lr = schedules.learning_rate(st.step, cfg.optim)
        if batch.problems:
            metrics.update(self._optimize(batch, lr))
        else:  # dynamic sampling found no group with a signal: nothing to learn from this step
            log.warning("step %d: every sampled group had equal rewards; no update", st.step + 1)
            metrics.update(loss=0.0, grad_norm=0.0, skipped=0, no_signal=1)
        elapsed = time.perf_counter() - start
        st.step += 1
        st.consumed_samples += drawn
        metrics.update(lr=lr, **self.train_data.report(st.consumed_samples - drawn, st.consumed_samples, st.step))
        metrics["training_tokens_per_s"] = metrics.pop("training_tokens", 0) / max(elapsed - (sampled - start), 1e-9)
        metrics["tokens_per_s"] = metrics["sampling_tokens"] / elapsed  # sampled tokens per second of the step
        return metrics

    def _optimize(self, batch, lr: float) -> dict:
        cfg, r, t = self.cfg, self.cfg.rl, self.cfg.train
        G, dev, dp = r.num_generations, self.env.device, self.dp
        data = batch.tensors(self.eos, r.mask_truncated)
        N = len(batch.completions)
        advantages = group_advantages(torch.tensor(batch.rewards), G, r.scale_advantages)
        weights = token_weights(data["mask"], r.loss_aggregation, r.constant_normalizer or r.max_new_tokens)
        mine = list(range(self.dp_rank, N, dp))
        chunks = [mine[i:i + t.micro_batch_size] for i in range(0, len(mine), t.micro_batch_size)]
        lam = schedules.mtp_weight(self.state.step, t) if r.mtp == "train" else 0.0
        ref = [self._reference_logprobs(data, idx) for idx in chunks] if self.reference is not None else None
        old: list[torch.Tensor | None] = [None] * len(chunks)
        s = defaultdict(float)      # sums over this rank's tokens, all-reduced at the end
        peaks = torch.zeros(2)      # max |ratio - 1| on the first inner step, max |sampler - trainer| log-prob
        bias_speed = schedules.bias_update_speed(self.state.step, t) if r.expert_bias == "update" else 0.0
        # the MTP loss: a sum over completion tokens divided by the batch's count, like the policy's token_mean
        step_aux = StepAux(loss_normalizer=float(data["mask"].sum().clamp(min=1)))
        skipped = 0
        for inner in range(r.mu):
            self.model.train()
            loads: dict = {}
            for j, idx in enumerate(chunks):
                # the balance loss, as a mean over the global batch's sequences
                aux = dataclasses.replace(step_aux.fresh(), balance_coeff=t.balance_loss_alpha * dp * len(idx) / N)
                logp, entropy, mtp = self._forward(data, idx, lam, aux)
                add_loads(loads, aux.loads)
                if inner == 0:
                    old[j] = logp.detach()
                mask = data["mask"][idx].to(dev)
                terms = clipped_objective(logp, old[j], advantages[idx].to(dev), r.epsilon, r.epsilon_high,
                                          ref[j] if ref is not None else None, r.beta, r.kl_estimator)
                w = weights[idx].to(dev)
                policy = (terms.loss * w).sum()
                (policy * dp + mtp * dp * lam).backward()
                m = mask.float()
                s["loss"] += policy.item() / r.mu
                s["mtp_loss"] += mtp.item() / r.mu
                s["clip_low"] += float((terms.clipped_low * m).sum())
                s["clip_high"] += float((terms.clipped_high * m).sum())
                s["balance"] += float(aux.balance_sum(dev)) * len(idx) / N / r.mu
                if inner == 0:
                    s["tokens"] += float(m.sum())
                    s["entropy"] += float((entropy * m).sum())
                    if terms.kl is not None:
                        s["kl"] += float((terms.kl * m).sum())
                    comp = data["completion"][idx].to(dev)
                    diff = (logp.detach() - data["sampler_logp"][idx].to(dev)).abs()[comp]
                    s["diff"] += float(diff.sum())
                    s["completion_tokens"] += float(comp.sum())
                    peaks[0] = max(peaks[0], float((terms.ratio - 1).abs()[mask].max()) if mask.any() else 0.0)
                    peaks[1] = max(peaks[1], float(diff.max()) if diff.numel() else 0.0)
                    if aux.routing_drift:
                        # over the real input positions (prompt and completion): drifted in any layer, and
                        # the mean over (position, layer)
                        real = (torch.arange(mask.shape[1], device=dev)[None] < data["length"][idx].to(dev)[:, None])
                        drift = torch.stack([aux.routing_drift[m] for m in routing_layers(self.model)], dim=-1)
                        s["drift_tokens"] += float((drift.any(dim=-1) & real).sum())
                        s["drift_pairs"] += float((drift & real[..., None]).sum()) / drift.shape[-1]
                        s["real_tokens"] += float(real.sum())
                s["training_tokens"] += float(data["length"][idx].sum())
            grad_norm = self.plan.reduce_and_clip(cfg.optim.grad_clip)
            # every rank's gradient norm finite, or no rank applies the step (train.on_nonfinite counts it)
            _, finite = agree_on_step(torch.zeros(1, device=dev), grad_norm)
            if finite:
                self.plan.optimizer_step(lr)
            else:
                self.optimizer.zero_grad(set_to_none=True)
                skipped = 1
            balance = update_router_biases(self.moe_layers, loads, bias_speed if finite else 0.0,
                                           self.plan.sum_router_loads, self.plan.all_layers)
            balance.pop("expert_load", None)  # per-expert counts: pretraining's expert-load log, not a metric
        keys = sorted(s)
        totals = torch.tensor([s[k] for k in keys], dtype=torch.float64, device=dev)
        all_reduce_sum(totals)
        if dist.is_initialized() and dist.get_world_size() > 1:
            peaks = peaks.to(dev)
            dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
        g = dict(zip(keys, totals.tolist()))
        tokens = max(g["tokens"], 1.0)
        out = {"loss": g["loss"], "grad_norm": grad_norm.item(), "entropy": g["entropy"] / tokens,
               "clip_frac/low": g["clip_low"] / (tokens * r.mu), "clip_frac/high": g["clip_high"] / (tokens * r.mu),
               "ratio_first_step_max_dev": peaks[0].item(),
               "logprob_diff/mean_abs": g["diff"] / max(g["completion_tokens"], 1.0),
               "logprob_diff/max_abs": peaks[1].item(),
               "training_tokens": g["training_tokens"], "advantage_abs_mean": advantages.abs().mean().item(),
               "skipped": skipped, **balance}
        if self.reference is not None:
            out["kl"] = g["kl"] / tokens
        if r.mtp == "train":
            out["mtp_loss"] = g["mtp_loss"]
        if t.balance_loss_alpha > 0:
            out["balance_loss"] = g["balance"]
        if r.router_replay:
            out["routing_drift/tokens"] = g["drift_tokens"] / max(g["real_tokens"], 1.0)
            out["routing_drift/layer_tokens"] = g["drift_pairs"] / max(g["real_tokens"], 1.0)
        return out

    def _rows(self, data: dict, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.env.device
        return data["inputs"][idx].to(dev), data["targets"][idx].to(dev)

    def _replay(self, model: torch.nn.Module, data: dict, idx: list[int], aux: StepAux) -> StepAux:
        """With rl.router_replay: `aux` routing the main model's MoE layers of `model` as the sampler did
        for rows `idx` (the MTP modules, never run by the sampler, route themselves)."""
        if self.cfg.rl.router_replay:
            routing = data["routing"][idx].to(self.env.device)
            aux.forced_experts = {m: routing[:, :, i] for i, m in enumerate(routing_layers(model))}
        return aux

    def _forward(self, data: dict, idx: list[int], lam: float, aux: StepAux):
        """The policy's log-probabilities and entropies of the targets of rows `idx`, and its MTP loss on
        their completion tokens (a sum over them divided by aux.loss_normalizer; 0 when MTP is off)."""
        inputs, targets = self._rows(data, idx)
        self._replay(self.model, data, idx, aux)
        with self.autocast:
            h = self.model.hidden(inputs, None, aux)
            logits = self.model.head(self.model.norm(h))
            mtp = torch.zeros((), device=inputs.device)
            if lam > 0:
                labels = targets.masked_fill(~data["mask"][idx].to(inputs.device), IGNORE)
                mtp = torch.stack(self.model.mtp_losses(h, inputs, labels, None, aux)).mean()
        logp, entropy = token_logprobs(logits, targets, self.cfg.rl.temperature)
        return logp, entropy, mtp

    @torch.no_grad()
    def _reference_logprobs(self, data: dict, idx: list[int]) -> torch.Tensor:
        inputs, targets = self._rows(data, idx)
        # Under router replay the reference routes as the sampler did too. The policy's log-probabilities
        # are then those of its weights under the sampler's routing, and the KL term compares the
        # reference on the same footing: it measures how far the weights moved, not routing noise, and is
        # exactly 0 while the policy is still the reference (with the reference's own routing it would
        # count every routing flip of the first step as divergence).
        aux = self._replay(self.reference, data, idx, StepAux())
        with self.autocast:
            logits = self.reference.head(self.reference.norm(self.reference.hidden(inputs, None, aux)))
        return token_logprobs(logits, targets, self.cfg.rl.temperature)[0]

    # -- evaluation: held-out accuracy -------------------------------------------------------------------------
    def validation_metrics(self) -> dict:
        r = self.cfg.rl
        params = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.eval_temperature,
                                num_samples=r.eval_samples, seed=self.cfg.train.seed)
        ks = (1, r.eval_samples) if r.eval_samples > 1 else (1,)
        with self.autocast:
            result = evaluate(self.sampler.generator, self.val_data, params, r.system_prompt, ks)
        return {f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float))}

    def run(self) -> None:
        if self.state.step == 0 and self.cfg.train.val_every:
            self.metrics.log(0, self.validation_metrics())  # the curve starts at the start model
        super().run()
