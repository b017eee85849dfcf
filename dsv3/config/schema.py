"""The typed configuration tree. Every knob is a field here, with its type, default and meaning.

Hydra composes `configs/` on top of these dataclasses (registered in `store.py`), so a misspelt key
or a wrongly typed value fails at composition; cross-field rules live in each package's `config_rules.py`
(registered in `rules.py`).
Model field names follow DeepSeek's inference `ModelArgs` wherever a name exists there.
"""
from dataclasses import dataclass, field
from typing import Any, Optional

from dsv3.config.post_training import GRPOConfig, RejectionConfig, RewardTerm, SFTConfig, TaskConfig


@dataclass
class ModelConfig:
    """DeepSeek-V3 architecture (MLA + DeepSeekMoE + MTP)."""

    vocab_size: int = 512
    """Vocabulary size of the embedding and output head (must match the tokenizer)."""
    dim: int = 64
    """Hidden size d."""
    inter_dim: int = 128
    """Intermediate size of the dense SwiGLU FFNs of the first `n_dense_layers` layers."""
    moe_inter_dim: int = 32
    """Intermediate size of one routed (and one shared) expert."""
    n_layers: int = 2
    """Number of transformer layers of the main model (MTP modules come on top)."""
    n_dense_layers: int = 1
    """The first `n_dense_layers` layers use a dense FFN instead of MoE (V3: 3)."""
    n_heads: int = 4
    """Attention heads."""
    n_routed_experts: int = 8
    """Routed experts per MoE layer (V3: 256)."""
    n_shared_experts: int = 1
    """Shared experts per MoE layer, applied to every token (V3: 1)."""
    n_activated_experts: int = 2
    """Routed experts per token, K_r (V3: 8)."""
    n_expert_groups: int = 1
    """Experts are split into this many equal groups for group-limited routing (V3: 8, one per node)."""
    n_limited_groups: int = 1
    """A token may only use experts of its `n_limited_groups` best groups (V3: 4)."""
    score_func: str = "sigmoid"
    """Router affinity: `sigmoid` (V3) or `softmax` (V2)."""
    route_scale: float = 1.0
    """Routing weights are multiplied by this after normalization (V3: 2.5)."""
    q_lora_rank: int = 0
    """Rank of the query compression; 0 = no compression (a full `wq`)."""
    kv_lora_rank: int = 32
    """Rank of the joint key/value compression (V3: 512)."""
    qk_nope_head_dim: int = 16
    """Per-head query/key dimensions without positional encoding (V3: 128)."""
    qk_rope_head_dim: int = 8
    """Per-head dimensions of the decoupled RoPE query/key (V3: 64); even."""
    v_head_dim: int = 16
    """Per-head value dimension (V3: 128)."""
    max_seq_len: int = 256
    """Longest sequence the RoPE tables are built for. YaRN applies when this exceeds `original_seq_len`."""
    original_seq_len: int = 4096
    """Context length the RoPE frequencies were (pre)trained for; YaRN extends beyond it."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_factor: float = 40.0
    """YaRN scaling factor s; YaRN supports up to `original_seq_len * rope_factor` positions."""
    beta_fast: int = 32
    """YaRN: rotations above which a frequency is left unscaled."""
    beta_slow: int = 1
    """YaRN: rotations below which a frequency is fully interpolated."""
    mscale: float = 1.0
    """YaRN attention-temperature coefficient: softmax scale *= (0.1 * mscale * ln s + 1)^2."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    mtp_depth: int = 1
    """Number D of multi-token-prediction modules (V3: 1); 0 disables MTP."""
    init_std: float = 0.006
    """Standard deviation of the normal initialization of every weight matrix (V3 report: 0.006)."""


