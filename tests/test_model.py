"""recipes.model: shapes, causality, init, parameter accounting, bf16, and learning to the floor."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from tierzero.recipes.config import DataConfig, ModelConfig
from tierzero.recipes.data import build_dataset
from tierzero.recipes.model import (
    Transformer,
    build_model,
    count_params,
    default_ffn_hidden,
    flops_per_token,
    loss_fn,
    model_errors,
    num_params,
)

V, T = 64, 16


def make(cfg: ModelConfig = ModelConfig(), seed: int = 0, vocab_size: int = V, seq_len: int = T) -> Transformer:
    return build_model(cfg, vocab_size, seq_len, seed=seed)


def tokens(b: int = 2, t: int = T, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def test_output_shape_and_dtype():
    logits = make()(tokens(3, T))
    assert logits.shape == (3, T, V) and logits.dtype == torch.float32
    assert make()(tokens(1, 5)).shape == (1, 5, V)  # shorter than seq_len is fine


def test_longer_than_seq_len_is_refused():
    with pytest.raises(ValueError, match="seq_len"):
        make()(tokens(1, T + 1))


def test_causal():
    model = make()
    x = tokens(2, T)
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % V
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_deterministic_init():
    a, b, c = make(seed=3), make(seed=3), make(seed=4)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.tok_embeddings.weight, c.tok_embeddings.weight)


def test_parameter_names_are_stable():
    names = [name for name, _ in make(ModelConfig(n_layers=1)).named_parameters()]
    assert names == [
        "tok_embeddings.weight",
        "blocks.0.attn_norm.weight",
        "blocks.0.attn.wqkv.weight",
        "blocks.0.attn.wo.weight",
        "blocks.0.mlp_norm.weight",
        "blocks.0.mlp.w_gate.weight",
        "blocks.0.mlp.w_up.weight",
        "blocks.0.mlp.w_down.weight",
        "norm.weight",
    ]
    untied = [name for name, _ in make(ModelConfig(n_layers=1, tie_embeddings=False)).named_parameters()]
    assert untied == names + ["output.weight"]
    # Rotary tables are derived, so they stay out of checkpoints.
    assert not any("rope" in key for key in make().state_dict())


def test_tied_embeddings_share_storage():
    tied = make()
    assert tied.output.weight is tied.tok_embeddings.weight
    assert tied.output.weight.data_ptr() == tied.tok_embeddings.weight.data_ptr()
    untied = make(ModelConfig(tie_embeddings=False))
    assert untied.output.weight.data_ptr() != untied.tok_embeddings.weight.data_ptr()


@pytest.mark.parametrize("tie", [True, False])
def test_num_params_counts_unique_parameters(tie):
    cfg = ModelConfig(tie_embeddings=tie, ffn_hidden=None)
    model = make(cfg)
    unique = {p.data_ptr(): p.numel() for _, p in model.named_parameters(remove_duplicate=False)}
    assert num_params(model) == sum(unique.values()) == count_params(cfg, V)
    with_duplicates = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert with_duplicates - num_params(model) == (V * 64 if tie else 0)


def test_ffn_hidden_default():
    assert default_ffn_hidden(64) == 176  # 170.67 rounded up to a multiple of 16
    assert default_ffn_hidden(48) == 128
    assert make().blocks[0].mlp.w_gate.weight.shape == (176, 64)
    assert make(ModelConfig(ffn_hidden=40)).blocks[0].mlp.w_up.weight.shape == (40, 64)


def test_init_statistics():
    cfg = ModelConfig(d_model=128, n_layers=4, n_heads=4)
    model = make(cfg)
    block = model.blocks[2]
    assert block.attn.wqkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.tok_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for w in (block.attn.wo.weight, block.mlp.w_down.weight):
        assert w.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert torch.equal(block.attn_norm.weight, torch.ones(128))
    assert torch.equal(model.norm.weight, torch.ones(128))


def test_flops_per_token():
    cfg = ModelConfig()
    n = num_params(make(cfg, seq_len=64))
    # PaLM appendix B: 6N + 12 L d T.
    assert flops_per_token(cfg, V, 64, n) == 6 * n + 12 * 2 * 64 * 64
    assert flops_per_token(cfg, V, 64) == flops_per_token(cfg, V, 64, n)


def test_loss_fn_is_float32_cross_entropy():
    logits = torch.randn(2, 5, V).bfloat16()
    targets = torch.randint(0, V, (2, 5))
    loss = loss_fn(logits, targets)
    assert loss.dtype == torch.float32
    expected = -torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None]).mean()
    torch.testing.assert_close(loss, expected)
    uniform = loss_fn(torch.zeros(2, 5, V), targets)
    assert uniform.item() == pytest.approx(math.log(V))


def test_bfloat16_forward_backward():
    ref = make()
    model = make().to(torch.bfloat16)
    x = tokens(2, T)
    logits = model(x)
    assert logits.dtype == torch.bfloat16
    loss = loss_fn(logits[:, :-1], x[:, 1:])
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(logits.float(), ref(x), atol=0.05, rtol=0.05)


def test_meta_init_then_materialise():
    ref = make()
    with torch.device("meta"):
        model = build_model(ModelConfig(), V, T)
    model.to_empty(device="cpu")
    model.init_weights()  # recomputes the non-persistent rotary tables too
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name  # keyed by (seed, name): no state to copy
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(n_heads=3), "model.n_heads=3"),
        (dict(d_model=0), "model.d_model=0"),
        (dict(d_model=12, n_heads=4), "model.d_model=12"),  # head size 3 is odd
        (dict(ffn_hidden=0), "model.ffn_hidden=0"),
    ],
)
def test_config_errors_name_the_key(overrides, key):
    cfg = replace(ModelConfig(), **overrides)
    assert any(e.startswith(key) for e in model_errors(cfg)), model_errors(cfg)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_model(cfg, V, T)


@pytest.fixture
def one_thread():
    # Matmuls this small gain nothing from threads, and two test workers on two cores thrash.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_training_reaches_entropy_floor(one_thread):
    """The product requirement: a tiny model learns the Markov language to within 0.15 nats."""
    data_cfg = DataConfig(vocab_size=64, successors=4, concentration=0.5, seq_len=64)
    dataset = build_dataset(data_cfg)
    model = make(ModelConfig(d_model=64, n_layers=2, n_heads=4), seed=0, vocab_size=64, seq_len=64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = 32
    for step in range(150):
        x = dataset.samples(np.arange(step * batch, (step + 1) * batch))
        loss = loss_fn(model(x[:, :-1]), x[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    held_out = dataset.samples(np.arange(10**9, 10**9 + 256))  # never seen in training
    with torch.no_grad():
        eval_loss = loss_fn(model(held_out[:, :-1]), held_out[:, 1:]).item()
    gap = eval_loss - dataset.entropy_floor_nats
    assert -0.02 < gap < 0.15, (eval_loss, dataset.entropy_floor_nats)


def test_keyed_init_gives_any_slice_without_the_rest():
    """A rank materialises only its shard: every slice, across piece boundaries, is the same
    numbers as the slice of the whole tensor, and the global torch RNG is not involved."""
    from tierzero.recipes.model import INIT_CHUNK, keyed_normal

    total = 2 * INIT_CHUNK + 1234
    whole = keyed_normal(7, "blocks.0.attn.wqkv.weight", 0, total, total)
    assert abs(float(whole.mean())) < 0.01 and abs(float(whole.std()) - 1) < 0.01
    for start, n in [(0, 1), (INIT_CHUNK - 3, 10), (INIT_CHUNK, INIT_CHUNK), (total - 5, 5), (123, 2 * INIT_CHUNK)]:
        torch.manual_seed(start)  # must not matter
        assert torch.equal(keyed_normal(7, "blocks.0.attn.wqkv.weight", start, n, total), whole[start:start + n])
    assert not torch.equal(keyed_normal(8, "blocks.0.attn.wqkv.weight", 0, 100, total), whole[:100])
    assert not torch.equal(keyed_normal(7, "blocks.1.attn.wqkv.weight", 0, 100, total), whole[:100])


def test_init_slices_are_the_built_models_values():
    model = make(ModelConfig(n_layers=2), seed=5)
    std_out = 0.02 / (2 * 2) ** 0.5
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        n = flat.numel()
        assert torch.equal(model.init_slice(name, n // 3, n // 2), flat[n // 3:n // 3 + n // 2]), name
        if name.endswith("norm.weight"):
            assert torch.equal(flat, torch.ones(n)), name
        elif name.endswith(("attn.wo.weight", "w_down.weight")):
            assert abs(float(flat.std()) - std_out) < 0.2 * std_out, name
        else:
            assert abs(float(flat.std()) - 0.02) < 0.2 * 0.02, name
