"""Hugging Face interoperability as pure data: which transformers class computes exactly what a
tierzero model computes, its config.json, the tensor names both ways, and the way back from a
Llama or Mixtral config.json to `model.*` / `moe.*` (docs/checkpoint.md, "Hugging Face").

tierzero's block is Llama's (RMSNorm, rotary attention in the GPT-NeoX half-split layout, SwiGLU,
no biases, as many key/value heads as query heads). Its MoE layer routes like Mixtral's
MixtralSparseMoeBlock when the gate is a softmax over all experts, the top-k weights are
renormalised, no shared expert runs and the DeepSeek-V3 selection bias is off; like GLM-4.5's
Glm4MoeMoE (sigmoid scores, e_score_correction_bias for selection only, ungated shared experts)
when the gate is a sigmoid and shared experts run. Anything else no class represents: the file
keeps the documented names below and config.json says so (no transformers class loads it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

LLAMA, MIXTRAL, GLM4_MOE = "LlamaForCausalLM", "MixtralForCausalLM", "Glm4MoeForCausalLM"
MODEL_TYPES = {LLAMA: "llama", MIXTRAL: "mixtral", GLM4_MOE: "glm4_moe"}
NO_CLASS_TYPE = "tierzero_moe"
"""config.json's model_type where no transformers class represents the model: from_pretrained refuses it."""


@dataclass(frozen=True)
class Architecture:
    """What a tierzero model computes, from a checkpoint's resolved config (`model.*`, `moe.*`)
    and its tensors (vocabulary, layers)."""
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    ffn_hidden: int
    rope_theta: float
    norm_eps: float
    tie_embeddings: bool
    seq_len: int
    num_experts: int = 0
    top_k: int = 0
    gate: str = "softmax"
    norm_topk_prob: bool = True
    bias_active: bool = False
    shared_experts: int = 0
    expert_hidden: int = 0
    max_nodes_per_token: int = 0
    capacity_factor: float = 0.0


@dataclass(frozen=True)
class Target:
    """The class an export is written for (None: no class) and why."""
    hf_class: Optional[str]
    unrepresented: Tuple[str, ...] = ()
    """Features of the model no transformers class computes (non-empty only when hf_class is None)."""
    notes: Tuple[str, ...] = ()
    """Differences that are not part of the weights' computation (said, not refused)."""

    @property
    def moe_names(self) -> str:
        return "mixtral" if self.hf_class == MIXTRAL else "deepseek"


def choose_class(a: Architecture) -> Target:
    """The transformers class whose forward equals tierzero's for this architecture."""
    notes = []
    if a.num_experts and a.capacity_factor:
        notes.append(f"moe.capacity_factor={a.capacity_factor:g} drops tokens past an expert's capacity inside "
                     "a batch; the exported model is dropless (every token reaches its top-k experts)")
    if not a.num_experts:
        return Target(LLAMA, notes=tuple(notes))
    missing = []
    if a.max_nodes_per_token:
        missing.append(f"node-limited routing (moe.max_nodes_per_token={a.max_nodes_per_token}) depends on the "
                       "run's expert-parallel layout")
    if a.gate == "softmax" and not a.shared_experts and not a.bias_active and a.norm_topk_prob and not missing:
        return Target(MIXTRAL, notes=tuple(notes))
    if a.gate == "sigmoid" and a.shared_experts and not missing:
        return Target(GLM4_MOE, notes=tuple(notes))
    if a.gate == "softmax":
        if not a.norm_topk_prob:
            missing.append("softmax top-k weights left unnormalised (moe.norm_topk_prob=false): Mixtral always "
                           "renormalises; Qwen2-MoE, Qwen3-MoE and OLMoE add a gated shared expert, attention "
                           "biases or QK-norm")
        if a.shared_experts:
            missing.append(f"an ungated shared expert (moe.shared_experts={a.shared_experts}) beside a softmax "
                           "gate: Qwen2-MoE gates its shared expert with a sigmoid, GLM-4.5 and DeepSeek-V3 "
                           "route with sigmoid scores")
        if a.bias_active:
            missing.append("the auxiliary-loss-free selection bias (moe.bias_update_rate > 0) on softmax scores: "
                           "GLM-4.5 and DeepSeek-V3 add it to sigmoid scores")
    elif not a.shared_experts:
        missing.append("sigmoid routing without a shared expert (moe.shared_experts=0): GLM-4.5 always runs "
                       "one, DeepSeek-V3 uses multi-head latent attention")
    return Target(None, tuple(missing), tuple(notes))


