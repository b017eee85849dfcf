"""Config rules of the model (`model.*`), registered in dsv3/config/rules.py."""
from dsv3.config.rules import World, one_of, positive, require
from dsv3.config.schema import Config, ModelConfig

SCORE_FUNCS = ("sigmoid", "softmax")  # the router's affinity (moe.Gate)


def check_model(m: ModelConfig) -> None:
    positive(m, "model", ["vocab_size", "dim", "n_layers", "n_heads", "kv_lora_rank", "qk_nope_head_dim",
                          "qk_rope_head_dim", "v_head_dim", "max_seq_len", "original_seq_len", "rope_theta",
                          "norm_eps", "init_std"])
    require(0 <= m.n_dense_layers <= m.n_layers, "model.n_dense_layers", m.n_dense_layers,
            f"must be between 0 and model.n_layers ({m.n_layers})")
    require(m.n_dense_layers == 0 or m.inter_dim > 0, "model.inter_dim", m.inter_dim,
            "must be > 0 when model.n_dense_layers > 0")
    require(m.q_lora_rank >= 0, "model.q_lora_rank", m.q_lora_rank, "must be >= 0 (0 = no query compression)")
    require(m.qk_rope_head_dim % 2 == 0, "model.qk_rope_head_dim", m.qk_rope_head_dim,
            "must be even (RoPE rotates pairs)")
    require(m.mtp_depth >= 0, "model.mtp_depth", m.mtp_depth, "must be >= 0")
    one_of("model.score_func", m.score_func, SCORE_FUNCS)
    require(m.route_scale > 0, "model.route_scale", m.route_scale, "must be > 0")
    has_moe = m.n_layers > m.n_dense_layers or m.mtp_depth > 0
    if has_moe:
        positive(m, "model", ["moe_inter_dim", "n_routed_experts", "n_activated_experts", "n_expert_groups",
                              "n_limited_groups"])
        require(m.n_shared_experts >= 0, "model.n_shared_experts", m.n_shared_experts, "must be >= 0")
        require(m.n_activated_experts <= m.n_routed_experts, "model.n_activated_experts", m.n_activated_experts,
                f"must be <= model.n_routed_experts ({m.n_routed_experts})")
        require(m.n_routed_experts % m.n_expert_groups == 0, "model.n_expert_groups", m.n_expert_groups,
                f"must divide model.n_routed_experts ({m.n_routed_experts}) into equal groups")
        require(m.n_limited_groups <= m.n_expert_groups, "model.n_limited_groups", m.n_limited_groups,
                f"must be <= model.n_expert_groups ({m.n_expert_groups})")
        per_group = m.n_routed_experts // m.n_expert_groups
        if m.n_expert_groups > 1:
            # The group score is the sum of the group's top-2 biased scores (official V3 routing).
            require(per_group >= 2, "model.n_expert_groups", m.n_expert_groups,
                    f"must leave >= 2 experts per group (model.n_routed_experts={m.n_routed_experts})")
        require(m.n_activated_experts <= m.n_limited_groups * per_group, "model.n_activated_experts",
                m.n_activated_experts,
                f"must be <= model.n_limited_groups * experts per group ({m.n_limited_groups * per_group})")
    if m.max_seq_len > m.original_seq_len:
        require(m.rope_factor >= 1, "model.rope_factor", m.rope_factor, "must be >= 1")
        limit = int(m.original_seq_len * m.rope_factor)
        require(m.max_seq_len <= limit, "model.max_seq_len", m.max_seq_len,
                f"YaRN supports at most model.original_seq_len * model.rope_factor = {limit} positions")


def model_rules(cfg: Config, world: World) -> None:
    check_model(cfg.model)


RULES = (model_rules,)
