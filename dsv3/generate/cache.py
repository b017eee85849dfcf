"""The decoding state: MLA's compressed KV cache plus the bookkeeping of where each row stands.

MLA caches, per token and layer, the normalized latent c_KV (`kv_lora_rank` values) and the RoPE key
shared by all heads (`qk_rope_head_dim` values), not per-head keys and values: for V3 that is
512 + 64 = 576 values instead of 128 heads x (192 + 128) = 40,960 (V2 report §2.1.2; V3 report §2.1.1).

Rows of a batch share *slots* (cache columns): slot s of every row is written by the same forward.
Each row has its own position counter and a validity mask over slots, which covers everything that is
not the same for all rows: left padding (invalid slots before a short prompt) and the drafts that
speculative decoding rejected (a slot that is invalidated after the fact; the row's position counter
steps back, so the next token reuses the position). An invalid slot is never attended to.
"""
from dataclasses import dataclass, field

import torch


@dataclass
class LatentCache:
    """One attention layer's cache: kv [B, T, kv_lora_rank] (kv_norm(c_KV)), pe [B, T, rope] (rotated)."""

    kv: torch.Tensor
    pe: torch.Tensor

    def select(self, rows: torch.Tensor) -> "LatentCache":
        return LatentCache(self.kv[rows], self.pe[rows])


@dataclass
class DecodeState:
    """Caches of the main layers and the MTP modules, the slots used so far, validity and positions."""

    layers: dict[str, LatentCache]
    valid: torch.Tensor                 # [B, T] bool: slot holds a token of the row's sequence
    next_pos: torch.Tensor              # [B] int64: position of the row's next token
    used: int = 0                       # slots [0, used) are written
    mtp: dict[str, LatentCache] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    @classmethod
    def allocate(cls, model, batch: int, slots: int, dtype: torch.dtype, device: torch.device,
                 with_mtp: bool) -> "DecodeState":
        cfg = model.cfg

        def empty() -> LatentCache:
            return LatentCache(torch.zeros(batch, slots, cfg.kv_lora_rank, dtype=dtype, device=device),
                               torch.zeros(batch, slots, cfg.qk_rope_head_dim, dtype=dtype, device=device))

        return cls(layers={name: empty() for name in model.layers},
                   valid=torch.zeros(batch, slots, dtype=torch.bool, device=device),
                   next_pos=torch.zeros(batch, dtype=torch.long, device=device),
                   mtp={str(k): empty() for k in range(len(model.mtp))} if with_mtp else {})

    def claim(self, valid_new: torch.Tensor) -> tuple[int, torch.Tensor]:
        """Reserve the next S slots for tokens whose validity is `valid_new` [B, S]; returns the first
        slot and the tokens' positions [B, S] (an invalid token gets its row's current position: it is
        never attended to, the value only has to be in range)."""
        S = valid_new.shape[1]
        if self.used + S > self.capacity:
            raise RuntimeError(f"decode state full: {self.used} + {S} slots > capacity {self.capacity}")
        start = self.used
        steps = valid_new.long().cumsum(dim=1)
        positions = self.next_pos[:, None] + (steps - valid_new.long())
        self.valid[:, start:start + S] = valid_new
        self.next_pos = self.next_pos + steps[:, -1]
        self.used += S
        return start, positions

    def invalidate(self, rows: torch.Tensor, slot: int) -> None:
        """Forget slot `slot` of the rows where `rows` [B] is true (a rejected draft)."""
        self.valid[:, slot] &= ~rows
        self.next_pos = self.next_pos - rows.long()

    def attention_mask(self, start: int, S: int) -> torch.Tensor:
        """[B, S, used] bool: query slot start+s sees the valid slots up to itself. A query always sees
        its own slot, so a padding query has a finite (ignored) output instead of a NaN."""
        t = torch.arange(self.used, device=self.valid.device)
        q = torch.arange(start, start + S, device=self.valid.device)
        causal = t[None, :] <= q[:, None]
        return (self.valid[:, None, :self.used] & causal[None]) | (t[None, :] == q[:, None])[None]

    def select(self, rows: torch.Tensor) -> "DecodeState":
        """The state of a subset of rows (finished rows leave the batch)."""
        return DecodeState({k: c.select(rows) for k, c in self.layers.items()}, self.valid[rows],
                           self.next_pos[rows], self.used, {k: c.select(rows) for k, c in self.mtp.items()})


def cache_bytes_per_token(cfg, dtype_bytes: int = 2, with_mtp: bool = True) -> dict[str, int]:
    """Bytes of cache per token of context: MLA's latent cache vs a standard multi-head KV cache of the
    same model (per-head keys of qk_nope + qk_rope dims and values of v_head_dim, every layer)."""
    layers = cfg.n_layers + (cfg.mtp_depth if with_mtp else 0)
    latent = layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype_bytes
    mha = layers * cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * dtype_bytes
    return {"mla_latent": latent, "multi_head": mha}
