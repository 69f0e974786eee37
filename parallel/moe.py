"""Mixture-of-Experts feed-forward with expert parallelism (docs/moe.md).

One layer: a router (fp32 logits; softmax or sigmoid gates; top-k; optionally normalised
top-k weights), capacity-limited or dropless assignment, dispatch of each token to the
expert-parallel rank that holds its expert with an all-to-all of uneven splits, the local
experts as batched matmuls (tokens padded per expert into one [experts, tokens, d] batch:
no Python loop over tokens or experts), the way back with the reverse all-to-all, and the
weighted combine. Optional shared experts see every token.

Balancing: the Switch / GShard auxiliary loss E * sum_e f_e P_e (Fedus et al. 2021, eq. 4),
the router z-loss mean(logsumexp(logits)^2) (Zoph et al. 2022, ST-MoE eq. 5), and
DeepSeek-V3's auxiliary-loss-free bias (Liu et al. 2024, section 2.1.2): a per-expert bias
added to the scores for selection only, moved by `bias_update_rate` towards balance after
every optimizer step from the load observed over the global batch. Node-limited routing
(DeepSeek-V3): a token's experts lie on at most `max_nodes_per_token` nodes, the nodes
chosen by the sum of their best top_k / M scores.

Expert parallelism: the EP group is ep consecutive ranks (the fastest level that holds
them); EP rank j holds experts j*E/ep .. (j+1)*E/ep - 1. The expert weights are stored
[local experts, ...] so the engine can shard them, like any unit, over the ranks that hold
the same experts (the expert-data-parallel group).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tierzero.parallel.host import to_host
from tierzero.parallel.moe_config import MoEConfig, node_layout  # the layer's config, torch-free (re-exported)


# ---- routing (pure tensor functions) ---------------------------------------------------------

def route(logits: torch.Tensor, *, top_k: int, gate: str, norm_topk_prob: bool,
          bias: Optional[torch.Tensor] = None, expert_node: Optional[torch.Tensor] = None,
          max_nodes: int = 0, num_nodes: Optional[int] = None):
    """logits [T, E] (fp32) -> (expert index [T, k], weight [T, k], gate scores [T, E]).

    The bias only changes which experts are selected, never the weights (DeepSeek-V3).
    `expert_node[e]` is the node holding expert e; experts must be grouped by node; `num_nodes`
    is max(expert_node) + 1 if the caller knows it (else it is read from the device)."""
    scores = logits.softmax(-1) if gate == "softmax" else logits.sigmoid()
    select = scores if bias is None else scores + bias
    if max_nodes and expert_node is not None:
        if num_nodes is None:
            num_nodes = int(expert_node.max()) + 1
        if num_nodes > max_nodes:
            T, E = select.shape
            if top_k > max_nodes * (E // num_nodes):
                raise ValueError(
                    f"moe.top_k={top_k} experts cannot fit on moe.max_nodes_per_token={max_nodes} node(s) holding "
                    f"{E // num_nodes} experts each; raise moe.max_nodes_per_token or lower moe.top_k"
                )
            per_node = select.view(T, num_nodes, E // num_nodes)  # [T, nodes, experts per node]
            best = per_node.topk(min(E // num_nodes, max(1, top_k // max_nodes)), dim=-1).values.sum(-1)  # [T, nodes]
            chosen = best.topk(max_nodes, dim=-1).indices  # [T, M]
            allowed = torch.zeros(T, num_nodes, dtype=torch.bool, device=logits.device)
            allowed.scatter_(1, chosen, True)
            select = select.masked_fill(~allowed[:, expert_node], float("-inf"))
    idx = select.topk(top_k, dim=-1).indices  # [T, k], best first
    weight = scores.gather(1, idx)
    if norm_topk_prob:
        weight = weight / weight.sum(-1, keepdim=True)
    return idx, weight, scores


def capacity(num_tokens: int, num_experts: int, top_k: int, factor: float) -> int:
    """Switch Transformer's expert capacity for one micro-batch of num_tokens."""
    return math.ceil(factor * num_tokens * top_k / num_experts)


def keep_mask(idx: torch.Tensor, num_experts: int, cap: int) -> torch.Tensor:
    """[T, k] bool: which assignments fit their expert's capacity. GShard's priority: every
    token's first choice before any second choice; within a choice, tokens in order."""
    T, k = idx.shape
    flat = idx.t().reshape(-1)  # [k*T], choice-major
    onehot = F.one_hot(flat, num_experts)  # [k*T, E]
    position = onehot.cumsum(0).gather(1, flat[:, None]).squeeze(1) - 1  # place in its expert's queue
    return (position < cap).view(k, T).t()


