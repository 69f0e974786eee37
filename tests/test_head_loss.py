"""recipes.model.head_loss: the chunked linear + cross-entropy against the plain loss
(loss_fn(model.head(x), targets)), in value, in every gradient and in the memory it holds."""

from __future__ import annotations

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import tierzero.recipes.model as model_module
import tierzero.recipes.planning as planning
from tierzero.recipes.config import ModelConfig
from tierzero.recipes.model import build_model, loss_fn

V, T, B = 96, 11, 3  # 33 tokens: chunks of 8 make four whole chunks and a last one of 1


def inputs(seed: int = 0, vocab: int = V, b: int = B, t: int = T) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t + 1), generator=torch.Generator().manual_seed(seed))


def losses_and_grads(model, tokens: torch.Tensor, chunked: bool):
    """The loss and d loss / d (block input, every parameter), the blocks included so the
    gradients the head sends back are checked where they are used."""
    model.zero_grad(set_to_none=True)
    x0 = model.embed(tokens[:, :-1]).detach().requires_grad_()
    x = x0
    for block in model.blocks:
        x = block(x)
    targets = tokens[:, 1:]
    loss = model.head_loss(x, targets) if chunked else loss_fn(model.head(x), targets)
    (loss * 0.5).backward()  # an engine's 1/grad_accum: the incoming gradient is not 1
    grads = {"x": x0.grad}
    # untied, the embedding gets none: the blocks' input is a leaf here
    grads.update((name, p.grad.clone()) for name, p in model.named_parameters() if p.grad is not None)
    return loss.detach(), grads


@pytest.mark.parametrize("chunk", [8, 1, 33, 1000])
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_loss_is_the_plain_loss_in_value_and_gradients(monkeypatch, dtype, tie, chunk):
    """The loss within rtol 1e-5 (float32 sums in another order). The gradients: float32 within
    rtol 1e-5; bfloat16 within rtol 2e-2 / atol 1e-4 (about two bfloat16 ulps), and no farther
    from the float32 gradients than the plain bfloat16 path's (+25 %): the weight's gradient is
    each chunk's share rounded to bfloat16 and summed in float32, where the plain backward
    rounds one matmul once; every other gradient comes out of the same bfloat16 roundings."""
    monkeypatch.setattr(model_module, "loss_chunk_tokens", lambda vocab_size: chunk)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, tie_embeddings=tie)
    model = build_model(cfg, V, T, seed=1).to(dtype)
    if tie:
        assert model.output.weight is model.tok_embeddings.weight
    tokens = inputs()
    ref_loss, ref = losses_and_grads(model, tokens, chunked=False)
    loss, got = losses_and_grads(model, tokens, chunked=True)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert ref.keys() == got.keys() and {"x", "norm.weight"} <= got.keys()
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for name in ref:
        assert got[name].dtype == ref[name].dtype, name
        torch.testing.assert_close(got[name], ref[name], **tol, msg=lambda m, name=name: f"{name}: {m}")
    if dtype == torch.bfloat16:
        _, exact = losses_and_grads(build_model(cfg, V, T, seed=1), tokens, chunked=False)
        for name in ref:
            plain_err = (ref[name].float() - exact[name]).abs().max()
            assert (got[name].float() - exact[name]).abs().max() <= 1.25 * plain_err, name
    # the head's gradient really reached the (shared) weight and the final norm
    assert got["norm.weight"].abs().sum() > 0
    weight = "tok_embeddings.weight" if tie else "output.weight"
    assert got[weight].abs().sum() > 0


def test_ignored_targets_count_for_nothing_as_in_cross_entropy(monkeypatch):
    monkeypatch.setattr(model_module, "loss_chunk_tokens", lambda vocab_size: 5)
    model = build_model(ModelConfig(d_model=32, n_layers=1, n_heads=4), V, T)
    tokens = inputs(3)
    tokens[0, T] = tokens[2, T] = model_module.IGNORE_INDEX  # targets only, never inputs
    ref_loss, ref = losses_and_grads(model, tokens, chunked=False)
    loss, got = losses_and_grads(model, tokens, chunked=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7)