# ---- tensor names -------------------------------------------------------------------------------

# tierzero name -> HF name (per layer {0}); the fused qkv and the stacked experts are split.
_PLAIN = [
    (r"^tok_embeddings\.weight$", "model.embed_tokens.weight"),
    (r"^output\.weight$", "lm_head.weight"),
    (r"^norm\.weight$", "model.norm.weight"),
    (r"^blocks\.(\d+)\.attn_norm\.weight$", "model.layers.{0}.input_layernorm.weight"),
    (r"^blocks\.(\d+)\.mlp_norm\.weight$", "model.layers.{0}.post_attention_layernorm.weight"),
    (r"^blocks\.(\d+)\.attn\.wo\.weight$", "model.layers.{0}.self_attn.o_proj.weight"),
    (r"^blocks\.(\d+)\.mlp\.w_(gate|up|down)\.weight$", "model.layers.{0}.mlp.{1}_proj.weight"),
]
_ROUTER = re.compile(r"^blocks\.(\d+)\.mlp\.router\.weight$")
_BIAS = re.compile(r"^blocks\.(\d+)\.mlp\.expert_bias$")
_SHARED = re.compile(r"^blocks\.(\d+)\.mlp\.shared\.w_(gate|up|down)\.weight$")
_QKV = re.compile(r"^blocks\.(\d+)\.attn\.wqkv\.weight$")
_EXPERTS = re.compile(r"^blocks\.(\d+)\.mlp\.experts\.w_(gate|up|down)$")
MIXTRAL_W = {"gate": "w1", "down": "w2", "up": "w3"}
"""Mixtral's expert names: w1 = gate, w3 = up, w2 = down (MixtralBlockSparseTop2MLP)."""


def hf_tensors(name: str, value: np.ndarray, moe_names: str = "deepseek") -> Iterator[Tuple[str, np.ndarray]]:
    """The HF-named tensors one tierzero tensor becomes. MoE names: "mixtral"
    (block_sparse_moe.gate, block_sparse_moe.experts.{e}.w1/w3/w2) or "deepseek" (GLM-4.5 and
    DeepSeek-V3's mlp.gate, mlp.gate.e_score_correction_bias, mlp.experts.{e}.{gate,up,down}_proj,
    mlp.shared_experts.{gate,up,down}_proj)."""
    m = _QKV.match(name)
    if m:
        for part, chunk in zip(("q", "k", "v"), np.split(value, 3, axis=0)):  # rows: q, k, v
            yield f"model.layers.{m.group(1)}.self_attn.{part}_proj.weight", chunk
        return
    m = _EXPERTS.match(name)
    if m:
        layer, kind = m.groups()
        for e in range(value.shape[0]):  # ours [E, in, out] for x @ W; nn.Linear stores [out, in]
            if moe_names == "mixtral":
                yield f"model.layers.{layer}.block_sparse_moe.experts.{e}.{MIXTRAL_W[kind]}.weight", value[e].T
            else:
                yield f"model.layers.{layer}.mlp.experts.{e}.{kind}_proj.weight", value[e].T
        return
    m = _ROUTER.match(name)
    if m:
        block = "block_sparse_moe" if moe_names == "mixtral" else "mlp"
        yield f"model.layers.{m.group(1)}.{block}.gate.weight", value
        return
    m = _BIAS.match(name)
    if m:
        yield f"model.layers.{m.group(1)}.mlp.gate.e_score_correction_bias", value
        return
    m = _SHARED.match(name)
    if m:
        yield f"model.layers.{m.group(1)}.mlp.shared_experts.{m.group(2)}_proj.weight", value
        return
    for pattern, template in _PLAIN:
        m = re.match(pattern, name)
        if m:
            yield template.format(*m.groups()), value
            return
    raise ValueError(f"no Hugging Face name for tensor {name!r}")