def balance_loss(scores: torch.Tensor, idx: torch.Tensor, num_experts: int, gate: str) -> torch.Tensor:
    """Switch/GShard: E * sum_e f_e * P_e, f_e = share of assignments routed to e (before
    dropping), P_e = mean gate probability of e (sigmoid scores normalised per token)."""
    probs = scores if gate == "softmax" else scores / scores.sum(-1, keepdim=True)
    f = torch.bincount(idx.reshape(-1), minlength=num_experts).to(probs.dtype) / idx.numel()
    return num_experts * (f * probs.mean(0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


# ---- autograd pieces -------------------------------------------------------------------------

class _AttachLoss(torch.autograd.Function):
    """Return `out` unchanged; in backward also give `loss` the gradient `scale`, so an
    auxiliary loss computed inside a block is trained by the block's own backward pass
    (the engine runs backward block by block and never sees the term)."""

    @staticmethod
    def forward(ctx, out, loss, scale: float):
        ctx.scale = scale
        ctx.loss_shape = loss.shape
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_full(ctx.loss_shape, ctx.scale, dtype=torch.float32), None


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; its gradient is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, ep: "ExpertParallel"):
        ctx.send_splits, ctx.recv_splits, ctx.ep = send_splits, recv_splits, ep
        return ep.all_to_all(x, send_splits, recv_splits, "fwd")

    @staticmethod
    def backward(ctx, grad):
        return ctx.ep.all_to_all(grad.contiguous(), ctx.recv_splits, ctx.send_splits, "bwd"), None, None, None


@dataclass
class ExpertParallel:
    """This rank's expert-parallel group, as the MoE layer needs it."""
    pg: Optional[object]
    """torch ProcessGroup of the EP group (None = the world)."""
    ranks: tuple
    index: int
    """This rank's position in the EP group = which block of experts it holds."""
    level: str
    """Topology level the EP group spans (for the byte ledger)."""
    nodes: tuple
    """Node of each EP member, for node-limited routing and hierarchical dispatch."""
    ledger: Optional[object] = None
    member_levels: tuple = ()
    """The topology level between this rank and each EP member (the ledger books what is sent to
    a member at that level); empty = everything at `level`."""
    hierarchical: bool = False
    """moe.dispatch: each token crosses to a node once (to this rank's peer there), then is
    forwarded inside the node to its experts (MoEFeedForward._dispatch_hierarchical)."""

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def num_nodes(self) -> int:
        return node_layout(self.nodes)[0]

    @property
    def ranks_per_node(self) -> int:
        return node_layout(self.nodes)[1]

    def all_to_all(self, x: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int], phase: str):
        out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
        if self.ledger is not None:
            self.ledger.all_to_all(out, x, list(recv_splits), list(send_splits), self, phase,
                                   member_levels=self.member_levels or None)
        else:
            dist.all_to_all_single(out, x, list(recv_splits), list(send_splits), group=self.pg)
        return out


# ---- the layer -------------------------------------------------------------------------------

