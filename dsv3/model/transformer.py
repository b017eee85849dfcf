"""The DeepSeek-V3 transformer: embedding, blocks (MLA + dense FFN or MoE), final norm, output head, and
the multi-token-prediction modules that share the embedding and the head.

Layers live in a ModuleDict keyed by their global index, so parameter names ("layers.7.attn.wq_a.weight")
are the same whether a pipeline stage holds all layers or a slice of them.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config.schema import ModelConfig
from dsv3.model.mla import MLA, document_mask
from dsv3.model.moe import FeedForward, MoE
from dsv3.model.norm import RMSNorm
from dsv3.model.rope import RotaryEmbedding
from dsv3.model.step_aux import StepAux


class Block(nn.Module):
    def __init__(self, layer_id: int, cfg: ModelConfig, grouped_gemm: str = "torch"):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.is_moe = layer_id >= cfg.n_dense_layers
        self.ffn = MoE(cfg, grouped_gemm) if self.is_moe else FeedForward(cfg.dim, cfg.inter_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None, aux: Optional[StepAux] = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        h = self.ffn_norm(x)
        return x + (self.ffn(h, aux) if self.is_moe else self.ffn(h))


class MTPModule(nn.Module):
    """Depth-k MTP module: h' = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)], then a transformer block.

    The concatenation puts the embedding first, as DeepSeek's released checkpoints lay out `eh_proj`
    (the report writes the pair the other way round; the two differ only by a column permutation of M_k).
    """

    def __init__(self, layer_id: int, cfg: ModelConfig, grouped_gemm: str = "torch"):
        super().__init__()
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = Block(layer_id, cfg, grouped_gemm)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)  # before the shared output head

    def forward(self, h: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None, aux: Optional[StepAux] = None) -> torch.Tensor:
        return self.block(self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1)), cos, sin, mask, aux)


@dataclass
class LossParts:
    """Unweighted training losses of one micro-batch; the trainer applies lambda (alpha: `StepAux`)."""

    main: torch.Tensor
    mtp: list[torch.Tensor]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, grouped_gemm: str = "torch"):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): Block(i, cfg, grouped_gemm) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(cfg.n_layers + k, cfg, grouped_gemm) for k in range(cfg.mtp_depth))
        self.rope = RotaryEmbedding(cfg)

    def hidden(self, tokens: torch.Tensor, documents: torch.Tensor | None = None,
               aux: Optional[StepAux] = None) -> torch.Tensor:
        """tokens [B, S] -> last hidden state [B, S, dim] before the final norm. `documents` [B, S]: the
        document number of each token, to keep attention inside documents; None: causal over the sequence.
        `aux`: what a training forward needs and reports besides (see StepAux)."""
        cos, sin = self.rope(tokens.shape[1])
        mask = None if documents is None else document_mask(documents)
        h = self.embed(tokens)
        for layer in self.layers.values():
            h = layer(h, cos, sin, mask, aux)
        return h

    def forward(self, tokens: torch.Tensor, documents: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, S] -> next-token logits [B, S, vocab]."""
        return self.head(self.norm(self.hidden(tokens, documents)))

    def losses(self, tokens: torch.Tensor, labels: torch.Tensor, documents: torch.Tensor | None = None,
               aux: Optional[StepAux] = None) -> LossParts:
        """Cross-entropy of the main head and of every MTP depth. labels[:, i] is the token after tokens[:, i].

        Depth k predicts the token k+1 ahead; its sequence is cut by k at the end, where that token is unknown."""
        h = self.hidden(tokens, documents, aux)
        return LossParts(self.main_loss(h, labels, aux), self.mtp_losses(h, tokens, labels, documents, aux))

    def main_loss(self, h: torch.Tensor, labels: torch.Tensor, aux: Optional[StepAux] = None) -> torch.Tensor:
        """CE over the labels that count (label -100 never does): their mean, or their sum divided by
        `aux.loss_normalizer` (a trainer whose micro-batches count different numbers of labels, SFT's
        completion-only loss, so that the step's loss is the mean over every counted label of the batch)."""
        return cross_entropy(self.head(self.norm(h)), labels, aux.loss_normalizer if aux is not None else None)

    def mtp_losses(self, h: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor,
                   documents: torch.Tensor | None = None, aux: Optional[StepAux] = None,
                   start: int = 0) -> list[torch.Tensor]:
        """`h` holds positions start.. of the sequences `tokens`/`labels` (all of them unless a caller runs a
        sequence in segments): depth k predicts from the positions whose token k+1 ahead is known."""
        losses = []
        for k, module in enumerate(self.mtp, start=1):
            length = min(h.shape[1], tokens.shape[1] - k - start)
            cos, sin = self.rope(start + length)
            cos, sin = cos[start:], sin[start:]
            mask = None if documents is None else document_mask(documents[:, :length])
            h = module(h[:, :length], self.embed(tokens[:, start + k:start + k + length]), cos, sin, mask, aux)
            losses.append(cross_entropy(self.head(module.norm(h)), labels[:, start + k:start + k + length],
                                        aux.loss_normalizer if aux is not None else None))
        return losses

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]


IGNORE = -100  # a label that does not count (F.cross_entropy's default ignore_index)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, normalizer: float | None = None) -> torch.Tensor:
    if normalizer is None:
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                           reduction="sum") / normalizer