@dataclass
class ParallelConfig:
    """How the run is spread over processes. The product of the plan's sizes must equal the world size."""

    dp: int = -1
    """Data-parallel degree; -1 = whatever the world size leaves after the other dimensions."""
    ep: int = 1
    """Expert-parallel degree (inside the data-parallel ranks, as in V3): each MoE layer's routed experts
    are split into `ep` contiguous slices over `ep` consecutive ranks; must divide the dp size and
    `model.n_routed_experts`. With expert groups, groups must align with rank boundaries."""
    expert_align: int = 1
    """With ep > 1: each local expert's received rows are padded to a multiple of this for the grouped
    GEMM (DeepGEMM's contiguous layout: 128); 1 = no padding (CPU)."""
    ep_transport: str = "auto"
    """With ep > 1, how tokens move between the ranks of an EP group: `direct` (DeepEP-style: kernels
    write each row straight into the receiving rank's memory, POSIX shared memory between CPU processes
    or CUDA IPC between GPUs, with a flag per rank pair; every EP group must lie inside one node),
    `all_to_all` (the library collective, NCCL or gloo; works across nodes), or `auto`: on CPU, direct
    when the ranks per node (torchrun's LOCAL_WORLD_SIZE) are a multiple of ep, else all_to_all; on GPUs
    all_to_all until the direct transport has been measured on one. Losses and gradients are
    bit-identical either way (docs/kernels.md)."""
    pp: int = 1
    """Pipeline-parallel degree (number of pipeline ranks); the world is pp x dp ranks, rank = pp_rank * dp +
    dp_rank. The model's layers are cut into stages (2*pp for dualpipev) of contiguous layers; the first
    stage also embeds, the last one runs the final norm, the head and MTP. With ep > 1 the EP groups are
    made of the dp ranks of each stage (ep must divide dp), as in V3's PP16 x EP64."""
    pp_schedule: str = "1f1b"
    """Pipeline schedule: 1f1b | zb1p | dualpipe | dualpipev | seq1f1b (see docs/pipeline.md)."""
    seq_chunks: int = 1
    """With pp_schedule=seq1f1b: each sequence is cut into this many equal segments that flow through the
    pipeline as micro-batches (Seq1F1B, arXiv 2406.03488): a segment attends to the keys/values of its
    sequence's earlier segments, backward runs them in reverse order. Must divide data.seq_len; 1 elsewhere."""
    microbatches: int = -1
    """Micro-batches per optimizer step and data-parallel rank: train.global_batch_size / (train.micro_batch_size
    * dp). -1 derives it; a value given must equal it. With pp > 1 it is what the schedule is built for
    (dualpipe: even and >= 2*pp; dualpipev: >= 2*pp), so the batch ramp is not available there."""
    overlap: Optional[bool] = None
    """Hide the expert all-to-alls of F&B pairs behind the other micro-batch's computation (DeepSeek-V3
    §3.2.1; dsv3/parallel/overlap.py): DualPipe's and DualPipeV's pairs, or without a pipeline the
    forward of micro-batch j+1 paired with the backward of j (one more micro-batch's activations
    alive). Losses are bit-identical either way. null = on wherever there is something to overlap
    (ep > 1, and pp = 1 or pp_schedule dualpipe|dualpipev); true elsewhere is refused."""
    zero: int = 0
    """ZeRO stage of the data parallelism (DeepSpeed's ZeRO optimizer, dsv3/parallel/zero.py): 0 = every dp
    rank holds the whole optimizer state; 1 = the fp32 master weights and AdamW moments are split over
    the dp ranks of each pipeline stage (expert slices: over their expert-data-parallel group), as
    DeepSeek-V3 trains; 2 = the gradients too (reduce-scattered after every backward; not with pp > 1).
    Per rank, optimizer state bytes fall from 12 to 4 + 8/N per parameter (fp32 weights + moments)."""
    offload_optimizer: bool = False
    """Keep the ZeRO partitions (fp32 master weights, AdamW moments) in host memory and run the update
    there with DeepSpeed's CPU Adam (ZeRO-Offload): what lets a 24 GB card train a larger model. With
    parallel.zero=0 it runs on ZeRO-1 (which, on one dp rank, shards nothing). Needs fp32 moments."""


@dataclass
class Fp8Config:
    """DeepSeek-V3's fine-grained FP8 recipe (report §3.3), used when `precision.dtype=fp8` (`dsv3/fp8/`).

    Every GEMM of the MLA projections, the dense FFNs, the shared and the routed experts runs in E4M3
    (Fprop, Dgrad, Wgrad): activations and their gradients scaled per 1x128 tile along the GEMM's K,
    weights per 128x128 block, fp32 accumulation promoted every 128 of K. The embedding, the output
    head, the MoE gates, the norms and the attention core (SDPA) always stay in high precision.
    """

    pow2_scales: list[str] = field(default_factory=lambda: ["attn_out", "expert_in", "expert_out_grad"])
    """Tensors whose scales are rounded up to a power of two, so that rescaling them is exact (the
    report does so where cached 1x128 tiles are re-tiled to 128x1 for Wgrad, and for what dispatch
    sends in FP8). Any of: `attn_out` (input of MLA's `wo`), `expert_in` (routed experts' input;
    FP8 dispatch sends it so, required with parallel.ep > 1), `expert_out_grad` (gradient at the
    routed experts' output), `swiglu_in` (the SwiGLU inputs cached for backward), `linear_in` (every
    other GEMM input activation), `act_grad` (every other activation gradient), `weight` (weight blocks)."""
    amax_floor: float = 1e-4
    """scale = max(amax, amax_floor) / 448: keeps the scale of an all-zero tile finite and non-zero.
    Must be 1e-4 with parallel.ep > 1 (the FP8 dispatch kernel's floor)."""
    high_precision: list[str] = field(default_factory=list)
    """Further modules to keep out of FP8, as fnmatch patterns over module names: an FP8 linear
    (`layers.*.attn.wkv_b`, `mtp.0.eh_proj`), a SwiGLU FFN (`layers.0.ffn`, `*.shared_experts`) or a
    layer's routed experts (`layers.3.ffn.experts`). Each pattern must match at least one of them."""


