"""Index-addressable training data: sample i is a pure function of (data.seed, i).

Because no sample depends on which rank asked for it, in which batch, or in which order, any
rank layout (any data-parallel size, any micro-batch size) reads the same global token
stream, and a resumed run continues it exactly. See docs/data.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import List, NamedTuple, Optional, Protocol

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


def stationary_distribution(next_tokens: np.ndarray, next_probs: np.ndarray, *, tol: float = 1e-15,
                            max_iters: int = 1_000_000) -> np.ndarray:
    """The unique pi with pi P = pi, sum(pi) = 1, for the sparse chain P[s, next_tokens[s, j]] =
    next_probs[s, j] (irreducible: every row holds s + 1).

    Power iteration on the lazy chain (I + P) / 2, which has the same stationary distribution
    and is aperiodic, so it converges from any start; each iteration is one O(V k) scatter-add.
    A dense solve is O(V^3) flops and V^2 memory: ~20 GB and minutes at V = 50,304.
    """
    V = next_tokens.shape[0]
    flat = next_tokens.ravel()
    pi = np.full(V, 1.0 / V)
    for _ in range(max_iters):
        new = 0.5 * pi + 0.5 * np.bincount(flat, weights=(pi[:, None] * next_probs).ravel(), minlength=V)
        new /= new.sum()
        change = np.abs(new - pi).sum()
        pi = new
        if change < tol:
            break
    else:
        logger.warning("stationary distribution: %d iterations left an L1 change of %.1e", max_iters, change)
    return pi


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
        nxt[:, 0] = (np.arange(V) + 1) % V  # the forced successor
        for s in range(V):
            # k - 1 distinct others, drawn from the V - 1 tokens other than the forced one: index
            # j stands for token j below the forced one and j + 1 from it on (the same draws as
            # rng.choice over that list, without building it: O(k) per row, not O(V))
            forced = (s + 1) % V
            j = rng.choice(V - 1, size=k - 1, replace=False)
            nxt[s, 1:] = np.where(j < forced, j, j + 1)
        probs = rng.dirichlet(np.full(k, concentration), size=V)  # [V, k], float64
        self.next_tokens = nxt  # [V, k]: the possible successors of each token
        self.next_probs = probs  # [V, k]: their probabilities
        self.stationary = stationary_distribution(nxt, probs)

    @property
    def transition(self) -> np.ndarray:
        """The dense [V, V] matrix P[s, s'] (for tests and small vocabularies: V^2 floats)."""
        V, k = self.vocab_size, self.successors
        P = np.zeros((V, V), dtype=np.float64)
        np.add.at(P, (np.repeat(np.arange(V), k), self.next_tokens.ravel()), self.next_probs.ravel())
        return P

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

    def samples(self, indices) -> torch.Tensor:
        """LongTensor [n, seq_len + 1] of the samples at `indices` (int64, >= 0)."""
        indices = _check_indices(indices)
        n, k, L = indices.size, self.chain.successors, self.seq_len + 1
        # One key per sample, then one uniform per (sample, position), all positions at once.
        with np.errstate(over="ignore"):
            sample_keys = splitmix64(self._stream_key + indices.astype(np.uint64) * _MIX1)
            u = _to_unit(splitmix64(sample_keys[:, None] + np.arange(L, dtype=np.uint64)[None, :] * _GOLDEN))
        out = np.empty((n, L), dtype=np.int64)
        first = np.searchsorted(self._stationary_cdf, u[:, 0], side="right")
        out[:, 0] = np.minimum(first, self.vocab_size - 1)  # cdf[-1] may round to 1 - eps
        # Each token depends on the one before, so only this walk is sequential: per position,
        # the inverse CDF of the current row (k compares per sample) and a gather.
        row_cdf, next_tokens, last = self._row_cdf, self.chain.next_tokens, k - 1
        cur = out[:, 0]
        for pos in range(1, L):
            choice = (row_cdf[cur] <= u[:, pos, None]).sum(axis=1)  # [n]
            cur = next_tokens[cur, np.minimum(choice, last)]
            out[:, pos] = cur
        return torch.from_numpy(out)


# ---------------------------------------------------------------------------------------------
# Token files


class TokenFileDataset:
    """A flat binary file of tokens (native-endian uint16 or uint32), read through np.memmap.

    Sample i is tokens[j * seq_len : j * seq_len + seq_len + 1] with j = i mod num_samples, so
    consecutive samples overlap by one token and every token is a target exactly once per epoch.
    """

    def __init__(self, path: str, seq_len: int, token_dtype: str = "uint16", vocab_size: int = 0, *,
                 key: str = "data.path"):
        self.path = path
        self.seq_len = seq_len
        sidecar_problem = check_sidecar(path, token_dtype, vocab_size, key=key)
        if sidecar_problem:
            raise ValueError(sidecar_problem)
        dtype = np.dtype(token_dtype)
        size_bytes = os.path.getsize(path)
        if size_bytes % dtype.itemsize:
            raise ValueError(
                f"{key}={path!r} holds {size_bytes} bytes, not a whole number of "
                f"data.token_dtype={token_dtype} tokens ({dtype.itemsize} bytes each); "
                f"check data.token_dtype matches how the file was written."
            )
        num_tokens = size_bytes // dtype.itemsize
        if num_tokens < seq_len + 1:
            raise ValueError(
                f"{key}={path!r} holds {num_tokens} tokens, fewer than data.seq_len + 1 = {seq_len + 1}; "
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
        return torch.from_numpy(self.windows(_check_indices(indices) % self.num_samples))

    def windows(self, positions: np.ndarray) -> np.ndarray:
        """int64 [n, seq_len + 1]: the windows at sample positions 0 <= j < num_samples."""
        offsets = positions[:, None] * self.seq_len + np.arange(self.seq_len + 1)  # [n, seq_len + 1]
        return self.tokens[offsets].astype(np.int64)


SIDECAR_FILE = "tokens.json"
"""What `tierzero data prepare` writes beside its tokens.bin (recipes/prepare.py): how it was made."""
_MAX_SIDECAR_BYTES = 1 << 20


def check_sidecar(path: str, token_dtype: str, vocab_size: int, *, key: str = "data.path") -> Optional[str]:
    """A problem with data.token_dtype / data.vocab_size against the sidecar `tierzero data prepare`
    wrote beside `path`, or None (also when there is no sidecar, or it describes another file).
    The file's size alone cannot tell uint32 tokens read as uint16: both divide evenly."""
    sidecar = os.path.join(os.path.dirname(path) or ".", SIDECAR_FILE)
    try:
        if os.path.getsize(sidecar) > _MAX_SIDECAR_BYTES:
            return None
        with open(sidecar, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None  # no sidecar (a user's own token file), or not one we can read: the size checks still apply
    if not isinstance(info, dict) or info.get("tokens_file") != os.path.basename(path):
        return None
    made_dtype = info.get("dtype")
    made_vocab = (info.get("tokenizer") or {}).get("num_ids") if isinstance(info.get("tokenizer"), dict) else None
    if made_dtype in TOKEN_DTYPES and made_dtype != token_dtype:
        return (f"{key}={path!r} was written by `tierzero data prepare` as {made_dtype} tokens ({sidecar}), but "
                f"data.token_dtype={token_dtype}; set data.token_dtype={made_dtype}.")
    if isinstance(made_vocab, int) and 0 < vocab_size < made_vocab:
        return (f"{key}={path!r} holds ids of a {made_vocab}-token vocabulary ({sidecar}), but "
                f"data.vocab_size={vocab_size}; set data.vocab_size={made_vocab} (or 0 to scan the file).")
    return None


# ---------------------------------------------------------------------------------------------
# Mixtures of token files, and what they hold out


_MIXTURE_TAG = np.uint64(0x5EED_DA7A_0000_0002)
_EVAL_TAG = np.uint64(0x5EED_DA7A_0000_0003)


def mixture_sources(indices, *, seed: int, weights, tag=_MIXTURE_TAG) -> np.ndarray:
    """int64 [n]: the source of each sample, a pure function of (seed, index): the uniform
    splitmix64(key(seed) + i x mix) against the cumulative normalised weights (inverse CDF), so
    sample i's source needs nothing but i -- no RNG state advanced per sample."""
    indices = _check_indices(indices)
    w = np.asarray(weights, dtype=np.float64)
    if w.size == 1:
        return np.zeros(indices.size, dtype=np.int64)
    cdf = np.cumsum(w) / w.sum()
    key = splitmix64(np.uint64(seed % (1 << 64)) ^ tag)
    with np.errstate(over="ignore"):
        u = _to_unit(splitmix64(key + indices.astype(np.uint64) * _MIX1))
    return np.minimum(np.searchsorted(cdf, u, side="right"), w.size - 1)


def mixture_positions(indices, *, seed: int, weights, first, count, tag=_MIXTURE_TAG):
    """(source [n], position [n]) of each sample: its source by `mixture_sources`, and within
    it position first[s] + i mod count[s] -- the single file's rule (no window repeats within
    count[s] consecutive indices), restricted to the range [first[s], first[s] + count[s])."""
    indices = _check_indices(indices)
    src = mixture_sources(indices, seed=seed, weights=weights, tag=tag)
    first, count = np.asarray(first, dtype=np.int64), np.asarray(count, dtype=np.int64)
    return src, first[src] + indices % count[src]


class MixtureDataset:
    """Token files mixed by weight; each sample is a window of one file.

    Sample i comes from source `mixture_sources(i)` at position first[s] + i mod count[s]
    (mixture_positions): a pure function of (data.seed, i), so any rank layout reads the same
    stream and a resharded resume continues it. One file with the whole range is exactly
    TokenFileDataset (data.path).
    """

    def __init__(self, sources: List[TokenFileDataset], weights, *, seed: int, vocab_size: int,
                 first, count, tag=_MIXTURE_TAG):
        self.sources, self.weights, self.seed, self.tag = sources, list(weights), seed, tag
        self.first, self.count = list(first), list(count)
        self.seq_len = sources[0].seq_len
        self.vocab_size = vocab_size
        self.entropy_floor_nats = None

    @property
    def num_samples(self) -> int:
        """Distinct windows this dataset can read (over every source)."""
        return sum(self.count)

    def positions(self, indices):
        """(source [n], position [n]) of the samples at `indices`."""
        return mixture_positions(indices, seed=self.seed, weights=self.weights, first=self.first,
                                 count=self.count, tag=self.tag)

    def samples(self, indices) -> torch.Tensor:
        """LongTensor [n, seq_len + 1] of the samples at `indices` (int64, >= 0)."""
        src, pos = self.positions(indices)
        out = np.empty((src.size, self.seq_len + 1), dtype=np.int64)
        for s in np.unique(src):
            rows = src == s
            out[rows] = self.sources[s].windows(pos[rows])
        return torch.from_numpy(out)


def held_out_counts(num_samples: int, eval_fraction: float) -> int:
    """Samples held out at the end of a file of `num_samples` for data.eval_fraction (at least one)."""
    return math.ceil(num_samples * eval_fraction) if eval_fraction > 0 else 0


# ---------------------------------------------------------------------------------------------
# Reading ahead


class Prefetcher:
    """Reads the next requested samples on a background thread while the current batch trains.

    `ahead(indices)` starts a read; `get(indices)` returns it (or reads now if it was not asked
    for ahead, e.g. after a rollback changed the schedule). Samples are a pure function of their
    indices, so reading ahead never changes what is trained on. With `pin`, batches land in
    pinned host memory so the copy to the GPU can be asynchronous.
    """

    def __init__(self, dataset: Dataset, *, pin: bool = False, depth: int = 2):
        from concurrent.futures import ThreadPoolExecutor

        self.dataset, self.pin, self.depth = dataset, pin, depth
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tierzero-data")
        self._pending: dict = {}  # indices bytes -> Future, oldest first

    def _read(self, indices: np.ndarray) -> torch.Tensor:
        batch = self.dataset.samples(indices)
        return batch.pin_memory() if self.pin else batch

    def ahead(self, indices) -> None:
        indices = np.asarray(indices, dtype=np.int64)
        key = indices.tobytes()
        if key not in self._pending:
            while len(self._pending) >= self.depth:
                self._pending.pop(next(iter(self._pending))).cancel()
            self._pending[key] = self._pool.submit(self._read, indices)

    def get(self, indices) -> torch.Tensor:
        indices = np.asarray(indices, dtype=np.int64)
        future = self._pending.pop(indices.tobytes(), None)
        return future.result() if future is not None else self._read(indices)

    def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)


# ---------------------------------------------------------------------------------------------
# Config checking and construction


class Datasets(NamedTuple):
    train: Dataset
    eval: Optional[Dataset]
    """The held-out data (data.eval_path or data.eval_fraction), or None."""


def build_dataset(cfg: DataConfig) -> Dataset:
    """The training dataset `cfg` describes; raises ValueError listing every problem with `data.*`."""
    return build_datasets(cfg).train


def build_datasets(cfg: DataConfig) -> Datasets:
    """The training and held-out datasets `cfg` describes; ValueError listing every problem with `data.*`."""
    errors = data_errors(cfg)
    if errors:
        raise ValueError("\n".join(errors))
    if cfg.kind == "markov":
        chain = MarkovChain(cfg.vocab_size, cfg.successors, cfg.concentration, cfg.seed)
        return Datasets(MarkovDataset(chain, cfg.seq_len, cfg.seed), None)
    keyed = [(f"data.paths[{k}]", p) for k, p in enumerate(cfg.paths)] if cfg.paths else [("data.path", cfg.path)]
    sources = [TokenFileDataset(p, cfg.seq_len, cfg.token_dtype, cfg.vocab_size, key=k) for k, p in keyed]
    held = TokenFileDataset(cfg.eval_path, cfg.seq_len, cfg.token_dtype, cfg.vocab_size,
                            key="data.eval_path") if cfg.eval_path else None
    # vocab_size=0: each file was scanned; the held-out one counts too (the model must embed its tokens)
    vocab = max(f.vocab_size for f in sources + ([held] if held else []))
    weights = list(cfg.weights) or [1.0] * len(sources)
    n = [f.num_samples for f in sources]
    n_eval = [held_out_counts(k, cfg.eval_fraction) for k in n]
    short = [f"{key} ({k} samples of data.seq_len={cfg.seq_len})" for (key, _), k, e in zip(keyed, n, n_eval) if k - e < 1]
    if short:
        raise ValueError(f"data.eval_fraction={cfg.eval_fraction} leaves no training sample in {', '.join(short)}; "
                         "lower data.eval_fraction or use larger files.")
    train = MixtureDataset(sources, weights, seed=cfg.seed, vocab_size=vocab, first=[0] * len(n),
                           count=[k - e for k, e in zip(n, n_eval)])
    if held is not None:
        evaluation = MixtureDataset([held], [1.0], seed=cfg.seed, vocab_size=vocab, first=[0],
                                    count=[held.num_samples], tag=_EVAL_TAG)
    elif cfg.eval_fraction:
        evaluation = MixtureDataset(sources, weights, seed=cfg.seed, vocab_size=vocab,
                                    first=[k - e for k, e in zip(n, n_eval)], count=n_eval, tag=_EVAL_TAG)
    else:
        evaluation = None
    return Datasets(train, evaluation)