# HF name -> (tierzero name template, how): every naming tierzero writes or reads
_BACK_PLAIN = [
    (r"^model\.embed_tokens\.weight$", "tok_embeddings.weight"),
    (r"^lm_head\.weight$", "output.weight"),
    (r"^model\.norm\.weight$", "norm.weight"),
    (r"^model\.layers\.(\d+)\.input_layernorm\.weight$", "blocks.{0}.attn_norm.weight"),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.weight$", "blocks.{0}.mlp_norm.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.weight$", "blocks.{0}.attn.wo.weight"),
    (r"^model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight$", "blocks.{0}.mlp.w_{1}.weight"),
    (r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.gate\.weight$", "blocks.{0}.mlp.router.weight"),
    (r"^model\.layers\.(\d+)\.mlp\.gate\.e_score_correction_bias$", "blocks.{0}.mlp.expert_bias"),
    # shared_experts: GLM-4.5 / DeepSeek-V3; shared_expert: what tierzero wrote before (ungated)
    (r"^model\.layers\.(\d+)\.mlp\.shared_experts?\.(gate|up|down)_proj\.weight$", "blocks.{0}.mlp.shared.w_{1}.weight"),
]
_BACK_QKV = re.compile(r"^model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.weight$")
_BACK_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:mlp\.experts\.(\d+)\.(gate|up|down)_proj"
                          r"|block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3))\.weight$")
_FROM_MIXTRAL_W = {v: k for k, v in MIXTRAL_W.items()}