@dataclass
class LossScaleConfig:
    """Dynamic loss scaling of `precision.dtype=fp16` (dsv3/train/loss_scale.py): the loss is multiplied
    by a scale S before the backward and the gradients divided by it before clipping; a step whose
    gradients overflow is skipped and S halved, and S doubles after `growth_interval` good steps."""

    init: float = 65536.0
    """S at the start of a run (2^16, as torch.amp.GradScaler)."""
    growth_interval: int = 1000
    """Steps without overflow after which S doubles."""
    min: float = 1.0
    """S never goes below this; an overflow at the floor is divergence (train.on_nonfinite), not the scale's."""


@dataclass
class PrecisionConfig:
    """Numeric format of the forward/backward computation (dsv3/train/precision.py). Parameters, their
    gradients and the optimizer stay fp32 (master weights) in every format."""

    dtype: str = "fp32"
    """fp32 | bf16 (autocast; CUDA needs compute capability 8.0+) | fp16 (autocast with dynamic loss
    scaling, for GPUs without bf16: Turing, RTX 20xx) | fp8 (DeepSeek-V3's fine-grained FP8 recipe: emulated
    in fp32 on CPU, Triton E4M3 kernels on CUDA compute capability 8.9+; refused on older GPUs)."""
    fp8: Fp8Config = field(default_factory=Fp8Config)
    """The FP8 recipe's options (read only when dtype=fp8)."""
    loss_scale: LossScaleConfig = field(default_factory=LossScaleConfig)
    """fp16's loss scaling (read only when dtype=fp16)."""


@dataclass
class OptimConfig:
    """AdamW and the DeepSeek-V3 learning-rate schedule (warmup, constant, cosine decay, constant tails)."""

    lr: float = 2.2e-4
    """Peak learning rate reached at the end of warmup."""
    min_lr: float = 2.2e-5
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 2000
    """Linear warmup from 0 to `lr`."""
    constant_steps: int = 0
    """Steps at `lr` after warmup."""
    decay_steps: int = 0
    """Cosine decay from `lr` to `min_lr`; 0 = no decay (the LR stays at `lr`)."""
    tail: list[Any] = field(default_factory=list)
    """Constant phases after the decay, as [steps, lr] pairs (V3: [[.., 2.2e-5], [.., 7.3e-6]])."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices; never on norms, biases or embeddings."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    moment_dtype: str = "fp32"
    """Dtype of AdamW's first and second moments: fp32 | bf16 (V3 keeps them in BF16)."""
    layer_lr_decay: float = 1.0
    """Layer-wise learning rates: the output head, final norm and MTP modules train at the schedule's
    rate, layer i at layer_lr_decay ** (n_layers - i) times it and the embedding at
    layer_lr_decay ** (n_layers + 1); 1.0 = one rate for all (V3). In (0, 1]."""


@dataclass
class BlendEntry:
    """One corpus of a `data.blend`."""

    path: Optional[str] = None
    """Directory of shards written by `launch/prepare_data.py` (required)."""
    weight: float = 1.0
    """Relative share of the training samples (the weights are normalized by their sum)."""
    name: Optional[str] = None
    """Names the corpus in logs and metrics; default: the directory's name."""


