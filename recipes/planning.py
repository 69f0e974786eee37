"""The planner's inputs from a recipe, computed once for `tierzero plan` and `tierzero run`.

Besides the topology and `parallel.*`, the planner needs four things from the recipe: the
units the engine cuts the model into, the compute dtype's bytes, the micro-steps per
optimizer step and the experts' all-to-all traffic (parallel.cost.PlanInputs). `run` has
the model it trains; `plan` builds the recipe's model on the meta device, or knows only a
size (model.params) and plans equal blocks. Torch is imported only where a model is built
or measured, so planning a model known by its size stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Tuple

from tierzero.parallel.cost import MoETraffic, PlanInputs, uniform_units
from tierzero.parallel.moe_config import MoEConfig
from tierzero.recipes.config import DataConfig, ModelConfig, TrainConfig

if TYPE_CHECKING:
    from tierzero.recipes.model import Transformer


def planning_inputs(
    *,
    train_cfg: TrainConfig,
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    moe_cfg: Optional[MoEConfig] = None,
    ep: int = 1,
    world_size: int,
    model: Optional[Transformer] = None,
    reduce_dtype: str = "float32",
) -> PlanInputs:
    """What the planner needs to know about this recipe on `world_size` ranks.

    `model`: the model the run trains (the trainer's; its units are what the engine shards).
    Without it, a model given only by its size (model.params) is planned as model.n_layers
    equal blocks with no expert traffic, and otherwise the recipe's model is built on the
    meta device. `ep` (parallel.ep) only enters the model summary; `reduce_dtype`
    (parallel.reduce_dtype) sizes the gradient reduce-scatter of a bfloat16 run."""
    grad_accum, notes = _grad_accum(train_cfg, world_size)
    # as the native engine reduces: in bfloat16 only when the compute dtype is bfloat16 too, else in float32
    reduce_bytes = 2 if reduce_dtype == "bfloat16" and train_cfg.dtype == "bfloat16" else 4
    if model is None and model_cfg.params:
        summary = f"{model_cfg.params:.4g} params (model.params, {model_cfg.n_layers} equal blocks)"
        return PlanInputs(tuple(uniform_units(model_cfg.params, model_cfg.n_layers)), dtype_bytes(train_cfg),
                          grad_accum, None, summary, notes, reduce_bytes,
                          activation_bytes(train_cfg, model_cfg, moe_cfg, data_cfg.seq_len, data_cfg.vocab_size))
    from tierzero.parallel.engines.units import model_units

    if model is None:
        model = _meta_model(model_cfg, data_cfg, moe_cfg)
    units = tuple(model_units(model))
    # data.seq_len is the dataset's and the model's sequence length (recipes.data.build_dataset)
    moe = moe_traffic(train_cfg, model_cfg, moe_cfg, data_cfg.seq_len)
    summary = f"{sum(u.numel for u in units):,} params (the recipe's model)"
    if moe is not None:
        from tierzero.recipes.model import count_params

        active = count_params(model_cfg, model.vocab_size, moe_cfg, active=True)
        summary += f"; MoE {moe_cfg.num_experts} experts, top-{moe_cfg.top_k}, {active:,} active, parallel.ep={ep}"
    return PlanInputs(units, dtype_bytes(train_cfg), grad_accum, moe, summary, notes, reduce_bytes,
                      activation_bytes(train_cfg, model_cfg, moe_cfg, data_cfg.seq_len, model.vocab_size))


def activation_bytes(train_cfg: TrainConfig, model_cfg: ModelConfig, moe_cfg: Optional[MoEConfig], seq_len: int,
                     vocab_size: int) -> float:
    """Bytes of one micro-batch's activations a rank keeps for the backward (no recomputation).

    Per layer s b h (11 + 19 m + 4) in a 16-bit dtype, after Korthikanti et al. 2022 ("Reducing
    Activation Recomputation in Large Transformer Models", section 4.1): 11 s b h for attention,
    19 s b h for a 4h-wide MLP, 4 s b h for the norms. Their 5 a s^2 b of attention scores is left
    out: scaled_dot_product_attention's flash and memory-efficient kernels keep none. m scales
    the MLP term to this model's width (ffn hidden / 4h), and for an MoE layer by the experts a
    token visits (top_k + shared experts, each expert_hidden wide), plus the dispatch's copies of
    each routed token (4 top_k s b h: gathered, regrouped, expert output, weighted) and the
    router's float32 logits and scores (12 E s b bytes). Scaled by the compute dtype; plus the
    loss's one chunk of logits (loss_chunk_bytes: the chunked linear + cross-entropy of
    recipes.model.head_loss never holds the whole micro-batch's). With
    train.activation_checkpointing=blocks: every block's input (L s b h) and one block's whole
    set, the one being recomputed."""
    s, b, h, L = seq_len, train_cfg.micro_batch_size, model_cfg.d_model, model_cfg.n_layers
    if not h:
        return 0.0
    from tierzero.recipes.config import default_ffn_hidden

    hidden = model_cfg.ffn_hidden or default_ffn_hidden(h)
    m, dispatch, router = hidden / (4 * h), 0, 0
    if moe_cfg is not None and moe_cfg.num_experts:
        m = (moe_cfg.expert_hidden or hidden) / (4 * h) * (moe_cfg.top_k + moe_cfg.shared_experts)
        dispatch, router = 4 * moe_cfg.top_k, 12 * moe_cfg.num_experts * s * b
    per_layer = s * b * h * (11 + 19 * m + 4 + dispatch) * dtype_bytes(train_cfg) / 2 + router
    logits = loss_chunk_bytes(s * b, vocab_size, h, dtype_bytes(train_cfg))
    if getattr(train_cfg, "activation_checkpointing", "none") == "blocks":
        # each block keeps its input; the one being recomputed holds its whole set again
        return L * s * b * h * dtype_bytes(train_cfg) + per_layer + logits
    return L * per_layer + logits


LOSS_CHUNK_BYTES = 256 * 2**20
"""The most bytes one chunk of the chunked loss's float32 logits may take (recipes.model.head_loss):
at vocab 50,304 that is 1,280 tokens a chunk, 7 chunks for micro-batch 2 x seq 4096, whose
logits in float32 would take 1.5 GiB at once. Big enough that a chunk's matmuls stay efficient
(1,280 x d_model x 50,304), small beside the activations."""


def loss_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk of the chunked linear + cross-entropy (recipes.model.head_loss): as many
    as keep one chunk's float32 logits within LOSS_CHUNK_BYTES, rounded down to a multiple of 128
    where there are that many, so the chunk's matmuls keep tensor-core-friendly shapes."""
    n = max(1, LOSS_CHUNK_BYTES // (4 * max(1, vocab_size)))
    return n - n % 128 if n >= 128 else n


def loss_chunk_bytes(num_tokens: int, vocab_size: int, d_model: int, dtype_bytes: int) -> int:
    """The loss's peak above the activations for `num_tokens` tokens (recipes.model._chunk_loss):
    one chunk's logits in float32 (their softmax, then their gradient, in place); for a 16-bit
    compute dtype also the chunk's logits as the matmul writes them, then their gradient cast
    back for the matmuls, and the output weight's gradient summed over the chunks in float32
    beside one chunk's share of it (4 + 2 bytes per weight). Its gradients w.r.t. the hidden
    states and the weight, in the compute dtype, are what the plain loss's backward makes too
    (the plan's buffers count the weight's)."""
    tokens = min(num_tokens, loss_chunk_tokens(vocab_size))
    if dtype_bytes == 4:
        return tokens * vocab_size * 4
    return tokens * vocab_size * (4 + dtype_bytes) + vocab_size * d_model * (4 + dtype_bytes)


def dtype_bytes(train_cfg: TrainConfig) -> int:
    """Bytes of train.dtype: torch.finfo(recipes.trainer.dtype_of(train_cfg)).bits // 8 for the
    two dtypes train.dtype allows, without importing torch."""
    return 2 if train_cfg.dtype == "bfloat16" else 4


def moe_traffic(train_cfg: TrainConfig, model_cfg: ModelConfig, moe_cfg: Optional[MoEConfig],
                seq_len: int) -> Optional[MoETraffic]:
    """The experts' all-to-all as the cost model charges it; None for a dense model."""
    if moe_cfg is None or not moe_cfg.num_experts:
        return None
    return MoETraffic(tokens_per_micro_step=train_cfg.micro_batch_size * seq_len, d_model=model_cfg.d_model,
                      top_k=moe_cfg.top_k, num_layers=model_cfg.n_layers, num_experts=moe_cfg.num_experts,
                      max_nodes_per_token=moe_cfg.max_nodes_per_token, dispatch=moe_cfg.dispatch)


def _grad_accum(train_cfg: TrainConfig, world_size: int) -> Tuple[int, Tuple[str, ...]]:
    """global batch / (micro batch x ranks), and a note when it does not divide: `run` refuses
    that batch (launcher.config.check_world), `plan` plans one micro-step per optimizer step."""
    per_pass = train_cfg.micro_batch_size * world_size
    if train_cfg.global_batch_size % per_pass == 0:
        return train_cfg.global_batch_size // per_pass, ()
    # e.g. a laptop recipe planned for a 48-node preset
    return 1, (f"train.global_batch_size={train_cfg.global_batch_size} does not split into train.micro_batch_size="
               f"{train_cfg.micro_batch_size} x {world_size} ranks: planned with 1 micro-step per optimizer "
               f"step (global batch {per_pass}); `tierzero run` needs e.g. train.global_batch_size={per_pass}",)


def _meta_model(model_cfg: ModelConfig, data_cfg: DataConfig, moe_cfg: Optional[MoEConfig]) -> Transformer:
    """The recipe's model on the meta device: its shapes without its memory."""
    import torch

    from tierzero.recipes.model import build_model

    vocab, seq_len = data_cfg.vocab_size, data_cfg.seq_len
    if not (data_cfg.kind == "markov" or data_cfg.vocab_size):
        # a token file with data.vocab_size=0: its largest token decides (one pass over the file)
        from tierzero.recipes.data import build_dataset

        data = build_dataset(data_cfg)
        vocab, seq_len = data.vocab_size, data.seq_len
    with torch.device("meta"):
        return build_model(model_cfg, vocab_size=vocab, seq_len=seq_len, moe=moe_cfg)
