"""train.compile=true: what is compiled, how, and where inductor keeps its kernels.

Each transformer block is compiled in place (Module.compile: the module, its parameters and their
names stay, so checkpoints, exports and the byte ledger see the same model), the head with the
loss in one graph for the native engine, the loss alone for the engines that call the whole
model. An MoE layer stays eager inside its compiled block.
"""

from __future__ import annotations

from typing import Optional

import torch

from tierzero.parallel.moe import moe_layers
from tierzero.recipes.model import loss_fn


def compile_model(model: torch.nn.Module):
    """train.compile=true: each of `model.blocks` compiled in place (Module.compile: the module,
    its parameters and their names stay, so checkpoints, exports and the ledger see the same
    model; FSDP2 and the native engine shard and gather the same parameters), and the head with
    the loss in one graph (`model.head_loss`, for an engine that drives the stages itself).
    Returns the loss compiled alone, for the engines that call the whole model (torchtitan's way:
    the head stays in the root module FSDP2 gathers). Lazy: a graph compiles on its first call.

    An MoE layer (routing, dispatch, experts) runs eagerly inside its compiled block: its
    token counts set the shapes and the all-to-all splits (host reads, the byte ledger's timed
    collectives), which dynamo would break the graph at and recompile for at every step; the
    block's attention, norms and residuals are compiled around it."""
    for block in model.blocks:
        for layer in moe_layers(block):
            layer.forward = torch.compiler.disable(layer.forward)
        if "forward" in vars(block):  # wrapped on the instance (train.activation_checkpointing)
            block.forward = _traced_through(block.forward)
        block.compile()
    model.head_loss = torch.compile(model.head_loss)
    return torch.compile(loss_fn)


def _traced_through(forward):
    """A frame of ours around `forward` for dynamo to start tracing in. Module.compile enters at
    nn.Module's _call_impl, a frame dynamo skips, and it would skip the next one too when that is
    torch.utils.checkpoint.checkpoint (checkpoint_blocks' functools.partial): called from outside
    a trace it runs with dynamo disabled, so the block would run eagerly. Traced from here, the
    checkpoint becomes dynamo's activation-checkpoint operator: the recompute is part of the
    compiled backward."""
    def traced(*args, **kwargs):
        return forward(*args, **kwargs)

    return traced


def use_compile_cache(run_cache: Optional[str]) -> str:
    """Where inductor and triton keep compiled kernels: TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR
    when the user set them, else `run_cache` (<run.dir>/compile-cache), else the user's cache
    ($XDG_CACHE_HOME or ~/.cache, /tierzero/inductor) -- never inductor's default,
    /tmp/torchinductor_<user>: a temp path every job of the user shares and a cleaner may empty.
    Call it before torch._dynamo is imported (the import writes that default into the
    environment); a value equal to the default is taken as inductor's, not the user's. The C++
    backend's precompiled headers (~150 MB), which inductor keeps in that default whatever the
    variable says, go into the chosen folder too."""
    import os

    user = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if user:  # (importing inductor imports torch._dynamo: harmless once the variable is set)
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        if os.path.abspath(user) == os.path.abspath(default_cache_dir()):
            user = None
    chosen = user or run_cache or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tierzero", "inductor")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = chosen
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(chosen, "triton"))
    from torch._inductor import codecache

    if hasattr(codecache, "_HEADER_DIR"):  # torch 2.13: module globals read when a header is built
        codecache._HEADER_DIR = os.path.join(chosen, "precompiled_headers")
        codecache._HEADER_LOCK_DIR = os.path.join(codecache._HEADER_DIR, "locks")
    return chosen
