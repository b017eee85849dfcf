"""The model's forward with the latent cache, from outside the model: the same modules and weights, run
over new tokens that attend to the cached ones.

MLA with a cache (DeepSeek's inference code, `MLA.forward` in its "absorb" and "naive" modes):
- absorbed: W_UK (the key half of `wkv_b`) is folded into the query, so scores are taken against the
  cached latents directly, q_nope W_UK^T c_KV^T; the weighted sum stays in latent space and W_UV (the
  value half) is applied once to it before `wo`. Nothing per-head is ever built for the context:
  this is what makes decoding with the small cache cheap.
- naive: the cached latents are expanded through `wkv_b` into per-head keys and values for the whole
  context at every call, then ordinary attention. The same mathematics in another order; it is the
  check on the absorbed form, and cheaper for a long prefill (S ~ T), where it is used by default.
"""
import torch
from torch import nn

from dsv3.generate.cache import DecodeState, LatentCache
from dsv3.model import Transformer
from dsv3.model.mla import MLA
from dsv3.model.rope import apply_rope
from dsv3.model.step_aux import StepAux

ATTENTION_FORMS = ("auto", "absorbed", "naive")


def cached_mla(attn: MLA, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache,
               start: int, mask: torch.Tensor, absorbed: bool) -> torch.Tensor:
    """x [B, S, dim] at slots [start, start+S) -> attention output [B, S, dim]; writes the new latents."""
    B, S, _ = x.shape
    H, dn, dv = attn.n_heads, attn.qk_nope_head_dim, attn.v_head_dim
    q = attn.wq(x) if hasattr(attn, "wq") else attn.wq_b(attn.q_norm(attn.wq_a(x)))
    q_nope, q_pe = q.view(B, S, H, -1).split([dn, attn.qk_rope_head_dim], dim=-1)
    q_pe = apply_rope(q_pe, cos, sin)
    kv, k_pe = attn.wkv_a(x).split([attn.kv_lora_rank, attn.qk_rope_head_dim], dim=-1)
    cache.kv[:, start:start + S] = attn.kv_norm(kv)
    cache.pe[:, start:start + S] = apply_rope(k_pe.unsqueeze(2), cos, sin).squeeze(2)
    T = mask.shape[-1]
    c_kv, k_rope = cache.kv[:, :T], cache.pe[:, :T]
    w_ukv = attn.wkv_b.weight.view(H, dn + dv, attn.kv_lora_rank)   # per head: [W_UK; W_UV] rows
    if absorbed:
        q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_ukv[:, :dn])
        scores = (torch.einsum("bshc,btc->bsht", q_latent, c_kv)
                  + torch.einsum("bshr,btr->bsht", q_pe, k_rope))
    else:
        k_nope, v = attn.wkv_b(c_kv).view(B, T, H, dn + dv).split([dn, dv], dim=-1)
        scores = (torch.einsum("bshd,bthd->bsht", q_nope, k_nope)
                  + torch.einsum("bshr,btr->bsht", q_pe, k_rope))
    scores = (scores.float() * attn.softmax_scale).masked_fill(~mask[:, :, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).to(x.dtype)
    if absorbed:
        o = torch.einsum("bshc,hdc->bshd", torch.einsum("bsht,btc->bshc", probs, c_kv), w_ukv[:, dn:])
    else:
        o = torch.einsum("bsht,bthd->bshd", probs, v)
    return attn.wo(o.reshape(B, S, H * dv))


class CachedDecoder:
    """Runs a Transformer (main layers and MTP modules) over new tokens with a DecodeState.

    attention: `absorbed` or `naive` for every call, or `auto` (naive for a prefill of more than a few
    tokens, absorbed for decoding steps)."""

    def __init__(self, model: Transformer, attention: str = "auto"):
        if attention not in ATTENTION_FORMS:
            raise ValueError(f"attention={attention!r}: must be one of {', '.join(ATTENTION_FORMS)}")
        self.model, self.attention = model, attention

    def _absorbed(self, S: int) -> bool:
        return self.attention == "absorbed" or (self.attention == "auto" and S <= 4)

    def _block(self, block: nn.Module, h: torch.Tensor, cos, sin, cache: LatentCache, start: int,
               mask: torch.Tensor, aux: StepAux | None = None) -> torch.Tensor:
        # Block.forward with the cached attention
        h = h + cached_mla(block.attn, block.attn_norm(h), cos, sin, cache, start, mask, self._absorbed(h.shape[1]))
        x = block.ffn_norm(h)
        return h + (block.ffn(x, aux) if block.is_moe else block.ffn(x))

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rope = self.model.rope
        return rope.cos[positions], rope.sin[positions]

    @torch.no_grad()
    def forward(self, state: DecodeState, tokens: torch.Tensor, valid: torch.Tensor | None = None,
                aux: StepAux | None = None) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
        """tokens [B, S] into the next S slots -> (hidden [B, S, dim] before the final norm,
        logits [B, S, vocab] fp32, first slot, positions [B, S]). `aux` goes to the MoE layers (to
        record their routing)."""
        if valid is None:
            valid = torch.ones_like(tokens, dtype=torch.bool)
        start, positions = state.claim(valid)
        self._check_positions(positions)
        cos, sin = self._rope(positions)
        mask = state.attention_mask(start, tokens.shape[1])
        h = self.model.embed(tokens)
        for name, block in self.model.layers.items():
            h = self._block(block, h, cos, sin, state.layers[name], start, mask, aux)
        return h, self.model.head(self.model.norm(h)).float(), start, positions

    @torch.no_grad()
    def mtp_forward(self, state: DecodeState, start: int, positions: torch.Tensor, h: torch.Tensor,
                    next_tokens: torch.Tensor) -> torch.Tensor:
        """The first MTP module over slots [start, start+S) already claimed by `forward` (with the
        positions it returned): input the main model's hidden states there and the embeddings of the
        tokens that follow them (V3 report §2.2); returns its logits [B, S, vocab] fp32, a draft of the
        token after those."""
        S = h.shape[1]
        module = self.model.mtp[0]
        cos, sin = self._rope(positions)
        mask = state.attention_mask(start, S)
        x = module.eh_proj(torch.cat([module.enorm(self.model.embed(next_tokens)), module.hnorm(h)], dim=-1))
        x = self._block(module.block, x, cos, sin, state.mtp["0"], start, mask)
        return self.model.head(module.norm(x)).float()

    def _check_positions(self, positions: torch.Tensor) -> None:
        limit = self.model.cfg.max_seq_len
        if positions.numel() and int(positions.max()) >= limit:
            raise ValueError(f"position {int(positions.max())} is past the model's context "
                             f"(model.max_seq_len={limit})")
