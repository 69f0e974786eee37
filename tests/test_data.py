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
