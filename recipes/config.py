"""Config sections owned by the recipes: `train.*`, `model.*`, `data.*`.

Each field's docstring (the string literal under it) is what `tierzero config --describe`
and docs/config.md show.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import List, Optional

DATA_KINDS = ("markov", "tokens")
NONFINITE_ACTIONS = ("skip", "rollback", "stop")
TOKEN_DTYPES = ("uint16", "uint32")
ACTIVATION_CHECKPOINTING = ("none", "blocks")


@dataclass
class TrainConfig:
    steps: int = 200
    """Optimizer steps to run."""
    seed: int = 0
    """Seed for model initialisation; the data stream has its own seed (data.seed)."""
    global_batch_size: int = 32
    """Sequences per optimizer step, fixed across world sizes (accumulation = global / (micro x dp))."""
    micro_batch_size: int = 8
    """Sequences per rank per forward/backward pass."""
    lr: float = 3.0e-3
    """Peak learning rate (AdamW), reached after train.warmup_steps."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr x min_lr_ratio on the last step."""
    warmup_steps: int = 20
    """Linear warm-up steps from 0 to train.lr."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not applied to norms and biases)."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    dtype: str = "float32"
    """Compute dtype: float32 or bfloat16."""
    log_every: int = 10
    """Print a progress line every N steps when the output is not a terminal."""
    on_nonfinite: str = "skip"
    """A NaN/inf gradient norm: skip the update (skip), reload the last checkpoint (rollback), or stop."""
    max_nonfinite: int = 3
    """Stop after this many non-finite steps in a row (skip / rollback)."""
    activation_checkpointing: str = "none"
    """none, or blocks: keep only each transformer block's input and recompute the block in the backward (activations ~1/L of 'none', one more forward of compute). Dense models."""


@dataclass
class ModelConfig:
    d_model: int = 64
    """Hidden size."""
    n_layers: int = 2
    """Transformer blocks."""
    n_heads: int = 4
    """Attention heads (d_model must be divisible by it)."""
    ffn_hidden: Optional[int] = None
    """SwiGLU hidden size; default 8/3 x d_model rounded up to a multiple of 16."""
    rope_theta: float = 10000.0
    """Rotary position embedding base."""
    norm_eps: float = 1.0e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = True
    """Share the input embedding and the output projection."""
    params: Optional[float] = None
    """Model size for `tierzero plan` only (e.g. 20e9); null = count the recipe's model."""


@dataclass
class DataConfig:
    kind: str = "markov"
    """markov (seeded synthetic language with a known entropy floor) or tokens (a memory-mapped token file)."""
    seq_len: int = 64
    """Tokens per training sequence (each sample holds seq_len + 1 tokens)."""
    seed: int = 1234
    """Seed of the data stream; sample i is a pure function of (data.seed, i)."""
    vocab_size: int = 64
    """markov: number of states; tokens: vocabulary size (0 = max token + 1)."""
    successors: int = 4
    """markov: number of possible next tokens per token (sparsity of the chain)."""
    concentration: float = 0.5
    """markov: Dirichlet concentration of each row's probabilities (lower = peakier, lower entropy)."""
    path: Optional[str] = None
    """tokens: path of a flat binary token file."""
    token_dtype: str = "uint16"
    """tokens: uint16 or uint32."""


# ---- value checks (pure: the launcher collects them before anything is started) ----

def default_ffn_hidden(d_model: int) -> int:
    """8/3 x d_model rounded up to a multiple of 16 (keeps SwiGLU's cost near a 4x GELU MLP)."""
    return 16 * math.ceil(8 * d_model / 3 / 16)


