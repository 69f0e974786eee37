"""recipes.data: index-addressable samples, the Markov chain's exact floor, token files, config errors."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from tierzero.recipes.config import DataConfig
from tierzero.recipes.data import (
    MarkovChain,
    MarkovDataset,
    TokenFileDataset,
    build_dataset,
    data_errors,
    splitmix64,
)


def test_splitmix64_matches_reference_outputs():
    # First three outputs of Vigna's splitmix64.c seeded with 0 (state advances by the golden gamma).
    gamma = 0x9E3779B97F4A7C15
    states = np.array([0, gamma, (2 * gamma) % (1 << 64)], dtype=np.uint64)
    assert [int(h) for h in splitmix64(states)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


def test_sample_depends_only_on_seed_and_index():
    ds = build_dataset(DataConfig())
    batch = ds.samples(np.array([5, 6, 7]))
    assert batch.shape == (3, ds.seq_len + 1) and batch.dtype == torch.int64
    assert torch.equal(batch[1], ds.samples(np.array([6]))[0])
    assert torch.equal(ds.samples(np.array([7, 5]))[1], batch[0])
    # A fresh dataset built from the same config reads the same stream.
    assert torch.equal(build_dataset(DataConfig()).samples(np.arange(100)), ds.samples(np.arange(100)))
    assert not torch.equal(batch[0], batch[1])


def test_different_seeds_differ():
    a = build_dataset(DataConfig(seed=1)).samples(np.arange(8))
    b = build_dataset(DataConfig(seed=2)).samples(np.arange(8))
    assert not torch.equal(a, b)
    # Same chain, different stream seed: still different samples.
    chain = MarkovChain(64, 4, 0.5, seed=1)
    c = MarkovDataset(chain, 64, seed=1).samples(np.arange(8))
    d = MarkovDataset(chain, 64, seed=3).samples(np.arange(8))
    assert torch.equal(a, c) and not torch.equal(c, d)


def test_chain_structure():
    chain = MarkovChain(16, 5, 0.5, seed=0)
    for s in range(16):
        assert chain.next_tokens[s, 0] == (s + 1) % 16
        assert len(set(chain.next_tokens[s].tolist())) == 5
    np.testing.assert_allclose(chain.transition.sum(axis=1), 1.0)
    np.testing.assert_allclose(chain.stationary @ chain.transition, chain.stationary, atol=1e-12)
    assert chain.stationary.min() > 0 and abs(chain.stationary.sum() - 1) < 1e-12


def test_entropy_rate_matches_brute_force():
    chain = MarkovChain(8, 3, 0.7, seed=5)
    P = chain.transition
    # Stationary distribution independently: powers of the lazy chain (I + P) / 2, which has
    # the same stationary distribution and is aperiodic, so every row converges to it.
    lazy = np.linalg.matrix_power((np.eye(8) + P) / 2, 4096)
    pi = lazy[0]
    np.testing.assert_allclose(lazy, np.tile(pi, (8, 1)), atol=1e-12)
    np.testing.assert_allclose(chain.stationary, pi, atol=1e-12)
    rate = 0.0
    for s in range(8):
        for t in range(8):
            if P[s, t] > 0:
                rate -= pi[s] * P[s, t] * np.log(P[s, t])
    assert chain.entropy_rate_nats() == pytest.approx(rate, abs=1e-12)


def test_empirical_transitions_match_chain():
    ds = build_dataset(DataConfig(vocab_size=16, successors=4, seq_len=64, seed=7))
    chain = ds.chain
    x = ds.samples(np.arange(4000)).numpy()
    counts = np.zeros((16, 16))
    np.add.at(counts, (x[:, :-1].ravel(), x[:, 1:].ravel()), 1)
    assert counts[chain.transition == 0].sum() == 0  # never leaves the chain's support
    # Pearson chi-square over all rows; dof = 16 x (4 - 1). 5 sigma of the chi-square spread.
    expected = counts.sum(axis=1, keepdims=True) * chain.transition
    support = chain.transition > 0
    chi2 = (((counts - expected) ** 2)[support] / expected[support]).sum()
    dof = 16 * 3
    assert chi2 < dof + 5 * np.sqrt(2 * dof), chi2
    # First tokens follow the stationary distribution (total variation over 4000 draws).
    first = np.bincount(x[:, 0], minlength=16) / len(x)
    assert 0.5 * np.abs(first - chain.stationary).sum() < 0.05


def test_empirical_loss_of_true_chain_equals_entropy_floor():
    ds = build_dataset(DataConfig())
    x = ds.samples(np.arange(2000)).numpy()
    nll = -np.log(ds.chain.transition[x[:, :-1], x[:, 1:]])
    assert nll.mean() == pytest.approx(ds.entropy_floor_nats, abs=0.02)
    # Each position, the first included, is at the floor because every sample starts stationary.
    assert nll[:, 0].mean() == pytest.approx(ds.entropy_floor_nats, abs=0.06)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_token_file_slices(tmp_path, dtype):
    base = 70000 if dtype == "uint32" else 0  # above 2**16: only uint32 can hold it
    tokens = (base + np.arange(101)).astype(dtype)
    path = tmp_path / "tokens.bin"
    tokens.tofile(path)
    ds = build_dataset(DataConfig(kind="tokens", path=str(path), token_dtype=dtype, seq_len=10, vocab_size=0))
    assert ds.num_samples == 10 and ds.entropy_floor_nats is None
    assert ds.vocab_size == base + 101
    x = ds.samples(np.array([0, 3, 9, 10, 23]))
    assert x.dtype == torch.int64 and x.shape == (5, 11)
    for row, i in zip(x.numpy(), [0, 3, 9, 10, 23]):
        j = i % 10
        np.testing.assert_array_equal(row, tokens[j * 10 : j * 10 + 11].astype(np.int64))
    # An explicit vocab_size is taken as given (no scan).
    explicit = build_dataset(
        DataConfig(kind="tokens", path=str(path), token_dtype=dtype, seq_len=10, vocab_size=200000)
    )
    assert explicit.vocab_size == 200000


def test_token_file_size_errors(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(b"\x00" * 7)
    with pytest.raises(ValueError, match="data.token_dtype=uint16"):
        TokenFileDataset(str(path), seq_len=2, token_dtype="uint16")
    short = tmp_path / "short.bin"
    np.arange(4, dtype=np.uint16).tofile(short)
    with pytest.raises(ValueError, match=r"data.seq_len"):
        TokenFileDataset(str(short), seq_len=8)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(kind="wiki"), "data.kind='wiki'"),
        (dict(successors=0), "data.successors=0"),
        (dict(successors=65), "data.successors=65"),
        (dict(seq_len=0), "data.seq_len=0"),
        (dict(concentration=0.0), "data.concentration=0.0"),
        (dict(vocab_size=1), "data.vocab_size=1"),
        (dict(seed=-1), "data.seed=-1"),
        (dict(kind="tokens", path=None), "data.path is not set"),
        (dict(kind="tokens", path="/nonexistent/tokens.bin"), "data.path='/nonexistent/tokens.bin'"),
        (dict(kind="tokens", path=__file__, token_dtype="int8"), "data.token_dtype='int8'"),
    ],
)
def test_config_errors_name_the_key(overrides, key):
    cfg = replace(DataConfig(), **overrides)
    errors = data_errors(cfg)
    assert len(errors) == 1 and errors[0].startswith(key), errors
    with pytest.raises(ValueError) as info:
        build_dataset(cfg)
    assert key in str(info.value)


def test_unknown_kind_lists_valid_kinds_and_errors_are_collected():
    errors = data_errors(DataConfig(kind="wiki", seq_len=0))
    assert len(errors) == 2
    assert "markov" in errors[0] and "tokens" in errors[0]
    assert DataConfig() is not None and data_errors(DataConfig()) == []


# ---------------------------------------------------------------------------------------------
# Data that scales: the sparse chain, the stored streams, reading ahead, the real vocabulary


def dense_stationary(P: np.ndarray) -> np.ndarray:
    """The O(V^3) solve the sparse power iteration replaced: (P^T - I) pi = 0 with one row
    replaced by sum(pi) = 1."""
    V = P.shape[0]
    A = P.T - np.eye(V)
    A[-1, :] = 1.0
    b = np.zeros(V)
    b[-1] = 1.0
    pi = np.clip(np.linalg.solve(A, b), 0.0, None)
    return pi / pi.sum()


@pytest.mark.parametrize("V,k,concentration,seed", [
    (2, 2, 1.0, 5), (16, 1, 0.5, 2), (64, 4, 0.5, 0), (1000, 16, 0.1, 3), (2048, 4, 0.5, 11), (2048, 2, 0.02, 9)])
def test_sparse_stationary_distribution_matches_the_dense_solve(V, k, concentration, seed):
    chain = MarkovChain(V, k, concentration, seed)
    np.testing.assert_allclose(chain.stationary, dense_stationary(chain.transition), rtol=0, atol=1e-12)


def test_token_streams_are_the_ones_stored_before_the_sparse_chain():
    """tests/golden/markov_streams.json: sha256 of a few samples per chain, written by the dense
    implementation; a faster generator must read exactly the same stream."""
    import hashlib
    import json
    from pathlib import Path

    cases = json.loads((Path(__file__).parent / "golden" / "markov_streams.json").read_text())
    for case in cases:
        chain = MarkovChain(case["vocab_size"], case["successors"], case["concentration"], case["seed"])
        batch = MarkovDataset(chain, case["seq_len"], case["seed"]).samples(np.array(case["indices"]))
        assert hashlib.sha256(batch.numpy().astype("<i8").tobytes()).hexdigest() == case["sha256"], case


def test_prefetcher_returns_exactly_the_samples_asked_for():
    from tierzero.recipes.data import Prefetcher

    ds = build_dataset(DataConfig(seq_len=32))
    feed = Prefetcher(ds, depth=2)
    try:
        feed.ahead(np.array([4, 5]))
        feed.ahead(np.array([6, 7]))
        feed.ahead(np.array([8, 9]))  # depth 2: the oldest read is dropped
        assert torch.equal(feed.get(np.array([8, 9])), ds.samples(np.array([8, 9])))
        assert torch.equal(feed.get(np.array([4, 5])), ds.samples(np.array([4, 5])))  # not ahead: read now
        assert torch.equal(feed.get(np.array([6, 7])), ds.samples(np.array([6, 7])))
        feed.ahead(np.array([-1]))
        with pytest.raises(ValueError, match="non-negative"):  # a read's error reaches the reader
            feed.get(np.array([-1]))
    finally:
        feed.close()


def test_the_cluster_recipes_first_input_is_made_on_cpu_with_the_real_vocabulary():
    """olmoe_1b7b on dgx-h100 (vocabulary 50,304, sequence 4,096) at a tiny width: the data
    set-up that needed ~60 GB and an O(V^3) solve per rank now fits in well under 1 GB, and
    the first step's input goes through the model."""
    import psutil

    from tierzero.launcher.config import load_config
    from tierzero.recipes.model import build_model, loss_fn
    from tierzero.recipes.schedule import micro_batch_indices

    cfg = load_config(["olmoe_1b7b"], ["topology.preset=dgx-h100", "topology.nodes=4", "model.d_model=32",
                                       "model.n_heads=2", "model.n_layers=1", "moe.num_experts=8", "moe.top_k=2",
                                       "moe.expert_hidden=16", "parallel.ep=1"])
    assert cfg.data.vocab_size == 50304 and cfg.data.seq_len == 4096
    process = psutil.Process()
    rss_before = process.memory_info().rss
    dataset = build_dataset(cfg.data)
    assert process.memory_info().rss - rss_before < 1 << 30
    world = 4 * 8
    idx = micro_batch_indices(0, 0, dp_rank=world - 1, dp_size=world, micro_batch=cfg.train.micro_batch_size,
                              global_batch=cfg.train.global_batch_size)
    batch = dataset.samples(idx)
    assert batch.shape == (cfg.train.micro_batch_size, 4097)
    assert 0 <= int(batch.min()) and int(batch.max()) < 50304 and len(torch.unique(batch)) > 1000
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=dataset.vocab_size, seq_len=dataset.seq_len, moe=cfg.moe)
    head = batch[:, :257]  # the logits of all 4,096 positions would be 3.3 GB: the model sees the first 256
    with torch.no_grad():
        loss = float(loss_fn(model(head[:, :-1]), head[:, 1:]))
    assert abs(loss - np.log(50304)) < 1.0  # an untrained model's loss on the real vocabulary
