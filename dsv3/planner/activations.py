"""What one micro-batch's forward keeps for its backward: the bytes autograd saves, by module, as this
model's code computes them. It is the planner's activation memory, written from the model path by path
(dsv3/model, dsv3/fp8, dsv3/kernels) and checked against the tensors autograd really saves in small CPU
runs (tests/planner/test_memory_measured.py).

What a precision keeps (`Numerics`):
- fp32: every op's fp32 inputs as they are; a tensor several ops keep (a norm's output read by two
  projections) is counted once;
- BF16 autocast (bf16; fp8 on a GPU for what stays out of FP8): each linear keeps its own BF16 copy of
  an fp32 input, and a BF16 copy of its weight (autocast casts the fp32 master weights once per autocast
  region, i.e. per micro-batch, and backward holds that copy); norms and the router stay fp32;
- FP8 (the recipe's modules, dsv3/fp8): inputs and SwiGLU inputs as E4M3 with one fp32 scale per 1x128
  tile, weights as E4M3 128x128 blocks (quantized per micro-batch and kept for Dgrad).
The residual stream is fp32 (fp32 master weights; the residual additions promote), except inside the
MTP blocks under autocast, whose input is a BF16 projection. Not counted here: what an op allocates and
frees within the forward (workspace), and expert-parallel routing indices kept outside autograd.

Activation checkpointing (`train.activation_checkpointing`, dsv3/train/recompute.py): a module the mode
wraps (`RECOMPUTED`) keeps only its inputs through the forward; what its ops would save is counted apart
as that module's recomputation (`Saved.recomputations`), which exists in the backward from the module's
recomputation until autograd has used it. Backward runs in the reverse order of the forward, so when a
module recomputes, what the chunk kept up to the module's end is still alive, what came after is freed:
the chunk's backward peaks at max over its recomputed modules of (kept up to the module + its
recomputation) (`Saved.backward_peak`). Seq1F1B's keys and values that later segments read stay alive
whatever the mode (the carry holds them); the recomputation makes its own copy.
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch

from dsv3.config.schema import ModelConfig
from dsv3.kernels.fp8_format import TILE, cdiv

FP32, BF16, INT64, INT32, BOOL = 4, 2, 8, 4, 1

# train.activation_checkpointing -> the module it wraps (dsv3/train/recompute.py: Block, MoE, MLA)
RECOMPUTED = {"none": None, "full": "block", "moe": "moe", "attention": "attention"}


@dataclass(frozen=True)
class Numerics:
    """How the forward computes: BF16 autocast or not, the FP8 recipe or not, the routed experts' kernel."""

    autocast: bool = False
    fp8: bool = False
    experts: str = "torch"                # "torch" (torch._grouped_mm), "reference", "triton" (fused, GPU)
    high_precision: tuple[str, ...] = ()  # precision.fp8.high_precision patterns

    @property
    def act(self) -> int:
        """Bytes per element of a GEMM output."""
        return BF16 if self.autocast else FP32

    def in_fp8(self, module: str) -> bool:
        return self.fp8 and not any(fnmatch(module, p) for p in self.high_precision)


@dataclass(frozen=True)
class Chunk:
    """The tokens one forward of a stage runs: `batch` sequences of `seq` positions, after `prefix`
    earlier positions of the same sequences whose keys and values it attends to (Seq1F1B's segments)."""

    batch: int
    seq: int
    prefix: int = 0
    last_of_sequence: bool = True     # the MTP modules drop the positions past the sequence's end
    document_masks: bool = False
    balance_loss: bool = True         # training with balance_loss_alpha > 0


def fp8_tiles(rows: int, cols: int) -> int:
    """E4M3 data plus fp32 scales of 1x128 tiles."""
    return rows * cols + rows * cdiv(cols, TILE) * FP32


def fp8_blocks(n: int, out_f: int, in_f: int) -> int:
    """n E4M3 weight matrices [out_f, in_f] with fp32 scales of 128x128 blocks."""
    return n * (out_f * in_f + cdiv(out_f, TILE) * cdiv(in_f, TILE) * FP32)


