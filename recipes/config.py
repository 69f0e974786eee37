"""Config sections owned by the recipes: `train.*`, `model.*`, `data.*`.

Each field's docstring (the string literal under it) is what `tierzero config --describe`
and docs/config.md show.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
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
    compile: bool = False
    """torch.compile each transformer block in place (parameter names unchanged) and the head with the loss; the cache goes to <run.dir>/compile-cache unless TORCHINDUCTOR_CACHE_DIR is set."""
    eval_every: int = 0
    """Evaluate the held-out data (data.eval_path or data.eval_fraction) after every N optimizer steps; 0 = never."""
    eval_steps: int = 4
    """Batches of train.global_batch_size held-out sequences per evaluation (the same batches every time)."""


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
    from_hf: Optional[str] = None
    """A Hugging Face Llama or Mixtral folder: its config.json sets model.*, moe.* and data.vocab_size, its weights initialise the run (implies checkpoint.init_from=DIR)."""


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
    paths: List[str] = field(default_factory=list)
    """tokens: a mixture of token files (instead of data.path); sample i's file is drawn by a hash of (data.seed, i) against data.weights."""
    weights: List[float] = field(default_factory=list)
    """tokens: the mixture's weight per data.paths entry (positive, normalised to sum 1); empty = equal weights."""
    eval_path: Optional[str] = None
    """tokens: a held-out token file for train.eval_every (same data.token_dtype and vocabulary)."""
    eval_fraction: float = 0.0
    """tokens: hold out this fraction of each training file (its last samples) for train.eval_every instead of data.eval_path; 0 = none."""


# ---- model.from_hf: the shape of a published model --------------------------------------------

FROM_HF_KEYS = ("model.d_model", "model.n_layers", "model.n_heads", "model.ffn_hidden", "model.rope_theta",
                "model.norm_eps", "model.tie_embeddings", "data.vocab_size", "moe.num_experts", "moe.top_k",
                "moe.gate", "moe.norm_topk_prob", "moe.shared_experts", "moe.expert_hidden")
"""What model.from_hf sets (over the recipe's values); the rest of moe.* (loss weights, capacity) stays the user's."""


def apply_from_hf(model: ModelConfig, data: DataConfig, moe, checkpoint) -> List[str]:
    """model.from_hf=DIR: set FROM_HF_KEYS from DIR/config.json (a Llama or Mixtral) and
    checkpoint.init_from=DIR, in place; returns the problems (nothing is set if there are any)."""
    where = model.from_hf
    if where is None:
        return []
    from tierzero.checkpoint.export import SafetensorsError, read_hf_config
    from tierzero.checkpoint.hf import settings_from_hf

    if "://" in where or not os.path.isdir(where):
        return [f"model.from_hf={where} is not a local folder; give the folder a Hugging Face model was saved to "
                "(config.json + model.safetensors or its shards), e.g. model.from_hf=/models/llama-tiny"]
    if checkpoint.init_from not in (None, where):
        return [f"model.from_hf={where} initialises from that folder's weights, but checkpoint.init_from="
                f"{checkpoint.init_from} names other weights; drop checkpoint.init_from (or model.from_hf)"]
    try:
        hf = read_hf_config(where)
    except (OSError, SafetensorsError) as e:
        return [f"model.from_hf={where}: cannot read its config.json ({e}); give a folder saved by transformers' "
                "save_pretrained or `tierzero ckpt export`"]
    values, problems = settings_from_hf(hf, where=where, seq_len=data.seq_len)
    if problems:
        return problems
    sections = {"model": model, "data": data, "moe": moe}
    for key, value in values.items():
        section, name = key.split(".")
        setattr(sections[section], name, value)
    checkpoint.init_from = where
    return []


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

    Touches the disk only to check that data.path, data.paths and data.eval_path exist.
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
        for key in ("paths", "weights", "eval_path"):
            if getattr(cfg, key):
                errors.append(f"data.{key}={getattr(cfg, key)} is for token files; set data.kind=tokens, "
                              f"or drop data.{key} for the synthetic language.")
        if cfg.eval_fraction:
            errors.append(f"data.eval_fraction={cfg.eval_fraction} holds out part of token files; set "
                          "data.kind=tokens, or drop it (synthetic data has no held-out positions).")
    elif cfg.kind == "tokens":
        errors += _source_errors(cfg)
        if cfg.token_dtype not in TOKEN_DTYPES:
            errors.append(
                f"data.token_dtype={cfg.token_dtype!r} is not supported; valid: {', '.join(TOKEN_DTYPES)}."
            )
        if cfg.vocab_size < 0:
            errors.append(
                f"data.vocab_size={cfg.vocab_size} must be 0 (max token + 1, scans the file) or positive."
            )
    return errors




