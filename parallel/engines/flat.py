"""One unit's flat buffer and its shards at every level of a plan (FSDP's flat-parameter
technique): module parameters are views into the buffer, whose storage exists only while the
unit is gathered."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from tierzero.parallel.engines.adamw import decay_runs
from tierzero.parallel.layout import padded_numel

if TYPE_CHECKING:
    from tierzero.parallel.engines.native import Domain


@dataclass
class _Param:
    name: str
    param: nn.Parameter
    shape: torch.Size
    offset: int
    numel: int


InitSlice = Callable[[str, int, int], torch.Tensor]
"""(parameter name, first element, elements) -> that slice of its flattened global initial value."""


def rebind(model: nn.Module, old: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
    """Replace parameter `old` (e.g. on the meta device, whose .data cannot be swapped for real
    storage) by a new Parameter over `data` everywhere the model holds it (tied weights too)."""
    new = nn.Parameter(torch.empty(0, dtype=data.dtype, device=data.device), requires_grad=old.requires_grad)
    # .data, not Parameter(data): a Parameter made from a view would share the flat buffer's
    # version counter, and every re-gather into the buffer would look like an in-place change
    # of the weights autograd saved
    new.data = data
    for module in model.modules():
        for key, p in module._parameters.items():
            if p is old:
                module._parameters[key] = new
    return new


class FlatUnit:
    """One unit's flat buffer and its shards at every level of the plan.

    From a materialised model the values are copied from its parameters; from a model on the
    meta device (`init`: the model's init_slice) only this rank's shards are generated -- the
    parameter shard and the optimizer shard -- and the full buffer never holds values until it
    is gathered, so no rank ever holds the whole model."""

    def __init__(self, name: str, params: List[Tuple[str, nn.Parameter]], *, domain: "Domain",
                 dtype: torch.dtype, device: str, fwd_gathers: int, bwd_gathers: int,
                 model: Optional[nn.Module] = None, init: Optional[InitSlice] = None, expert_index: int = 0):
        self.name = name
        self.fwd_gathers, self.bwd_gathers = fwd_gathers, bwd_gathers
        self.domain = e = domain
        offset, entries = 0, []
        for pname, p in params:
            entries.append(_Param(pname, p, p.shape, offset, p.numel()))
            offset += p.numel()
        self.params = entries
        self.numel = offset
        self.N = padded_numel(offset, e.world_size, e.plan.quant.pad_block)
        self.dtype = dtype

        self.c_p, self.c_b, self.c_g, self.c_o = (self.N // s for s in (e.s_p, e.s_b, e.s_g, e.s_o))
        self.persistent = e.s_p == 1  # replicated params: the full buffer is the param shard
        # the parameters' initial values (float32) over a range of the flat buffer: the masters
        # start from these exact values, the working copy is them in the compute dtype
        if init is None:
            built = torch.zeros(self.N, dtype=torch.float32, device=device)
            with torch.no_grad():
                for ent in entries:
                    built[ent.offset: ent.offset + ent.numel].copy_(ent.param.detach().reshape(-1))

            def values(a: int, b: int) -> torch.Tensor:
                return built[a:b].clone()
        else:
            def values(a: int, b: int) -> torch.Tensor:
                return self._generate(init, a, b, expert_index).to(device)

        full = torch.empty(self.N, dtype=self.dtype, device=device)
        if self.persistent:
            full.copy_(values(0, self.N))
        self.full = full
        for ent in entries:
            view = full[ent.offset: ent.offset + ent.numel].view(ent.shape)
            if ent.param.is_meta:
                ent.param = rebind(model, ent.param, view)
            else:
                ent.param.data = view
        self.p_shard = full if self.persistent else values(e.idx_p * self.c_p, (e.idx_p + 1) * self.c_p).to(self.dtype)
        # hpZ's secondary shard, for the backward gather: none where the forward's stays for it
        self.b_shard = (torch.empty(self.c_b, dtype=self.dtype, device=device)
                        if e.plan.secondary_level is not None and bwd_gathers else None)
        self.grad_acc: Optional[torch.Tensor] = None
        """This rank's grad-level gradient shard, float32, summed over the micro-steps: allocated
        when the unit's first gradient of an optimizer step arrives, released by the update (or
        the skip), as FSDP2 holds its sharded gradients; None between."""
        self.unreduced: Optional[torch.Tensor] = None
        """parallel.grad_sync=step: this rank's full-size gradient in the reduce dtype, summed over
        the optimizer step's micro-steps before the last, which reduce-scatters it; None between."""
        self._init_optimizer_state(values)
        self.residuals: Dict[int, torch.Tensor] = {}
        """Error feedback (parallel.quant_error_feedback): hop index -> what quantization dropped
        from this rank's hop input last micro-step, float32 (allocated on first use)."""
        self.gathered = True
        if not self.persistent:
            self.free()

    def _init_optimizer_state(self, values: Callable[[int, int], torch.Tensor]) -> None:
        """This rank's optimizer shard: fp32 masters from the initial values, the AdamW moments,
        and where weight decay applies (`decay_runs`: contiguous (first, end, decayed) runs)."""
        e = self.domain
        o = slice(e.idx_o * self.c_o, (e.idx_o + 1) * self.c_o)
        # float32 parameters sharded like the optimizer: the parameter shard IS the master shard
        # (the same elements, the same dtype), one buffer, not two
        same = self.dtype == torch.float32 and (e.s_p, e.idx_p) == (e.s_o, e.idx_o)
        self.master = self.p_shard if same else values(o.start, o.stop)
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)
        self.decay_runs = decay_runs(self.params, o.start, o.stop)

    def _generate(self, init: InitSlice, a: int, b: int, expert_index: int) -> torch.Tensor:
        """Elements [a, b) of the flat buffer's initial values, float32 on the CPU (padding 0).
        An expert unit holds this EP rank's experts: rows expert_index x E_local .. of each
        global [E, ...] tensor."""
        out = torch.zeros(b - a, dtype=torch.float32)
        for ent in self.params:
            lo, hi = max(a, ent.offset), min(b, ent.offset + ent.numel)
            if lo < hi:
                out[lo - a:hi - a] = init(ent.name, expert_index * ent.numel + lo - ent.offset, hi - lo)
        return out

    # storage management -------------------------------------------------------------
    def _alloc(self) -> None:
        st = self.full.untyped_storage()
        want = self.N * self.full.element_size()
        if st.size() != want:
            st.resize_(want)

    def free(self) -> None:
        if not self.persistent:
            self.full.untyped_storage().resize_(0)
        self.gathered = False

    def accumulate(self, part: torch.Tensor, *, owned: bool) -> None:
        """Add one micro-step's reduced gradient shard (c_g elements) to grad_acc. The first of an
        optimizer step becomes it: adopted when it is a float32 buffer nothing else holds
        (`owned`: a collective's output), else copied into float32."""
        if self.grad_acc is None:
            self.grad_acc = part if owned and part.dtype == torch.float32 else part.to(torch.float32, copy=True)
        else:
            self.grad_acc.add_(part)