class Saved:
    """Bytes kept for backward, by module; a storage several ops keep (`key`) counts once. Inside a
    recomputed module (`recomputed()`), what its ops save goes to that module's recomputation instead;
    there a storage kept outside (the module's inputs) is not counted again."""

    def __init__(self):
        self.by_module: dict[str, int] = defaultdict(int)
        self._keys: set[str] = set()
        self.recomputations: list[tuple[int, int]] = []   # (kept up to the module's end, its recomputation)
        self._region: int | None = None
        self._region_keys: set[str] = set()

    def add(self, module: str, nbytes: int, key: str | None = None, kept: bool = False) -> None:
        """`kept`: held until the backward even inside a recomputed module (Seq1F1B's carried keys and
        values): kept outside, and recomputed too."""
        if self._region is not None:
            if key is None or key not in self._region_keys:
                self._region += int(nbytes)
                if key is not None:
                    self._region_keys.add(key)
            if not kept:
                return
        if key is not None:
            if key in self._keys:
                return
            self._keys.add(key)
        self.by_module[module] += int(nbytes)

    @contextmanager
    def recomputed(self):
        """A module under torch.utils.checkpoint: its inputs are added (kept) before entering."""
        self._region, self._region_keys = 0, set(self._keys)
        try:
            yield
        finally:
            self.recomputations.append((self.total, self._region))
            self._region = None

    @property
    def total(self) -> int:
        return sum(self.by_module.values())

    @property
    def backward_peak(self) -> int:
        """The most this chunk holds during its backward: recomputing a module while what the forward
        kept up to that module is alive (0 without recomputation)."""
        return max((kept + again for kept, again in self.recomputations), default=0)

    def above_weights(self, last_layer: str | None, last_stage: bool) -> int:
        """What a stage's graph holds above its last weight GEMMs: freed once the input gradient is
        computed (I), before the weight gradients (W), because only the outputs reference it. On the
        last stage the losses' log-softmax outputs; else, if the stage ends with a MoE layer, its
        router path and combine (the gate's GEMM and the experts' are the last weights below)."""
        if last_stage:
            return self.by_module.get("loss", 0)
        if last_layer is None:
            return 0
        return sum(self.by_module.get(f"{last_layer}.ffn.{part}", 0) for part in ("router", "combine", "balance"))