def _source_errors(cfg: DataConfig) -> list[str]:
    """data.path or data.paths + data.weights, data.eval_path and data.eval_fraction (kind=tokens)."""
    errors = []
    if cfg.path and cfg.paths:
        errors.append(f"data.path={cfg.path!r} and data.paths={list(cfg.paths)} are both set; give one file as "
                      "data.path or a mixture as data.paths (a one-element data.paths is the same as data.path).")
    elif not cfg.path and not cfg.paths:
        errors.append("data.path is not set; data.kind=tokens needs data.path=/path/to/tokens.bin "
                      "(or a mixture: data.paths=[a.bin,b.bin] data.weights=[0.7,0.3]).")
    for key, path in [("data.path", cfg.path)] + [(f"data.paths[{k}]", p) for k, p in enumerate(cfg.paths)] + \
            [("data.eval_path", cfg.eval_path)]:
        if path and not os.path.isfile(path):
            errors.append(f"{key}={path!r} is not a file; check the path, or use data.kind=markov for synthetic data.")
    weights = list(cfg.weights)
    if weights and not cfg.paths:
        errors.append(f"data.weights={weights} weighs a mixture, but data.paths is not set; give the files as "
                      f"data.paths=[...] with one weight each, or drop data.weights.")
    elif weights and len(weights) != len(cfg.paths):
        errors.append(f"data.weights={weights} has {len(weights)} weight(s) for the {len(cfg.paths)} file(s) of "
                      f"data.paths; give one weight per file, e.g. data.weights={[1.0] * len(cfg.paths)} "
                      "(or drop data.weights for equal weights).")
    bad = [w for w in weights if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0)]
    if bad:
        errors.append(f"data.weights={weights}: {bad} not positive and finite; every source needs a weight > 0 "
                      "(drop a file from data.paths to leave it out).")
    if not (math.isfinite(cfg.eval_fraction) and 0 <= cfg.eval_fraction < 1):
        errors.append(f"data.eval_fraction={cfg.eval_fraction} must be in [0, 1): the share of each file's samples "
                      "held out for evaluation, e.g. data.eval_fraction=0.01 (0 = none).")
    elif cfg.eval_fraction and cfg.eval_path:
        errors.append(f"data.eval_path={cfg.eval_path!r} and data.eval_fraction={cfg.eval_fraction} are both set; "
                      "evaluate on a file of its own or on a held-out fraction, not both.")
    return errors


def eval_errors(t: TrainConfig, data: DataConfig) -> List[str]:
    """train.eval_every needs held-out data (data.eval_path or data.eval_fraction)."""
    if t.eval_every > 0 and not (data.eval_path or data.eval_fraction):
        return [f"train.eval_every={t.eval_every} evaluates held-out data, but neither data.eval_path nor "
                "data.eval_fraction is set; add one (e.g. data.eval_fraction=0.01) or set train.eval_every=0."]
    return []


def train_errors(t: TrainConfig) -> List[str]:
    """Every problem with `train.*` that does not need the world size."""
    errs = []
    for key in ("steps", "global_batch_size", "micro_batch_size", "log_every", "max_nonfinite", "eval_steps"):
        if getattr(t, key) < 1:
            errs.append(f"train.{key}={getattr(t, key)} must be at least 1.")
    if t.on_nonfinite not in NONFINITE_ACTIONS:
        errs.append(f"train.on_nonfinite={t.on_nonfinite!r} is not one of {list(NONFINITE_ACTIONS)}")
    if t.eval_every < 0:
        errs.append(f"train.eval_every={t.eval_every} must be >= 0 (0 = never evaluate), e.g. train.eval_every=100.")
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