@dataclass
class DataConfig:
    """Where tokens come from and how they are cut into training sequences."""

    source: str = "stdlib"
    """`stdlib`: the embedded corpus (this Python's standard-library sources, no download);
    `shards`: a directory written by `launch/prepare_data.py`."""
    path: Optional[str] = None
    """Directory of prepared shards when `source=shards`."""
    tokenizer: Optional[str] = None
    """A `tokenizer.json` to use for the embedded corpus; default: train a byte-level BPE of
    `model.vocab_size` tokens on it (cached)."""
    seq_len: int = 128
    """Tokens per training sequence (documents are packed; each sample also carries its next token)."""
    val_fraction: float = 0.02
    """Share of the embedded corpus' documents held out for validation (chosen by path hash)."""
    cache_dir: Optional[str] = None
    """Where the embedded corpus' tokenizer and token shards are cached; default ~/.cache/dsv3."""
    blend: list[BlendEntry] = field(default_factory=list)
    """`source=shards` from several directories mixed by weight, instead of `path`:
    `data.blend=[{path: data/web, weight: 0.7}, {path: data/code, weight: 0.3}]`. Deterministic by
    global sample index (plan-independent, exactly resumable); every corpus' epochs and the realized
    mixture are in the metrics (`data/epoch/<name>`, `data/share/<name>`)."""
    fim_rate: float = 0.0
    """Share of training documents rearranged for Fill-in-Middle, PSM order (V3 §4.1: 0.1); 0 = off."""
    document_masks: bool = False
    """Attention stays inside each packed document (tokens never attend across a document boundary);
    default off: causal attention over the whole sequence, as in the V3 report. The loss is the same."""


@dataclass
class TrainConfig:
    """The training loop."""

    max_steps: int = 20
    """Optimizer steps to run (in total, counting steps before a resume)."""
    seed: int = 1234
    """Seeds weights (by parameter name, so any plan gets the same values), data order and RNGs."""
    global_batch_size: int = 8
    """Sequences per optimizer step, whatever the plan (after the batch ramp)."""
    micro_batch_size: int = 4
    """Sequences per forward/backward on one data-parallel rank; the rest is gradient accumulation."""
    batch_ramp_start: int = 0
    """Global batch at step 0 when ramping (V3: 3072 -> 15360); 0 = no ramp."""
    batch_ramp_samples: int = 0
    """Samples consumed over which the global batch ramps linearly up to `global_batch_size`."""
    log_every: int = 1
    """Log a progress line and a metrics.jsonl record every this many steps."""
    val_every: int = 0
    """Evaluate the held-out loss every this many steps; 0 = only at the end."""
    val_samples: int = 32
    """Held-out sequences per evaluation: the first ones of the validation split, whatever the plan."""
    resume: str = "auto"
    """`auto`: continue from the newest intact checkpoint in `checkpoint.dir` if any (a damaged one is
    reported and skipped); `none`; or a path (exit 2 if it is damaged)."""
    resume_allow_changes: list[str] = field(default_factory=list)
    """Config keys or sections (`optim.lr`, `optim`) that may differ from the checkpoint's config when
    resuming. The plan, run length, logging and checkpoint cadence may always change; the model's shapes
    and the data never (see dsv3/train/resume.py)."""
    on_nonfinite: str = "skip"
    """A step whose loss or gradient norm is NaN/inf (on any rank) is not applied. `skip`: go on with the
    next batch, stopping after `max_consecutive_skips` such steps in a row; `stop`: stop at the first.
    Stopping saves nothing and exits with code 3."""
    max_consecutive_skips: int = 3
    """With on_nonfinite=skip: the number of non-finite steps in a row after which the run stops."""
    bias_update_speed: float = 0.001
    """Aux-loss-free balancing: gamma, the per-step bias adjustment (V3: 0.001, then 0)."""
    bias_update_stop_step: int = -1
    """Step from which gamma is 0 (V3 stops for the last 500B tokens); -1 = never."""
    balance_loss_alpha: float = 0.0001
    """Weight alpha of the sequence-wise balance loss (V3: 0.0001)."""
    mtp_loss_weight: float = 0.3
    """MTP weight lambda (V3: 0.3 for the first 10T tokens)."""
    mtp_loss_weight_late: float = 0.1
    """lambda after `mtp_loss_weight_switch_step` (V3: 0.1)."""
    mtp_loss_weight_switch_step: int = -1
    """Step from which lambda is `mtp_loss_weight_late`; -1 = never."""
    device: str = "auto"
    """auto | cpu | cuda."""
    threads: int = 0
    """CPU intra-op threads (torch.set_num_threads); 0 = torch's default."""
    profile_steps: list[int] = field(default_factory=list)
    """[a, b]: record a torch.profiler trace (with memory) of training steps a..b into <run dir>/profile/;
    [] = off."""
    compile: bool = False
    """torch.compile every transformer block (main layers and MTP modules), in place."""
    activation_checkpointing: str = "none"
    """Recompute activations in the backward instead of keeping them (dsv3/train/recompute.py):
    `none`; `full` (every transformer block, MTP's included, keeps only its input); `moe` (only the
    MoE layers: router, dispatch, experts, combine, shared expert); `attention` (only MLA). Losses are
    identical; the price is one more forward of what is recomputed."""