class _Forward:
    """Walks the model's forward like the code does, adding what each op keeps to a `Saved`."""

    def __init__(self, cfg: ModelConfig, num: Numerics, fp8_linears: set[str], ep: int, expert_align: int,
                 saved: Saved, recompute: str = "none"):
        self.c, self.num, self.fp8_linears, self.saved = cfg, num, fp8_linears, saved
        self.ep, self.align = ep, expert_align
        self.recompute = RECOMPUTED[recompute]

    @contextmanager
    def module(self, kind: str, where: str, inputs: list[tuple[str, int]]):
        """The forward of a module of `kind`; if the mode recomputes it, the checkpoint keeps `inputs`
        ((key, bytes) of each input tensor) and the rest becomes its recomputation."""
        if self.recompute != kind:
            yield
            return
        for key, nbytes in inputs:
            self.saved.add(where, nbytes, key)
        with self.saved.recomputed():
            yield

    # -- primitives ---------------------------------------------------------------------------------
    def norm(self, where: str, rows: int, width: int, x_key: str, x_bytes: int, x_storage: int | None = None) -> str:
        """RMSNorm: rms_norm(x.float()) keeps its fp32 input and 1/rms; `weight * y` keeps y (x's dtype).
        Returns the key of its fp32 output."""
        if x_bytes == FP32:
            self.saved.add(where, x_storage or rows * width * FP32, x_key)
        else:
            self.saved.add(where, rows * width * FP32)          # x.float() is a new fp32 tensor
        self.saved.add(where, rows * FP32)
        self.saved.add(where, rows * width * x_bytes)
        return f"{where}:out"

    def linear(self, qual: str, rows: int, in_f: int, out_f: int, x_key: str, x_bytes: int) -> None:
        """A Linear (or the FP8 one the recipe swaps in) reading x [rows, in_f]."""
        if qual in self.fp8_linears and self.num.in_fp8(qual):
            self.saved.add(qual, fp8_tiles(rows, in_f) + fp8_blocks(1, out_f, in_f) + INT32)
        elif self.num.autocast:
            self.saved.add(qual, out_f * in_f * BF16, f"bf16 weight:{qual}")   # one cast per autocast region
            if x_bytes == FP32:
                self.saved.add(qual, rows * in_f * BF16)       # each linear casts its own copy
            else:
                self.saved.add(qual, rows * in_f * BF16, x_key)
        else:
            self.saved.add(qual, rows * in_f * FP32, x_key)

    def swiglu(self, where: str, rows: int, inter: int, x_key: str) -> None:
        """FeedForward w2(silu(w1 x) * w3 x) on the fp32 norm output x (dense FFN, shared experts)."""
        d, act = self.c.dim, self.num.act
        if self.num.in_fp8(where):   # one Fp8SwiGLUFunction: x and gate_up in FP8, the three weights in FP8
            self.saved.add(where, fp8_tiles(rows, d) + fp8_blocks(1, 2 * inter, d) + fp8_blocks(1, d, inter)
                           + fp8_tiles(rows, 2 * inter) + INT32)
            return
        self.linear(f"{where}.w1", rows, d, inter, x_key, FP32)
        self.linear(f"{where}.w3", rows, d, inter, x_key, FP32)
        self.saved.add(where, 3 * rows * inter * act)         # silu keeps w1 x; the product keeps silu(.) and w3 x
        self.linear(f"{where}.w2", rows, inter, d, f"{where}:h", act)

    # -- modules ------------------------------------------------------------------------------------
    def mla(self, where: str, ch: Chunk, rows: int, seq: int, z: str) -> None:
        c, act = self.c, self.num.act
        H, qk, dv = c.n_heads, c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim
        if c.q_lora_rank > 0:
            self.linear(f"{where}.wq_a", rows, c.dim, c.q_lora_rank, z, FP32)
            zq = self.norm(f"{where}.q_norm", rows, c.q_lora_rank, f"{where}:qa", act)
            self.linear(f"{where}.wq_b", rows, c.q_lora_rank, H * qk, zq, FP32)
        else:
            self.linear(f"{where}.wq", rows, c.dim, H * qk, z, FP32)
        self.linear(f"{where}.wkv_a", rows, c.dim, c.kv_lora_rank + c.qk_rope_head_dim, z, FP32)
        # kv_norm reads the latent, a view of wkv_a's output: in fp32 it keeps that whole output
        zkv = self.norm(f"{where}.kv_norm", rows, c.kv_lora_rank, f"{where}:kv_a", act,
                        x_storage=rows * (c.kv_lora_rank + c.qk_rope_head_dim) * FP32)
        self.linear(f"{where}.wkv_b", rows, c.kv_lora_rank, H * (c.qk_nope_head_dim + dv), zkv, FP32)
        # SDPA keeps q, k, v (v zero-padded to q's head dim for the flash kernels), its output and the
        # log-sum-exp; keys and values span the earlier segments' positions too (prefix)
        # (a segment whose sequence goes on hands its [prefix; own] keys and values to the next one)
        kv_rows = rows // seq * (seq + ch.prefix)
        v_width = max(dv, qk)
        carried = not ch.last_of_sequence
        self.saved.add(where, rows * H * qk * act)
        self.saved.add(where, kv_rows * H * qk * act, f"{where}:k", kept=carried)
        if v_width > dv or ch.prefix:
            self.saved.add(where, kv_rows * H * v_width * act, f"{where}:v", kept=carried)
        else:                                   # v is a view of wkv_b's output: that storage is kept
            self.saved.add(where, rows * H * (c.qk_nope_head_dim + dv) * act, f"{where}:v", kept=carried)
        self.saved.add(where, rows * H * qk * act + rows * H * FP32)
        if ch.document_masks or ch.prefix:      # an explicit [S, P+S] boolean mask (per sequence with documents)
            self.saved.add(where, (rows // seq if ch.document_masks else 1) * seq * (seq + ch.prefix) * BOOL)
        self.linear(f"{where}.wo", rows, H * dv, c.dim, f"{where}:o", act)

    def moe(self, where: str, ch: Chunk, rows: int, z: str, seq: int) -> None:
        c, act = self.c, self.num.act
        E, K, d, inter = c.n_routed_experts, c.n_activated_experts, c.dim, c.moe_inter_dim
        self.saved.add(f"{where}.gate", rows * d * FP32, z)   # the router's GEMM runs in fp32 on the norm output
        router = f"{where}.router"
        self.saved.add(router, rows * E * FP32 + rows * K * INT64)   # scores, chosen experts
        if c.score_func == "sigmoid":
            self.saved.add(router, rows * FP32 + rows * K * FP32)    # normalization of the chosen scores
        pairs = rows * K
        local = E // self.ep
        if self.ep == 1:
            self.saved.add(f"{where}.dispatch", pairs * INT64)         # the inverse of the sort by expert
            routed = pairs
        else:                                    # expected rows received (even routing) plus the alignment padding
            routed = pairs + local * (self.align - 1) // 2
        ex = f"{where}.experts"
        if self.num.in_fp8(ex):
            self.saved.add(ex, fp8_tiles(routed, d) + fp8_blocks(local, 2 * inter, d) + fp8_blocks(local, d, inter)
                           + fp8_tiles(routed, 2 * inter) + local * INT32)
        else:
            if self.num.autocast:                # autocast_operands: BF16 copies of the rows and of both weights
                self.saved.add(ex, routed * d * BF16 + local * 3 * inter * d * BF16)
            else:
                self.saved.add(ex, routed * d * FP32)
            self.saved.add(ex, local * INT32 + routed * 2 * inter * act)     # offsets, gate_up
            if self.num.experts != "triton":     # the fused kernel recomputes silu(gate) * up in backward
                self.saved.add(ex, 2 * routed * inter * act)
        # combine keeps the expert outputs of each (token, k), in fp32 locally (its sum is fp32), in the
        # experts' dtype (BF16 on the wire with FP8) over EP; and the routing weights
        y_bytes = FP32 if self.ep == 1 else (BF16 if self.num.fp8 or self.num.autocast else FP32)
        combine = f"{where}.combine"
        self.saved.add(combine, pairs * d * y_bytes + pairs * FP32)
        if self.ep == 1:
            self.saved.add(combine, pairs * INT64)                      # the sort permutation
        if c.n_shared_experts > 0:
            self.swiglu(f"{where}.shared_experts", rows, c.n_shared_experts * inter, z)
        if ch.balance_loss:
            self.saved.add(f"{where}.balance", rows * FP32 + rows // seq * E * FP32)   # sums, f

    def block(self, where: str, ch: Chunk, rows: int, seq: int, moe: bool, x_bytes: int = FP32) -> None:
        """One transformer layer on the residual stream x (a fresh tensor of x_bytes per element)."""
        d = self.c.dim
        # a packed-documents mask is one tensor, made once per forward and read by every layer
        mask = [("document mask", rows // seq * seq * seq * BOOL)] if ch.document_masks else []
        with self.module("block", where, [(f"{where}:x", rows * d * x_bytes), *mask]):
            z = self.norm(f"{where}.attn_norm", rows, d, f"{where}:x", x_bytes)
            with self.module("attention", f"{where}.attn", [(z, rows * d * FP32), *mask]):
                self.mla(f"{where}.attn", ch, rows, seq, z)
            h_bytes = x_bytes if x_bytes == FP32 else self.num.act
            z = self.norm(f"{where}.ffn_norm", rows, d, f"{where}:h", h_bytes)
            if moe:
                with self.module("moe", f"{where}.ffn", [(z, rows * d * FP32)]):
                    self.moe(f"{where}.ffn", ch, rows, z, seq)
            else:
                self.swiglu(f"{where}.ffn", rows, self.c.inter_dim, z)

    def head_loss(self, where: str, rows: int, x_key: str, x_bytes: int) -> None:
        """norm -> head -> cross-entropy: log_softmax keeps its fp32 output, NLL a copy of the labels."""
        z = self.norm(where, rows, self.c.dim, x_key, x_bytes)
        self.linear("head", rows, self.c.dim, self.c.vocab_size, z, FP32)
        self.saved.add("loss", rows * self.c.vocab_size * FP32 + rows * INT64 + FP32)

    def embed(self, ch: Chunk) -> None:
        # the token ids are a view of the loaded [b, S+1] batch (inputs and labels share it)
        self.saved.add("embed", ch.batch * (ch.seq + 1) * INT64, "tokens")

    def last_stage(self, ch: Chunk) -> None:
        c, d, b = self.c, self.c.dim, ch.batch
        self.head_loss("norm", b * ch.seq, "h", FP32)
        for k in range(1, c.mtp_depth + 1):
            seq = ch.seq - (k if ch.last_of_sequence else 0)
            rows, m = b * seq, f"mtp.{k - 1}"
            self.saved.add("embed", b * (ch.seq + 1) * INT64, "tokens")
            self.norm(f"{m}.enorm", rows, d, f"{m}:emb", FP32)
            self.saved.add(f"{m}.hnorm", rows * FP32 + rows * d * FP32)   # its input is h, kept by the final norm
            self.linear(f"{m}.eh_proj", rows, 2 * d, d, f"{m}:cat", FP32)
            self.block(f"{m}.block", ch, rows, seq, c.n_layers + k - 1 >= c.n_dense_layers, x_bytes=self.num.act)
            self.head_loss(f"{m}.norm", rows, f"{m}:out", self.num.act)


def chunk_saved(cfg: ModelConfig, num: Numerics, ch: Chunk, layers: range, first: bool, last: bool,
                fp8_linears: set[str], ep: int = 1, expert_align: int = 1, recompute: str = "none") -> Saved:
    """Bytes one forward of a stage (embedding if `first`, `layers`, head and MTP if `last`) keeps for backward.
    `fp8_linears`: the qualified names of the linears the FP8 recipe swaps (`shapes.ModelShape.fp8_linears`);
    `recompute`: train.activation_checkpointing."""
    saved = Saved()
    f = _Forward(cfg, num, fp8_linears, ep, expert_align, saved, recompute)
    rows = ch.batch * ch.seq
    if first:
        f.embed(ch)
    for i in layers:
        f.block(f"layers.{i}", ch, rows, ch.seq, i >= cfg.n_dense_layers)
    if last:
        f.last_stage(ch)
    return saved
