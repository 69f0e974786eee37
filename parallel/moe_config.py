"""Config section owned by the MoE layer: `moe.*` (docs/moe.md). Torch-free, so the CLI
can compose and check a config without importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

GATES = ("softmax", "sigmoid")
DISPATCHES = ("flat", "hierarchical", "auto")


@dataclass
class MoEConfig:
    num_experts: int = 0
    """Routed experts per MoE layer; 0 = a dense model (every block has one SwiGLU)."""
    top_k: int = 2
    """Experts each token is sent to."""
    gate: str = "softmax"
    """Router gate: softmax (Switch, Mixtral, OLMoE) or sigmoid (DeepSeek-V3)."""
    norm_topk_prob: bool = True
    """Normalise each token's top-k weights to sum to 1."""
    capacity_factor: float = 0.0
    """Tokens an expert takes per micro-batch = ceil(factor x tokens x top_k / experts), the rest dropped; 0 = dropless."""
    aux_loss_coef: float = 0.01
    """Weight of the Switch/GShard load-balance loss; 0 disables it."""
    z_loss_coef: float = 0.001
    """Weight of the ST-MoE router z-loss; 0 disables it."""
    bias_update_rate: float = 0.0
    """DeepSeek-V3 auxiliary-loss-free balancing: per-expert selection bias step after each optimizer step; 0 = off."""
    shared_experts: int = 0
    """Shared experts every token also passes through (DeepSeek-V3 uses 1)."""
    expert_hidden: Optional[int] = None
    """Hidden size of one expert's SwiGLU; default the dense model's ffn hidden size."""
    max_nodes_per_token: int = 0
    """Node-limited routing: each token's experts on at most this many nodes; 0 = no limit."""
    dispatch: str = "auto"
    """Expert all-to-all: flat (one exchange over the EP group), hierarchical (each token crosses to a node once, then is forwarded inside it), auto (hierarchical when the EP group spans nodes)."""

    def errors(self) -> List[str]:
        errs = []
        if self.num_experts < 0:
            errs.append(f"moe.num_experts={self.num_experts} must be >= 0 (0 = dense)")
        if self.num_experts:
            if not 1 <= self.top_k <= self.num_experts:
                errs.append(f"moe.top_k={self.top_k} must be between 1 and moe.num_experts={self.num_experts}")
            if self.gate not in GATES:
                errs.append(f"moe.gate={self.gate!r} is not one of {list(GATES)}")
            if not self.capacity_factor >= 0:
                errs.append(f"moe.capacity_factor={self.capacity_factor} must be >= 0 (0 = dropless), e.g. 1.25")
            for key in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
                if not getattr(self, key) >= 0:
                    errs.append(f"moe.{key}={getattr(self, key)} must be >= 0")
            if self.shared_experts < 0:
                errs.append(f"moe.shared_experts={self.shared_experts} must be >= 0")
            if self.expert_hidden is not None and self.expert_hidden < 1:
                errs.append(f"moe.expert_hidden={self.expert_hidden} must be >= 1 or null")
            if self.dispatch not in DISPATCHES:
                errs.append(f"moe.dispatch={self.dispatch!r} is not one of {list(DISPATCHES)}")
            if self.max_nodes_per_token < 0:
                errs.append(f"moe.max_nodes_per_token={self.max_nodes_per_token} must be >= 0 (0 = no limit)")
        return errs


def node_layout(nodes: Sequence[int]) -> tuple:
    """(nodes spanned, EP members per node) of an EP group whose member i is on node nodes[i];
    the members must come node by node, the same number on each (EP groups are consecutive
    ranks, and nodes hold equal consecutive rank ranges)."""
    distinct = list(dict.fromkeys(nodes))
    per = len(nodes) // len(distinct)
    if list(nodes) != [n for n in distinct for _ in range(per)]:
        raise ValueError(f"EP members' nodes {list(nodes)} are not grouped node by node, the same number on each")
    return len(distinct), per


def expert_parallel_errors(cfg: MoEConfig, nodes: Sequence[int], *, ep_key: str = "parallel.ep") -> List[str]:
    """moe.dispatch and moe.max_nodes_per_token against the nodes the EP group spans (nodes[i]:
    EP member i's node); the fix named for each."""
    if not cfg.num_experts or len(nodes) < 2:
        return []
    num_nodes, per_node = node_layout(nodes)
    errs = []
    if cfg.dispatch == "hierarchical" and num_nodes == 1:
        errs.append(f"moe.dispatch=hierarchical needs an EP group that spans nodes, but {ep_key}={len(nodes)} "
                    f"keeps it inside one node; use moe.dispatch=flat (or auto), or a {ep_key} larger than the "
                    "ranks per node")
    if cfg.max_nodes_per_token > num_nodes:
        errs.append(f"moe.max_nodes_per_token={cfg.max_nodes_per_token} is more than the {num_nodes} node(s) the "
                    f"EP group spans ({ep_key}={len(nodes)}), so it limits nothing; use 0 (no limit) or at most "
                    f"{num_nodes}")
    per_node_experts = cfg.num_experts // num_nodes
    if cfg.max_nodes_per_token and cfg.max_nodes_per_token * per_node_experts < cfg.top_k:
        errs.append(f"moe.max_nodes_per_token={cfg.max_nodes_per_token} node(s) hold "
                    f"{cfg.max_nodes_per_token * per_node_experts} experts, fewer than moe.top_k={cfg.top_k}; raise "
                    f"moe.max_nodes_per_token to at least {-(-cfg.top_k // per_node_experts)} or lower moe.top_k")
    if cfg.dispatch != "flat" and num_nodes > 1 and per_node_experts > 256:
        errs.append(f"moe.dispatch={cfg.dispatch} sends each token's experts inside a node as bf16-exact integers: "
                    f"at most 256 experts per node, here {per_node_experts} (moe.num_experts={cfg.num_experts} over "
                    f"{num_nodes} nodes); use moe.dispatch=flat or a larger {ep_key}")
    return errs
