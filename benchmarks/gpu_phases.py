"""What benchmarks/gpu_ab.py measures inside an engine's process: CUDA-event marks around the
engines' own calls (from outside: no timing code in the engines), the native engine's A/B
toggles, the profiler's kernel table and SDPA backend, and the FLOPs the kernels execute.

Phases of one optimizer step (milliseconds, per step):
  fwd      micro_step's start -> the head + loss has returned (native: model.head_loss, whose
           chunked loss also makes the head's gradients; FSDP2: its loss_fn after the forward)
  bwd      the rest of micro_step, less the gradient path where that runs on the compute stream
  grad     native: _reduce_grads / _finish_reduce (the gradients into the reduce buffer, the
           reduce-scatter, the fp32 accumulation), on the compute stream; FSDP2: foreach_reduce,
           from its copy-in to the end of its reduce stream's work -- overlapped, not subtracted
  optim    engine.step() (or the toggle's step)
  gather   native: the byte ledger's all_gather rows (time_s; at world size 1 there are none);
           FSDP2: foreach_all_gather on its copy-in and all-gather streams (overlapped), its
           copy-out on the compute stream apart (gather_copy_out)
  other    the step less its micro-steps and optimizer step (host gaps between them)
On CPU (the dry run) perf_counter stands in for the events.
"""

from __future__ import annotations

import functools
import inspect
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, List, Optional

import torch

if TYPE_CHECKING:
    from gpu_ab import Bench

LAZY_GRADS_SKIP = ("skipped: no engine knob -- NativeEngine allocates each gradient accumulator when the unit's "
                   "first gradient arrives and frees the logits and the residual stream unconditionally; "
                   "issue 25 item 7 adds no engine config key for an A/B")

# ---- FLOPs ---------------------------------------------------------------------------------------

def executed_flops_per_token(palm: float, n_layers: int, d_model: int, seq_len: int, backend: Optional[str]) -> float:
    """The FLOPs per token the kernels run, from PaLM's count (recipes.model.flops_per_token:
    6N + 12 L d T). Its 12 L d T is attention's matmuls over the whole T x T square, forward
    (QK^T, PV: 4 T d per token and layer) and backward (8 T d). A fused causal kernel computes
    about half the square, and its backward recomputes QK^T: the backward is 2.5x the forward
    (Dao 2023, FlashAttention-2, arXiv:2307.08691, section 4.1), so (4 + 10) / 2 = 7 L d T. The
    math backend computes and saves the whole square: 12 L d T (PaLM's count)."""
    attention = 12 if backend == "math" else 7
    return palm - 12 * n_layers * d_model * seq_len + attention * n_layers * d_model * seq_len


# ---- timing from outside the engines -------------------------------------------------------------