class SwiGLU(nn.Module):
    """w_down(silu(w_gate x) * w_up x) (Shazeer 2020): the dense feed-forward, and the MoE
    layer's shared experts (one SwiGLU of hidden h x shared_experts that every token passes)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_up = nn.Linear(d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Experts(nn.Module):
    """The routed experts this rank holds, as stacked SwiGLU weights."""

    def __init__(self, num_local: int, d_model: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(num_local, d_model, hidden))
        self.w_up = nn.Parameter(torch.empty(num_local, d_model, hidden))
        self.w_down = nn.Parameter(torch.empty(num_local, hidden, d_model))

    def forward(self, x: torch.Tensor, expert: torch.Tensor, per_expert: torch.Tensor, most: int) -> torch.Tensor:
        """x [N, d] sorted by expert; expert [N] its local expert; per_expert [E_local] counts;
        most = max(per_expert), read by the caller -> [N, d]."""
        num_local = self.w_gate.shape[0]
        # even with no rows the graph stays connected: every EP rank must run the backward all-to-all
        start = torch.cumsum(per_expert, 0) - per_expert
        slot = torch.arange(x.shape[0], device=x.device) - start[expert]  # row inside its expert's batch
        batch = x.new_zeros(num_local, most, x.shape[1]).index_put((expert, slot), x)  # [E_local, most, d]
        h = F.silu(torch.bmm(batch, self.w_gate)) * torch.bmm(batch, self.w_up)  # [E_local, most, h]
        return torch.bmm(h, self.w_down)[expert, slot]  # padding rows are zero in and zero out


class MoEFeedForward(nn.Module):
    """Routed SwiGLU experts (+ shared experts). Parameter names (checkpoint format):
    router.weight [E, d]; experts.w_gate / w_up [E_local, d, h]; experts.w_down [E_local, h, d];
    shared.w_gate / w_up / w_down (a SwiGLU of hidden h x shared_experts)."""

    def __init__(self, d_model: int, hidden: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.router = nn.Linear(d_model, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, d_model, hidden)
        self.shared = SwiGLU(d_model, hidden * cfg.shared_experts) if cfg.shared_experts else None
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts), persistent=True)
        self.ep: Optional[ExpertParallel] = None
        self.aux_grad_scale = 1.0
        """d(total loss)/d(aux loss) of the current micro-step: the engine's loss scale."""
        self._stats: Optional[dict] = None

    @torch.no_grad()
    def init_weights(self, std: float, out_proj_std: float) -> None:
        """Normal(0, std) in, Normal(0, out_proj_std) out (into the residual), for ALL experts:
        call before bind_expert_parallel, so every layout starts from the same global weights."""
        nn.init.normal_(self.router.weight, mean=0.0, std=std)
        nn.init.normal_(self.experts.w_gate, mean=0.0, std=std)
        nn.init.normal_(self.experts.w_up, mean=0.0, std=std)
        nn.init.normal_(self.experts.w_down, mean=0.0, std=out_proj_std)
        if self.shared is not None:
            for lin, sd in ((self.shared.w_gate, std), (self.shared.w_up, std), (self.shared.w_down, out_proj_std)):
                nn.init.normal_(lin.weight, mean=0.0, std=sd)
        self.expert_bias.zero_()

    def bind_expert_parallel(self, ep: ExpertParallel) -> None:
        """Keep only this EP rank's experts (a slice of the global ones) and talk to the group."""
        if self.num_experts % ep.size:
            raise ValueError(f"moe.num_experts={self.num_experts} is not divisible by parallel.ep={ep.size}")
        n = self.num_experts // ep.size
        lo = ep.index * n
        for name in ("w_gate", "w_up", "w_down"):
            full = getattr(self.experts, name)
            setattr(self.experts, name, nn.Parameter(full.data[lo:lo + n].clone()))
        self.ep = ep

    @property
    def num_local(self) -> int:
        return self.experts.w_gate.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        shape = x.shape
        xf = x.reshape(-1, shape[-1])  # [T, d]
        T, E, k = xf.shape[0], self.num_experts, cfg.top_k
        logits = F.linear(xf.float(), self.router.weight.float())  # [T, E], routing in fp32
        expert_node, num_nodes = None, None
        if cfg.max_nodes_per_token and self.ep is not None:
            per_rank = E // self.ep.size
            expert_node = torch.tensor(self.ep.nodes, device=x.device).repeat_interleave(per_rank)
            num_nodes = max(self.ep.nodes) + 1
        bias = self.expert_bias if cfg.bias_update_rate else None
        idx, weight, scores = route(logits, top_k=k, gate=cfg.gate, norm_topk_prob=cfg.norm_topk_prob,
                                    bias=bias, expert_node=expert_node, max_nodes=cfg.max_nodes_per_token,
                                    num_nodes=num_nodes)
        keep = (keep_mask(idx, E, capacity(T, E, k, cfg.capacity_factor)) if cfg.capacity_factor
                else torch.ones_like(idx, dtype=torch.bool))

        token = torch.arange(T, device=x.device).repeat_interleave(k)[keep.reshape(-1)]
        expert = idx.reshape(-1)[keep.reshape(-1)]
        w = weight.reshape(-1)[keep.reshape(-1)]
        order = torch.argsort(expert, stable=True)
        token, expert, w = token[order], expert[order], w[order]
        off = None  # kept assignments to experts on other nodes (statistics; stays on the device)
        if self.ep is not None and self.ep.num_nodes > 1:
            off = ((expert // (E // self.ep.num_nodes)) != self.ep.index // self.ep.ranks_per_node).sum()
        cross = None  # [2]: those assignments, and the rows dispatch sent across for them
        if self.ep is not None and self.ep.hierarchical:
            out, rows = self._dispatch_hierarchical(xf, token, expert, w)
            cross = torch.stack([off, rows])
        else:
            if off is not None:
                cross = torch.stack([off, off])  # flat: one row per assignment
            counts = torch.bincount(expert, minlength=E)  # [E] kept assignments per expert
            y = self._dispatch(xf[token], counts)  # [A, d], one row per kept assignment
            out = torch.zeros_like(xf).index_add(0, token, y * w[:, None].to(y.dtype))
        if self.shared is not None:
            out = out + self.shared(xf)

        aux = logits.new_zeros(())
        routed = torch.bincount(idx.reshape(-1), minlength=E)
        if cfg.aux_loss_coef:
            aux = aux + cfg.aux_loss_coef * balance_loss(scores, idx, E, cfg.gate)
        zl = z_loss(logits) if cfg.z_loss_coef else logits.new_zeros(())
        if cfg.z_loss_coef:
            aux = aux + cfg.z_loss_coef * zl
        if self.training and aux.requires_grad:
            out = _AttachLoss.apply(out, aux, self.aux_grad_scale)
        self._record(routed, keep.numel() - keep.sum(), keep.numel(), aux.detach(), zl.detach(), cross)
        return out.view(shape)

    def _dispatch(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert -> the expert outputs in the same order, across the EP group."""
        ep = self.ep.size if self.ep is not None else 1
        local = self.num_local
        by_dest = counts.view(ep, local)  # [EP rank, its experts]
        if ep > 1:
            recv_counts = torch.empty_like(by_dest)
            dist.all_to_all_single(recv_counts, by_dest.contiguous(), group=self.ep.pg)  # [source, my experts]
            per_expert = recv_counts.sum(0)
            # one host read per layer: the all-to-all split sizes and the largest expert batch
            sizes = to_host(torch.cat([by_dest.sum(1), recv_counts.sum(1), per_expert.max().reshape(1)]), "moe")
            send, recv, most = sizes[:ep], sizes[ep:2 * ep], sizes[-1]
            xs = _AllToAll.apply(xs, send, recv, self.ep)
        else:
            recv_counts = by_dest
            per_expert = recv_counts.sum(0)
            most = to_host(per_expert.max(), "moe")
        # rows arrive grouped by source, then by my expert: regroup expert-major
        expert = torch.repeat_interleave(torch.arange(local, device=xs.device).repeat(recv_counts.shape[0]),
                                         recv_counts.reshape(-1))
        perm = torch.argsort(expert, stable=True)
        out = self.experts(xs[perm], expert[perm], per_expert, most)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)  # undo the regrouping without a sort
        out = out[inverse]
        if ep > 1:
            out = _AllToAll.apply(out, recv, send, self.ep)
        return out

    def _dispatch_hierarchical(self, xf: torch.Tensor, token: torch.Tensor, expert: torch.Tensor,
                               w: torch.Tensor):
        """moe.dispatch=hierarchical: (the weighted expert outputs [T, d] of the kept assignments
        (token, expert, w), sorted by expert, with each token crossing to a node at most once;
        the rows stage 1 sent to other nodes, a device scalar).

        Stage 1 sends one row per (token, destination node) to this rank's peer on that node
        (the member at the same position inside it): the token, and its weights and expert ids
        on that node (k columns each, id -1 = none). Stage 2 is the flat exchange inside the
        node (`_dispatch`, splits to other nodes zero). The peer sums its node's weighted
        outputs per row, and stage 1 in reverse brings one row per (token, node) back: the
        combine is reduced inside the node before the cross-node hop (DeepSeek-V3, section 3.2)."""
        ep, k = self.ep, self.cfg.top_k
        T, d = xf.shape
        num_nodes, per_node = ep.num_nodes, ep.ranks_per_node
        per_node_experts = self.num_experts // num_nodes
        node = expert // per_node_experts  # [A] destination node of each assignment
        pair, inv = torch.unique(node * T + token, return_inverse=True)  # (node, token) pairs, node-major
        order = torch.argsort(inv, stable=True)  # assignments grouped by pair, experts ascending inside
        inv, local, w = inv[order], (expert - node * per_node_experts)[order], w[order]
        per_pair = torch.bincount(inv, minlength=pair.numel())
        slot = torch.arange(inv.numel(), device=xf.device) - (torch.cumsum(per_pair, 0) - per_pair)[inv]
        weights = xf.new_zeros(pair.numel(), k).index_put((inv, slot), w.to(xf.dtype))  # [R, k]
        ids = xf.new_full((pair.numel(), k), -1.0).index_put((inv, slot), local.to(xf.dtype))  # [R, k]
        pair_token = pair % T
        payload = torch.cat([xf[pair_token], weights, ids], dim=1)  # [R, d + 2k]

        # stage 1: the rows for node n go to member n * per_node + (my position inside my node)
        send = torch.zeros(ep.size, dtype=torch.long, device=xf.device)
        send[torch.arange(num_nodes, device=xf.device) * per_node + ep.index % per_node] = torch.bincount(
            pair // T, minlength=num_nodes)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=ep.pg)
        sizes = to_host(torch.cat([send, recv]), "moe")  # one host read: the split sizes
        send_splits, recv_splits = sizes[:ep.size], sizes[ep.size:]
        got = _AllToAll.apply(payload, send_splits, recv_splits, ep)  # [R_in, d + 2k]

        # stage 2, at the peer: one row per assignment on this node, sorted by expert, exchanged inside it
        rows_in = got.shape[0]
        rid = got[:, d + k:].detach().round().long()  # [R_in, k]
        valid = (rid >= 0).reshape(-1)
        row = torch.arange(rows_in, device=xf.device).repeat_interleave(k)[valid]
        g = (ep.index // per_node) * per_node_experts + rid.reshape(-1)[valid]  # global expert ids
        aw = got[:, d:d + k].reshape(-1)[valid]
        by_expert = torch.argsort(g, stable=True)
        row, g, aw = row[by_expert], g[by_expert], aw[by_expert]
        y = self._dispatch(got[:, :d][row], torch.bincount(g, minlength=self.num_experts))  # [A_in, d]
        node_sum = got.new_zeros(rows_in, d).index_add(0, row, y * aw[:, None].to(y.dtype))  # [R_in, d]

        back = _AllToAll.apply(node_sum, recv_splits, send_splits, ep)  # [R, d]: one per (token, node)
        across = send.sum() - send[ep.index]  # the peer on my own node is me
        return torch.zeros_like(xf).index_add(0, pair_token, back.to(xf.dtype)), across

    # ---- statistics and balancing ----------------------------------------------------------
    def _record(self, routed, dropped: int, assignments: int, aux, zl, cross=None) -> None:
        s = self._stats
        if s is None:
            s = self._stats = {"tokens": torch.zeros_like(routed), "dropped": 0, "assignments": 0,
                               "aux": torch.zeros_like(aux), "z": torch.zeros_like(zl), "calls": 0,
                               "cross": torch.zeros(2, dtype=torch.long, device=routed.device)}
        if cross is not None:
            s["cross"] += cross  # on the device: no host sync per layer
        s["tokens"] += routed
        s["dropped"] += dropped
        s["assignments"] += assignments
        s["aux"] += aux  # stays on the device: no host sync per layer
        s["z"] += zl
        s["calls"] += 1

    def take_stats(self) -> Optional[dict]:
        """This rank's routing since the last call: tokens routed per expert, dropped and total
        assignments, summed aux and z losses, the number of micro-batches, and `cross`: kept
        assignments to experts on another node and the rows dispatch sent across for them (flat:
        one per assignment; hierarchical: one per token and node)."""
        s, self._stats = self._stats, None
        if s is not None:
            s["aux"], s["z"], s["dropped"] = float(s["aux"]), float(s["z"]), int(s["dropped"])
        return s

    @torch.no_grad()
    def update_bias(self, global_tokens: torch.Tensor) -> None:
        """DeepSeek-V3: b_e += rate * sign(mean load - load_e), from the global batch's load."""
        load = global_tokens.float()
        self.expert_bias.add_(self.cfg.bias_update_rate * torch.sign(load.mean() - load))


def moe_layers(model: nn.Module) -> List[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def set_aux_grad_scale(model: nn.Module, scale: float) -> None:
    """Engines call this before each micro-step with the scale they apply to the loss."""
    for m in moe_layers(model):
        m.aux_grad_scale = scale
