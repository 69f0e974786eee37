"""Index-addressable training data: sample i is a pure function of (data.seed, i).

Because no sample depends on which rank asked for it, in which batch, or in which order, any
rank layout (any data-parallel size, any micro-batch size) reads the same global token
stream, and a resumed run continues it exactly. See docs/data.md.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Protocol

import numpy as np
import torch

from tierzero.recipes.config import DATA_KINDS, TOKEN_DTYPES, DataConfig, data_errors  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)



class Dataset(Protocol):
    """What the trainer relies on; both dataset kinds provide it."""

    vocab_size: int
    seq_len: int
    entropy_floor_nats: Optional[float]

    def samples(self, indices: np.ndarray) -> torch.Tensor: ...


# ---------------------------------------------------------------------------------------------
# Counter-based randomness


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
# Domain tags keep the stream hash independent of the chain built from the same seed.
_STREAM_TAG = np.uint64(0x5EED_DA7A_0000_0001)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (Steele, Lea & Flood 2014), element-wise on uint64 with wrap-around."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def _to_unit(h: np.ndarray) -> np.ndarray:
    """uint64 hashes -> float64 uniforms in [0, 1) from the top 53 bits."""
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _check_indices(indices) -> np.ndarray:
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if indices.size and indices.min() < 0:
        raise ValueError(f"sample indices must be non-negative, got {int(indices.min())}")
    return indices


# ---------------------------------------------------------------------------------------------
# Synthetic language: a sparse random Markov chain


class MarkovChain:
    """A seeded sparse first-order Markov chain over `vocab_size` tokens.

    Token s can be followed by `successors` distinct tokens: always (s + 1) % V, which makes
    the chain irreducible (so its stationary distribution is unique), plus random others.
    Each row's probabilities are drawn from a symmetric Dirichlet(concentration).
    """

    def __init__(self, vocab_size: int, successors: int, concentration: float, seed: int):
        if not 1 <= successors <= vocab_size:
            raise ValueError(f"successors={successors} must be between 1 and vocab_size={vocab_size}")
        self.vocab_size = vocab_size
        self.successors = successors
        rng = np.random.default_rng(seed)
        V, k = vocab_size, successors
        nxt = np.empty((V, k), dtype=np.int64)
        for s in range(V):
            forced = (s + 1) % V
            others = np.delete(np.arange(V), forced)
            nxt[s, 0] = forced
            nxt[s, 1:] = rng.choice(others, size=k - 1, replace=False)
        probs = rng.dirichlet(np.full(k, concentration), size=V)  # [V, k], float64
        self.next_tokens = nxt  # [V, k]: the possible successors of each token
        self.next_probs = probs  # [V, k]: their probabilities
        self.transition = np.zeros((V, V), dtype=np.float64)  # dense P[s, s']
        np.add.at(self.transition, (np.repeat(np.arange(V), k), nxt.ravel()), probs.ravel())
        self.stationary = self._solve_stationary(self.transition)

    @staticmethod
    def _solve_stationary(P: np.ndarray) -> np.ndarray:
        """The unique pi with pi P = pi and sum(pi) = 1: (P^T - I) pi = 0 with one row replaced by sum = 1."""
        V = P.shape[0]
        A = P.T - np.eye(V)
        A[-1, :] = 1.0
        b = np.zeros(V)
        b[-1] = 1.0
        pi = np.linalg.solve(A, b)
        pi = np.clip(pi, 0.0, None)  # round-off can leave -1e-17
        return pi / pi.sum()

    def row_entropies_nats(self) -> np.ndarray:
        """H(P(s, .)) for every s, with 0 log 0 = 0."""
        p = self.next_probs
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p > 0, -p * np.log(p), 0.0)
        return terms.sum(axis=1)

    def entropy_rate_nats(self) -> float:
        """sum_s pi(s) H(P(s, .)): the best achievable mean next-token loss on stationary data."""
        return float(self.stationary @ self.row_entropies_nats())


class MarkovDataset:
    """Sequences of `seq_len + 1` tokens from a `MarkovChain`, started in its stationary distribution.

    Randomness is a counter-based hash of (seed, sample index, position), so sample i never
    depends on which other samples were requested with it.
    """

    def __init__(self, chain: MarkovChain, seq_len: int, seed: int):
        self.chain = chain
        self.vocab_size = chain.vocab_size
        self.seq_len = seq_len
        self.seed = seed
        self._stream_key = splitmix64(np.uint64(seed % (1 << 64)) ^ _STREAM_TAG)
        self._stationary_cdf = np.cumsum(chain.stationary)  # [V]
        self._row_cdf = np.cumsum(chain.next_probs, axis=1)  # [V, k]

    @property
    def entropy_floor_nats(self) -> float:
        return self.chain.entropy_rate_nats()

    def _uniforms(self, sample_keys: np.ndarray, position: int) -> np.ndarray:
        with np.errstate(over="ignore"):
            return _to_unit(splitmix64(sample_keys + np.uint64(position) * _GOLDEN))

    def samples(self, indices) -> torch.Tensor:
        """LongTensor [n, seq_len + 1] of the samples at `indices` (int64, >= 0)."""
        indices = _check_indices(indices)
        n, k = indices.size, self.chain.successors
        # One key per sample, then one hash per (sample, position).
        with np.errstate(over="ignore"):
            sample_keys = splitmix64(self._stream_key + indices.astype(np.uint64) * _MIX1)
        out = np.empty((n, self.seq_len + 1), dtype=np.int64)
        u = self._uniforms(sample_keys, 0)
        first = np.searchsorted(self._stationary_cdf, u, side="right")
        out[:, 0] = np.minimum(first, self.vocab_size - 1)  # cdf[-1] may round to 1 - eps
        for pos in range(1, self.seq_len + 1):
            cur = out[:, pos - 1]
            u = self._uniforms(sample_keys, pos)
            choice = (self._row_cdf[cur] <= u[:, None]).sum(axis=1)  # inverse CDF, [n]
            out[:, pos] = self.chain.next_tokens[cur, np.minimum(choice, k - 1)]
        return torch.from_numpy(out)


# ---------------------------------------------------------------------------------------------
# Token files


class TokenFileDataset:
    """A flat binary file of tokens (native-endian uint16 or uint32), read through np.memmap.

    Sample i is tokens[j * seq_len : j * seq_len + seq_len + 1] with j = i mod num_samples, so
    consecutive samples overlap by one token and every token is a target exactly once per epoch.
    """

    def __init__(self, path: str, seq_len: int, token_dtype: str = "uint16", vocab_size: int = 0):
        self.path = path
        self.seq_len = seq_len
        dtype = np.dtype(token_dtype)
        size_bytes = os.path.getsize(path)
        if size_bytes % dtype.itemsize:
            raise ValueError(
                f"data.path={path!r} holds {size_bytes} bytes, not a whole number of "
                f"data.token_dtype={token_dtype} tokens ({dtype.itemsize} bytes each); "
                f"check data.token_dtype matches how the file was written."
            )
        num_tokens = size_bytes // dtype.itemsize
        if num_tokens < seq_len + 1:
            raise ValueError(
                f"data.path={path!r} holds {num_tokens} tokens, fewer than data.seq_len + 1 = {seq_len + 1}; "
                f"lower data.seq_len or use a larger file."
            )
        self.tokens = np.memmap(path, dtype=dtype, mode="r")
        self.num_samples = (num_tokens - 1) // seq_len
        if vocab_size:
            self.vocab_size = vocab_size
        else:
            # One full pass over the file (about a second per GB); set data.vocab_size to skip it.
            logger.info("scanning %s for the largest token (set data.vocab_size to skip)", path)
            self.vocab_size = int(self.tokens.max()) + 1
        self.entropy_floor_nats = None

    def samples(self, indices) -> torch.Tensor:
        """LongTensor [n, seq_len + 1] of the samples at `indices` (int64, >= 0)."""
        starts = (_check_indices(indices) % self.num_samples) * self.seq_len  # [n]
        offsets = starts[:, None] + np.arange(self.seq_len + 1)  # [n, seq_len + 1]
        return torch.from_numpy(self.tokens[offsets].astype(np.int64))


# ---------------------------------------------------------------------------------------------
# Config checking and construction


def build_dataset(cfg: DataConfig) -> Dataset:
    """The dataset `cfg` describes; raises ValueError listing every problem with `data.*`."""
    errors = data_errors(cfg)
    if errors:
        raise ValueError("\n".join(errors))
    if cfg.kind == "markov":
        chain = MarkovChain(cfg.vocab_size, cfg.successors, cfg.concentration, cfg.seed)
        return MarkovDataset(chain, cfg.seq_len, cfg.seed)
    return TokenFileDataset(cfg.path, cfg.seq_len, cfg.token_dtype, cfg.vocab_size)