class Clock:
    """Timestamps on a CUDA stream (events, read after the run's final synchronize), or the host's
    perf_counter on CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def mark(self, stream=None):
        if not self.cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        try:
            e.record(stream)
        except (TypeError, RuntimeError):  # a stream object this torch's events do not take: the current one
            e.record()
        return e

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def instrument_native(bench: "Bench") -> None:
    """Marks around NativeEngine's phases: wrappers on the instance, the engine unchanged. The
    gradient path counts only inside micro_step (step() flushes grad_sync=step leftovers), and
    only the outermost of nested calls (_reduce_grads calls _finish_reduce)."""
    eng, clock, state = bench.engine, bench.clock, {"in_micro": False, "depth": 0, "start": None}
    micro, head_loss = eng.micro_step, eng._head_loss

    def micro_step(*args, **kwargs):
        state["start"] = start = clock.mark()
        state["in_micro"] = True
        try:
            return micro(*args, **kwargs)
        finally:
            state["in_micro"] = False
            bench.marks.append(("micro", start, clock.mark()))

    def timed_head_loss(*args, **kwargs):
        out = head_loss(*args, **kwargs)
        if state["in_micro"]:
            bench.marks.append(("fwd", state["start"], clock.mark()))
        return out

    def grad_path(fn):
        def wrapper(*args, **kwargs):
            if not state["in_micro"] or state["depth"]:
                return fn(*args, **kwargs)
            state["depth"] += 1
            start = clock.mark()
            try:
                return fn(*args, **kwargs)
            finally:
                state["depth"] -= 1
                bench.marks.append(("grad", start, clock.mark()))
        return wrapper

    eng.micro_step, eng._head_loss = micro_step, timed_head_loss
    eng._reduce_grads, eng._finish_reduce = grad_path(eng._reduce_grads), grad_path(eng._finish_reduce)


def instrument_fsdp2(bench: "Bench") -> None:
    """Marks around FSDP2Engine's micro_step and loss, and around FSDP2's own collectives
    (torch.distributed.fsdp's param-group module calls them by these global names): each on the
    streams FSDP2 runs it on. A name this torch lacks is left alone and reported."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group

    eng, clock, state = bench.engine, bench.clock, {"start": None, "in_micro": False}
    micro, loss_fn = eng.micro_step, eng.loss_fn

    def micro_step(*args, **kwargs):
        state["start"] = start = clock.mark()
        state["in_micro"] = True
        try:
            return micro(*args, **kwargs)
        finally:
            state["in_micro"] = False
            bench.marks.append(("micro", start, clock.mark()))

    def timed_loss(*args, **kwargs):
        out = loss_fn(*args, **kwargs)
        if state["in_micro"]:
            bench.marks.append(("fwd", state["start"], clock.mark()))
        return out

    def on_streams(fn, kind, start_stream, end_stream):
        sig = inspect.signature(fn)

        def wrapper(*args, **kwargs):
            streams = sig.bind_partial(*args, **kwargs).arguments
            start = clock.mark(streams.get(start_stream))
            out = fn(*args, **kwargs)
            bench.marks.append((kind, start, clock.mark(streams.get(end_stream))))
            return out
        return wrapper

    eng.micro_step, eng.loss_fn = micro_step, timed_loss
    wanted = (("foreach_all_gather", "gather", "all_gather_copy_in_stream", "all_gather_stream"),
              ("foreach_all_gather_copy_out", "gather_copy_out", None, None),
              ("foreach_reduce", "grad", None, "reduce_scatter_stream"))
    for name, kind, a, b in wanted:
        if hasattr(group, name):
            setattr(group, name, on_streams(getattr(group, name), kind, a, b))
        else:
            bench.notes.append(f"torch {torch.__version__} has no {group.__name__}.{name}: FSDP2's {kind} not timed")


# ---- the native toggles (records: a new one is a row here) ---------------------------------------

def step_before(engine, masks: List[torch.Tensor], lr: float):
    """NativeEngine.step at world size 1 as it was before issue 25 (benchmarks/step.py's
    step_before, on the engine's device): the squared norm in float64, read, clipping by a pass
    of its own, div_(world), the nine-pass update with a bool decay mask, the masters cast into a
    temporary and copied into the parameters. The accumulators are released as today, so the
    toggle is the step alone."""
    from step import adamw_update_before  # benchmarks/step.py: the update at 165bb3c

    from tierzero.parallel.engines.base import StepStats

    assert engine.world_size == 1, "step_before is the world-size-1 step"
    grads = [u.grad_acc if u.grad_acc is not None else torch.zeros(u.c_g, device=engine.device)
             for u in engine.units]
    norm = math.sqrt(torch.stack([g.double().pow(2).sum() for g in grads]).sum().float().tolist())
    if engine.grad_clip > 0 and norm > engine.grad_clip:
        for g in grads:
            g.mul_(engine.grad_clip / (norm + 1e-6))
    engine.step_count += 1
    for u, g, mask in zip(engine.units, grads, masks):
        g.div_(1)
        adamw_update_before(u.master, u.exp_avg, u.exp_avg_sq, g, mask, lr=lr, betas=engine.betas, eps=engine.eps,
                            weight_decay=engine.weight_decay, step=engine.step_count)
        u.grad_acc = None
        if u.master is not u.p_shard:
            u.p_shard.copy_(u.master.to(engine.dtype))
    return StepStats(grad_norm=norm)


def _fused_off(bench: "Bench") -> Callable[[], None]:
    masks = []
    for u in bench.engine.units:  # the bool mask the engine kept per unit (1 byte a parameter)
        mask = torch.zeros(u.master.numel(), dtype=torch.bool, device=u.master.device)
        for a, b, decayed in u.decay_runs:
            mask[a:b] = decayed
        masks.append(mask)
    bench.step_impl = functools.partial(step_before, bench.engine, masks)
    return lambda: (masks.clear(), setattr(bench, "step_impl", bench.engine.step))


def _loss_off(compiled: bool):
    def apply(bench: "Bench") -> Callable[[], None]:
        from tierzero.recipes.model import loss_fn

        model = bench.model
        before = model.__dict__.get("head_loss")
        loss = bench.engine.loss_fn if compiled else loss_fn
        model.head_loss = lambda x, targets: loss(model.head(x), targets)
        return lambda: setattr(model, "head_loss", before) if before is not None else model.__dict__.pop("head_loss")
    return apply


def _compile_off(bench: "Bench") -> Callable[[], None]:
    model = bench.model
    compiled = [b._compiled_call_impl for b in model.blocks]  # Module.compile's handle
    head_loss = model.__dict__.pop("head_loss", None)  # compile_model's torch.compile(model.head_loss)
    for b in model.blocks:
        b._compiled_call_impl = None

    def undo():
        for b, c in zip(model.blocks, compiled):
            b._compiled_call_impl = c
        if head_loss is not None:
            model.head_loss = head_loss
    return undo


def _chain(*applies):
    def apply(bench):
        undos = [a(bench) for a in applies]
        return lambda: [u() for u in reversed(undos)]
    return apply


@dataclass(frozen=True)
class Toggle:
    name: str
    what: str
    apply: Optional[Callable[["Bench"], Callable[[], None]]]


TOGGLES = (
    Toggle("all on", "the engine as it is", None),
    Toggle("fused step off", "the step before issue 25: float64 norm, 9-pass update, bool mask", _fused_off),
    Toggle("chunked loss off", "eager head + the compiled loss_fn over full fp32 logits (FSDP2's path)", _loss_off(True)),
    Toggle("compile off", "blocks and head_loss eager (chunked loss, fused step kept)", _compile_off),
    Toggle("all off", "the three above off together: eager, full logits, the old step", _chain(
        _compile_off, _loss_off(False), _fused_off)),
)


# ---- what the profiler and dynamo saw ---------------------------------------------------------------

def dynamo_counts() -> dict:
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    return {"unique_graphs": counters["stats"].get("unique_graphs", 0),
            "graph_breaks": sum(counters["graph_break"].values()),
            "frames_compiled": counters["frames"].get("total", 0)}


def top_kernels(events, cuda: bool, n: int = 20) -> dict:
    from torch.autograd import DeviceType

    rows = []
    for e in events:
        if cuda and getattr(e, "device_type", None) != DeviceType.CUDA:
            continue
        us = getattr(e, "self_device_time_total", 0) if cuda else e.self_cpu_time_total
        if us > 0:
            rows.append({"name": e.key, "calls": e.count, "ms": us / 1e3})
    kind = "kernels" if cuda else "CPU ops (self time)"
    if cuda and not rows:  # no kernel rows in this torch's averages: the ops' device time instead
        kind = "ops (device time)"
        rows = [{"name": e.key, "calls": e.count, "ms": getattr(e, "self_device_time_total", 0) / 1e3} for e in events
                if getattr(e, "self_device_time_total", 0) > 0]
    total = sum(r["ms"] for r in rows)
    rows.sort(key=lambda r: -r["ms"])
    for r in rows:
        r["share"] = r["ms"] / total if total else 0.0
    return {"kind": kind, "total_ms": total, "top": rows[:n]}


SDPA_OPS = (("_scaled_dot_product_flash_attention_for_cpu", "flash (CPU)"), ("_scaled_dot_product_flash_attention",
            "flash"), ("_scaled_dot_product_cudnn_attention", "cuDNN"), ("_scaled_dot_product_efficient_attention",
            "memory-efficient"), ("_scaled_dot_product_fused_attention_overrideable", "overrideable"),
            ("_scaled_dot_product_attention_math", "math"))
"""aten op (as the profiler names it) -> backend; the first match wins (the CPU flash op first)."""


def sdpa_backend(events) -> dict:
    names = [e.key for e in events]
    ops = sorted({n for n in names if "scaled_dot_product" in n})
    forward = [n for n in ops if "backward" not in n]
    backend = next((label for op, label in SDPA_OPS if any(op in n for n in forward)), None)
    kernels = sorted({n for n in names if any(w in n.lower() for w in ("flash", "fmha", "cudnn", "attention"))
                      and "scaled_dot_product" not in n})
    if backend is None:
        backend = "math" if not kernels else "unknown"
    return {"backend": backend, "ops": ops, "kernels": kernels[:6]}