def model_errors(cfg: ModelConfig) -> list[str]:
    """Every problem with `model.*`, as messages naming the key, the value and the fix."""
    errors = []
    for key in ("d_model", "n_layers", "n_heads"):
        value = getattr(cfg, key)
        if value < 1:
            errors.append(f"model.{key}={value} must be at least 1.")
    if cfg.d_model >= 1 and cfg.n_heads >= 1:
        if cfg.d_model % cfg.n_heads:
            errors.append(
                f"model.n_heads={cfg.n_heads} does not divide model.d_model={cfg.d_model}; "
                f"pick a head count that divides {cfg.d_model}."
            )
        elif (cfg.d_model // cfg.n_heads) % 2:
            errors.append(
                f"model.d_model={cfg.d_model} / model.n_heads={cfg.n_heads} gives an odd head size "
                f"{cfg.d_model // cfg.n_heads}; rotary positions rotate pairs of dims, so pick an even head size."
            )
    if cfg.ffn_hidden is not None and cfg.ffn_hidden < 1:
        errors.append(
            f"model.ffn_hidden={cfg.ffn_hidden} must be at least 1, or null for "
            f"{default_ffn_hidden(max(cfg.d_model, 1))} (8/3 x d_model rounded up to 16)."
        )
    if not cfg.norm_eps > 0:
        errors.append(f"model.norm_eps={cfg.norm_eps} must be positive, e.g. 1e-5.")
    if not cfg.rope_theta > 0:
        errors.append(f"model.rope_theta={cfg.rope_theta} must be positive, e.g. 10000.")
    if cfg.params is not None and not cfg.params > 0:
        errors.append(f"model.params={cfg.params} must be positive (a parameter count, e.g. 20e9), "
                      "or null to count the recipe's model.")
    return errors


def data_errors(cfg: DataConfig) -> list[str]:
    """Every problem with `data.*`, as messages naming the key, the value and the fix.

    Touches the disk only to check that data.path exists.
    """
    errors = []
    if cfg.kind not in DATA_KINDS:
        errors.append(f"data.kind={cfg.kind!r} is unknown; valid kinds: {', '.join(DATA_KINDS)}.")
    if cfg.seq_len < 1:
        errors.append(f"data.seq_len={cfg.seq_len} must be at least 1, e.g. data.seq_len=64.")
    if cfg.seed < 0:
        errors.append(f"data.seed={cfg.seed} must be non-negative, e.g. data.seed=1234.")
    if cfg.kind == "markov":
        if cfg.vocab_size < 2:
            errors.append(
                f"data.vocab_size={cfg.vocab_size} must be at least 2 for data.kind=markov, e.g. data.vocab_size=64."
            )
        elif not 1 <= cfg.successors <= cfg.vocab_size:
            errors.append(
                f"data.successors={cfg.successors} must be between 1 and data.vocab_size={cfg.vocab_size}; "
                f"pick a value in that range, e.g. data.successors={min(4, cfg.vocab_size)}."
            )
        if not cfg.concentration > 0:
            errors.append(
                f"data.concentration={cfg.concentration} must be positive "
                f"(lower = peakier rows, lower entropy), e.g. data.concentration=0.5."
            )
    elif cfg.kind == "tokens":
        if not cfg.path:
            errors.append("data.path is not set; data.kind=tokens needs data.path=/path/to/tokens.bin.")
        elif not os.path.isfile(cfg.path):
            errors.append(
                f"data.path={cfg.path!r} is not a file; check the path, or use data.kind=markov for synthetic data."
            )
        if cfg.token_dtype not in TOKEN_DTYPES:
            errors.append(
                f"data.token_dtype={cfg.token_dtype!r} is not supported; valid: {', '.join(TOKEN_DTYPES)}."
            )
        if cfg.vocab_size < 0:
            errors.append(
                f"data.vocab_size={cfg.vocab_size} must be 0 (max token + 1, scans the file) or positive."
            )
    return errors




def train_errors(t: TrainConfig) -> List[str]:
    """Every problem with `train.*` that does not need the world size."""
    errs = []
    for key in ("steps", "global_batch_size", "micro_batch_size", "log_every", "max_nonfinite"):
        if getattr(t, key) < 1:
            errs.append(f"train.{key}={getattr(t, key)} must be at least 1.")
    if t.on_nonfinite not in NONFINITE_ACTIONS:
        errs.append(f"train.on_nonfinite={t.on_nonfinite!r} is not one of {list(NONFINITE_ACTIONS)}")
    if t.warmup_steps < 0:
        errs.append(f"train.warmup_steps={t.warmup_steps} must be >= 0.")
    if not t.lr > 0:
        errs.append(f"train.lr={t.lr} must be > 0, e.g. train.lr=3e-3.")
    if not 0 <= t.min_lr_ratio <= 1:
        errs.append(f"train.min_lr_ratio={t.min_lr_ratio} must be between 0 and 1.")
    if not t.weight_decay >= 0:
        errs.append(f"train.weight_decay={t.weight_decay} must be >= 0 (0 = no decay), e.g. train.weight_decay=0.1.")
    for key, example in (("beta1", 0.9), ("beta2", 0.95)):
        # AdamW divides by 1 - beta**step: beta = 1 divides by zero, beta > 1 or < 0 diverges
        if not 0 <= getattr(t, key) < 1:
            errs.append(f"train.{key}={getattr(t, key)} must be in [0, 1) (a moment's decay per step), "
                        f"e.g. train.{key}={example}.")
    if not t.grad_clip >= 0:
        errs.append(f"train.grad_clip={t.grad_clip} must be >= 0 (0 disables clipping).")
    if t.dtype not in ("float32", "bfloat16"):
        errs.append(f"train.dtype={t.dtype!r} is not one of ['float32', 'bfloat16'].")
    if t.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
        errs.append(f"train.activation_checkpointing={t.activation_checkpointing!r} is not one of "
                    f"{list(ACTIVATION_CHECKPOINTING)}, e.g. train.activation_checkpointing=blocks.")
    return errs