def tierzero_tensors(hf: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The inverse of hf_tensors over a whole file, for Llama, Mixtral, GLM-4.5-style and
    tierzero's own names."""
    out: Dict[str, np.ndarray] = {}
    layer_parts: Dict[Tuple[str, str], Dict] = {}
    for name, value in hf.items():
        m = _BACK_QKV.match(name)
        if m:
            layer_parts.setdefault(("qkv", m.group(1)), {})[m.group(2)] = value
            continue
        m = _BACK_EXPERT.match(name)
        if m:
            layer, e, kind, e_mixtral, w = m.groups()
            kind = kind or _FROM_MIXTRAL_W[w]
            layer_parts.setdefault((f"experts.{kind}", layer), {})[int(e if e is not None else e_mixtral)] = value.T
            continue
        for pattern, template in _BACK_PLAIN:
            m = re.match(pattern, name)
            if m:
                out[template.format(*m.groups())] = value
                break
        else:
            raise ValueError(f"{name!r} is not a tensor of a Llama, Mixtral or tierzero model "
                             "(see docs/checkpoint.md, \"Hugging Face\", for the names tierzero reads)")
    for (kind, layer), parts in layer_parts.items():
        if kind == "qkv":
            missing = [p for p in "qkv" if p not in parts]
            if missing:
                raise ValueError(f"layer {layer} has no self_attn.{'/'.join(missing)}_proj.weight beside the others")
            shapes = {p: tuple(parts[p].shape) for p in "qkv"}
            if len(set(shapes.values())) != 1:
                raise ValueError(f"layer {layer}'s q/k/v projections have shapes {shapes}: tierzero has as many "
                                 "key/value heads as query heads (no grouped-query attention)")
            out[f"blocks.{layer}.attn.wqkv.weight"] = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
        else:
            if sorted(parts) != list(range(len(parts))):
                raise ValueError(f"layer {layer}'s experts are numbered {sorted(parts)[:8]}, not 0..{len(parts) - 1}")
            shapes = {tuple(p.shape) for p in parts.values()}
            if len(shapes) != 1:
                raise ValueError(f"layer {layer}'s {kind} experts have different shapes {sorted(shapes)[:3]}")
            out[f"blocks.{layer}.mlp.experts.w_{kind.split('.')[1]}"] = np.stack([parts[e] for e in sorted(parts)])
    return out


# ---- config.json out -----------------------------------------------------------------------------

def hf_config(a: Architecture, target: Target, dtype: str) -> dict:
    """config.json for `target` (transformers 5 names; rope_theta also at the top level for 4.x)."""
    cfg = {
        "architectures": [target.hf_class] if target.hf_class else [],
        "model_type": MODEL_TYPES.get(target.hf_class, NO_CLASS_TYPE),
        "vocab_size": a.vocab_size, "hidden_size": a.d_model, "intermediate_size": a.ffn_hidden,
        "num_hidden_layers": a.n_layers, "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_heads,
        "head_dim": a.d_model // a.n_heads, "hidden_act": "silu", "max_position_embeddings": a.seq_len,
        "rms_norm_eps": a.norm_eps, "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta},
        "rope_theta": a.rope_theta, "tie_word_embeddings": a.tie_embeddings, "attention_bias": False,
        "attention_dropout": 0.0, "use_cache": True, "dtype": dtype,
    }
    if target.hf_class == LLAMA:
        cfg["mlp_bias"] = False
    elif target.hf_class == MIXTRAL:
        cfg.update(num_local_experts=a.num_experts, num_experts_per_tok=a.top_k, intermediate_size=a.expert_hidden,
                   sliding_window=None, router_jitter_noise=0.0, output_router_logits=False)
    elif target.hf_class == GLM4_MOE:
        cfg.update(n_routed_experts=a.num_experts, num_experts_per_tok=a.top_k, moe_intermediate_size=a.expert_hidden,
                   n_shared_experts=a.shared_experts, norm_topk_prob=a.norm_topk_prob, routed_scaling_factor=1.0,
                   n_group=1, topk_group=1, first_k_dense_replace=0, use_qk_norm=False, num_nextn_predict_layers=0)
        cfg["rope_parameters"]["partial_rotary_factor"] = 1.0
        cfg["partial_rotary_factor"] = 1.0
    else:
        cfg["tierzero_moe"] = {"num_experts": a.num_experts, "top_k": a.top_k, "gate": a.gate,
                               "norm_topk_prob": a.norm_topk_prob, "shared_experts": a.shared_experts,
                               "expert_hidden": a.expert_hidden, "selection_bias": a.bias_active,
                               "max_nodes_per_token": a.max_nodes_per_token}
        cfg["tierzero_unrepresented"] = list(target.unrepresented)
    return cfg


# ---- config.json in: model.from_hf ---------------------------------------------------------------

def _rope(cfg: dict) -> Tuple[Optional[float], List[str]]:
    """rope theta, and the rope settings tierzero does not compute (scaling, partial rotary)."""
    params = cfg.get("rope_parameters")
    params = params if isinstance(params, dict) else {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    bad = []
    kind = params.get("rope_type", "default")
    if kind not in ("default", None):
        bad.append(f"rope_parameters.rope_type={kind!r}")
    scaling = cfg.get("rope_scaling")
    if scaling not in (None, {}) and not (isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type"))
                                          in ("default", None) and len(scaling) <= 2):
        bad.append(f"rope_scaling={str(scaling)[:80]}")
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial not in (1, 1.0, None):
        bad.append(f"partial_rotary_factor={partial}")
    return theta, bad


def _int(cfg: dict, key: str, problems: List[str], where: str, default=None) -> int:
    value = cfg.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        problems.append(f"model.from_hf={where}: config.json's {key}={str(value)[:40]} is not a positive integer")
        return 1
    return value


def settings_from_hf(cfg: dict, *, where: str, seq_len: int) -> Tuple[Dict[str, object], List[str]]:
    """The `model.*` / `moe.*` / `data.vocab_size` values a Llama or Mixtral config.json describes
    ({dotted key: value}), and the problems: unsupported model types, and fields whose values
    change the computation in ways tierzero does not compute (each named with its value)."""
    problems: List[str] = []
    if not isinstance(cfg, dict):
        return {}, [f"model.from_hf={where}: config.json is a JSON {type(cfg).__name__}, not an object"]
    kind = cfg.get("model_type")
    if kind not in ("llama", "mixtral"):
        return {}, [f"model.from_hf={where}: config.json's model_type={str(kind)[:40]!r} is not one tierzero builds; "
                    "it reads 'llama' and 'mixtral' (a model tierzero exported for another class is read back with "
                    "checkpoint.init_from and its model.* / moe.* set by hand)"]
    d = _int(cfg, "hidden_size", problems, where)
    heads = _int(cfg, "num_attention_heads", problems, where)
    out: Dict[str, object] = {
        "model.d_model": d, "model.n_layers": _int(cfg, "num_hidden_layers", problems, where),
        "model.n_heads": heads, "model.ffn_hidden": _int(cfg, "intermediate_size", problems, where),
        "model.norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        "model.tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "data.vocab_size": _int(cfg, "vocab_size", problems, where),
    }
    theta, unsupported = _rope(cfg)
    if isinstance(theta, (int, float)) and not isinstance(theta, bool) and theta > 0:
        out["model.rope_theta"] = float(theta)
    else:
        problems.append(f"model.from_hf={where}: config.json's rope_theta={str(theta)[:40]} is not a positive number")
    kv = cfg.get("num_key_value_heads", heads)
    if kv not in (None, heads):
        unsupported.append(f"num_key_value_heads={kv} (grouped-query attention; tierzero has num_attention_heads="
                           f"{heads} key/value heads)")
    head_dim = cfg.get("head_dim")
    if head_dim is not None and isinstance(d, int) and head_dim != d // max(heads, 1):
        unsupported.append(f"head_dim={head_dim} (tierzero's is hidden_size / num_attention_heads = {d // max(heads, 1)})")
    if cfg.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={cfg.get('hidden_act')!r}")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            unsupported.append(f"{key}={cfg.get(key)}")
    if cfg.get("attention_dropout", 0.0):
        unsupported.append(f"attention_dropout={cfg.get('attention_dropout')}")
    if kind == "mixtral":
        out.update({"moe.num_experts": _int(cfg, "num_local_experts", problems, where),
                    "moe.top_k": _int(cfg, "num_experts_per_tok", problems, where), "moe.gate": "softmax",
                    "moe.norm_topk_prob": True, "moe.shared_experts": 0, "moe.expert_hidden": out["model.ffn_hidden"]})
        window = cfg.get("sliding_window")
        if window is not None and (not isinstance(window, int) or window < seq_len):
            unsupported.append(f"sliding_window={window} (shorter than data.seq_len={seq_len}: it changes the "
                               "attention; tierzero attends to the whole sequence)")
        if cfg.get("router_jitter_noise", 0.0):
            unsupported.append(f"router_jitter_noise={cfg.get('router_jitter_noise')}")
    else:
        out["moe.num_experts"] = 0
    if unsupported:
        problems.append(f"model.from_hf={where}: config.json sets {', '.join(unsupported)}, which tierzero does not "
                        "compute; continuing from these weights would train a different model. Use a checkpoint "
                        f"without {'these' if len(unsupported) > 1 else 'it'}, or build model.* / moe.* by hand "
                        "without model.from_hf")
    return out, problems
