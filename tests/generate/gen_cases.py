"""Small models for the generation tests (fp32, CPU, well under a second per forward)."""
import torch

from dsv3.config.schema import ModelConfig
from dsv3.model import Transformer, init_weights

BASE = dict(vocab_size=97, dim=48, inter_dim=80, moe_inter_dim=24, n_layers=3, n_heads=4, kv_lora_rank=24,
            qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=12, mtp_depth=1, max_seq_len=64,
            n_routed_experts=8, n_activated_experts=2, n_expert_groups=2, n_limited_groups=1, route_scale=2.5)

CASES = {
    "q_compression": dict(q_lora_rank=20),
    "no_q_compression": dict(q_lora_rank=0),
    "q_compression_yarn": dict(q_lora_rank=20, max_seq_len=256, original_seq_len=32, rope_factor=8.0, mscale=0.707),
    "no_q_compression_yarn": dict(q_lora_rank=0, max_seq_len=256, original_seq_len=32, rope_factor=8.0),
}


def tiny_model(case: str = "q_compression", seed: int = 1, std: float = 0.05, **overrides) -> Transformer:
    cfg = ModelConfig(**{**BASE, **CASES[case], **overrides})
    model = Transformer(cfg).eval()
    init_weights(model, seed=seed, std=std)  # larger than 0.006: attention and routing far from uniform
    with torch.no_grad():  # non-zero balancing biases, so selection differs from the weights
        for i, moe in enumerate(model.moe_layers()):
            moe.gate.bias.copy_(torch.randn(moe.gate.bias.shape, generator=torch.Generator().manual_seed(i)) * 0.05)
    return model


@torch.no_grad()
def make_mtp_echo(model: Transformer) -> Transformer:
    """Make the MTP module return the main model's prediction at the same position: it then drafts a
    repeat of the token just produced, which a model that loops accepts often but not always. Gives
    speculative decoding a real mix of accepted and rejected drafts without training."""
    module = model.mtp[0]
    dim = model.cfg.dim
    module.eh_proj.weight.zero_()
    module.eh_proj.weight[:, dim:] = torch.eye(dim)        # x = hnorm(h)
    module.block.attn.wo.weight.zero_()                    # the block becomes the identity
    ffn = module.block.ffn
    for w in ([ffn.experts.w2, ffn.shared_experts.w2.weight] if hasattr(ffn, "experts") else [ffn.w2.weight]):
        w.zero_()
    for norm in (module.hnorm, module.norm, model.norm):
        norm.weight.fill_(1.0)
    return model


def prompts(vocab: int, lengths=(5, 2, 9, 1), seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def greedy_without_cache(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """The reference: recompute the full forward over the whole sequence for every new token."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]