@dataclass
class CheckpointConfig:
    """Distributed checkpoints (torch.distributed.checkpoint), written atomically."""

    dir: str = "${hydra:run.dir}/checkpoints"
    """Directory holding one `step_XXXXXXXX` directory per complete checkpoint."""
    every: int = 0
    """Save every this many steps (and at the end); 0 = only at the end."""
    keep: int = 3
    """Keep this many most recent checkpoints; 0 = keep all."""
    init_from: Optional[str] = None
    """Start a fresh run from these weights: a dsv3 checkpoint or a Hugging Face DeepseekV3 directory."""
    on_signal: bool = True
    """On SIGTERM or SIGUSR1 (preemption, scancel, SLURM's --signal), finish the current step, save a
    checkpoint on every rank and exit with 128 + the signal number; false: the signal's default action."""


@dataclass
class KernelsConfig:
    """Which implementation runs the hot ops."""

    grouped_gemm: str = "auto"
    """Routed-expert GEMMs: auto | triton | torch | reference."""


@dataclass
class LoggingConfig:
    """Where metrics go besides `metrics.jsonl`, TensorBoard and the log, and how throughput is judged."""

    wandb: bool = False
    """Also log to Weights & Biases (needs `pip install wandb`; not a dependency of dsv3)."""
    wandb_project: str = "dsv3"
    """W&B project."""
    wandb_entity: Optional[str] = None
    """W&B entity (team or user); default: yours."""
    wandb_name: Optional[str] = None
    """Display name of the W&B run; default: `run_name`."""
    wandb_id: Optional[str] = None
    """W&B run id; default: derived from `run_name` and the run directory, so a resumed run continues it."""
    wandb_mode: str = "online"
    """online | offline (no network: the run is written under <run dir>/wandb; `wandb sync` uploads it)."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s of one device for the MFU; 0 = on a GPU the hardware preset's `hardware.bf16_tflops`
    if the run names one, else the datasheet's dense BF16 rate of a known GPU, else measured at start-up
    (a GEMM in the run's compute dtype)."""


@dataclass
class HardwareConfig:
    """The machines a run is planned for (`configs/hardware/`, `+hardware=...`): read by the planner
    (`launch/plan.py`, dsv3/planner) and by the trainer's startup memory line; training itself does not
    depend on it. Peak rates are dense (no sparsity), per GPU; bandwidths are per GPU and direction."""

    name: str = ""
    """The preset's name; empty = no hardware given (the planner then reports memory without a verdict)."""
    gpu: str = ""
    """What the GPU is, for the report (e.g. "H800 SXM 80GB")."""
    nodes: int = 1
    """Machines in the job."""
    gpus_per_node: int = 1
    """GPUs (ranks) per machine; the planned world size is nodes * gpus_per_node."""
    memory_gib: float = 0.0
    """Memory of one GPU in GiB."""
    reserved_gib: float = 0.0
    """Part of it no tensor of the plan gets: CUDA context, communication libraries' buffers, allocator
    fragmentation (not modeled tensor by tensor; a rule of thumb per card)."""
    compute_capability: str = ""
    """CUDA compute capability ("8.9", "9.0"): FP8 needs 8.9 or newer."""
    bf16_tflops: float = 0.0
    """Dense BF16 tensor-core peak (TFLOP/s, FP32 accumulation), the reference of MFU."""
    fp8_tflops: float = 0.0
    """Dense FP8 tensor-core peak (TFLOP/s); 0 = no FP8."""
    intra_node_gbs: float = 0.0
    """Achievable GPU-to-GPU bandwidth inside a node (GB/s per GPU and direction: NVLink, or PCIe)."""
    inter_node_gbs: float = 0.0
    """Achievable network bandwidth between nodes (GB/s per GPU and direction: InfiniBand/RoCE NIC)."""
    host_memory_gib: float = 0.0
    """CPU memory per node in GiB (what optimizer offload may use)."""
    mfu: float = 0.4
    """Model FLOPs utilization assumed for the planner's time estimates (model FLOPs / (time * peak))."""


@dataclass
class Config:
    """The whole run."""

    run_name: str = "default"
    """Names the run directory (`runs/<run_name>` unless `hydra.run.dir` is given)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    # post-training (R1): dsv3/config/post_training.py
    tasks: TaskConfig = field(default_factory=TaskConfig)
    rewards: list[RewardTerm] = field(default_factory=lambda: [RewardTerm("accuracy", 1.0), RewardTerm("format", 0.1)])
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: GRPOConfig = field(default_factory=GRPOConfig)
    rejection: RejectionConfig = field(default_factory=RejectionConfig)