def test_head_loss_under_no_grad_builds_no_autograd_state(monkeypatch):
    model = build_model(ModelConfig(d_model=32, n_layers=1, n_heads=4), V, T)
    tokens = inputs(4)
    x, targets = model.blocks[0](model.embed(tokens[:, :-1])), tokens[:, 1:]
    with torch.no_grad():
        expected = loss_fn(model.head(x), targets)

    def refuse(*args):
        raise AssertionError("the autograd Function ran under torch.no_grad")

    monkeypatch.setattr(model_module._LinearCrossEntropy, "apply", refuse)
    with torch.no_grad():
        loss = model.head_loss(x, targets)
    assert loss.grad_fn is None and not loss.requires_grad
    assert loss.dtype == torch.float32 and loss.device == x.device
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)


def test_a_second_backward_through_a_retained_graph_fails_instead_of_doubling():
    """The saved gradients are scaled in place by the first backward: autograd's version check
    refuses a second one rather than scale them twice."""
    model = build_model(ModelConfig(d_model=32, n_layers=1, n_heads=4), V, T)
    tokens = inputs(6)
    x = model.embed(tokens[:, :-1]).detach().requires_grad_()
    loss = model.head_loss(x, tokens[:, 1:])
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


class LiveBytes(TorchDispatchMode):
    """The peak bytes of the storages that ops allocate inside the mode and that are still
    alive; a view's or an in-place op's output is its input's storage, not a new one."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.largest = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                st = t.untyped_storage()
                self.live.setdefault(st.data_ptr(), (StorageWeakRef(st), st.nbytes()))
                self.largest = max(self.largest, st.nbytes())
        self.live = {k: (ref, n) for k, (ref, n) in self.live.items() if not ref.expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def head_peak(model, x: torch.Tensor, targets: torch.Tensor, chunked: bool) -> LiveBytes:
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    with LiveBytes() as mem:
        loss = model.head_loss(x, targets) if chunked else loss_fn(model.head(x), targets)
        loss.backward()
        del loss
    return mem


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_backward_never_hold_the_whole_logits(monkeypatch, dtype):
    """[b=2, t=250, V=4096] in chunks of 64 tokens (the last of 52): forward + backward stay below
    the whole batch's float32 logits, within the planner's term for one chunk
    (planning.loss_chunk_bytes) plus the gradients the plain loss makes too; the plain loss,
    measured the same way, holds several copies of the logits."""
    vocab, b, t, d = 4096, 2, 250, 32
    monkeypatch.setattr(planning, "LOSS_CHUNK_BYTES", 64 * 4 * vocab)
    assert model_module.loss_chunk_tokens(vocab) == 64
    model = build_model(ModelConfig(d_model=d, n_layers=1, n_heads=4), vocab, t).to(dtype)
    tokens = inputs(5, vocab, b, t)
    x, targets = torch.randn(b, t, d, dtype=dtype), tokens[:, 1:]
    width = torch.finfo(dtype).bits // 8
    full_logits = b * t * vocab * 4
    plain, chunked = head_peak(model, x, targets, False), head_peak(model, x, targets, True)
    # the gradients of the hidden states (and their norm's float32 copies) and of the weight
    grads = b * t * d * (width + 8) + vocab * d * width
    print(f"{dtype}: peak plain {plain.peak / 2**20:.2f} MiB, chunked {chunked.peak / 2**20:.2f} MiB, "
          f"whole float32 logits {full_logits / 2**20:.2f} MiB")
    assert plain.peak >= 2 * full_logits  # the instrument sees the logits when they are there
    assert chunked.largest <= 64 * vocab * 4
    # 64 KiB: the per-row [n, 1] pieces and the scalars
    assert chunked.peak <= planning.loss_chunk_bytes(b * t, vocab, d, width) + grads + 2**16
    assert chunked.peak < full_logits / 3 and chunked.peak < plain.peak / 8
