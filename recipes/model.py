"""A small decoder-only transformer (Llama-style: RMSNorm, rotary attention, SwiGLU, no biases).

Each `Block` owns everything it needs (its norms, its rotary tables), so an engine can wrap,
shard or move blocks one at a time. Parameter names are part of the checkpoint format:

    tok_embeddings.weight
    blocks.{i}.attn_norm.weight   blocks.{i}.attn.wqkv.weight   blocks.{i}.attn.wo.weight
    blocks.{i}.mlp_norm.weight    blocks.{i}.mlp.w_gate.weight  blocks.{i}.mlp.w_up.weight
    blocks.{i}.mlp.w_down.weight
    norm.weight
    output.weight                 (the same tensor as tok_embeddings.weight when tied)
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from tierzero.parallel.moe import MoEConfig, MoEFeedForward, SwiGLU  # noqa: F401 (SwiGLU re-exported)
from tierzero.recipes.config import ModelConfig, default_ffn_hidden, model_errors  # noqa: F401 (re-exported)
from tierzero.recipes.planning import loss_chunk_tokens

INIT_STD = 0.02
INIT_CHUNK = 1 << 18
"""Elements per independently seeded piece of a parameter's initial values (keyed_normal)."""


def _init_key(seed: int, name: str, chunk: int) -> int:
    import hashlib

    digest = hashlib.blake2b(f"{seed}\0{name}\0{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds are < 2^63


def keyed_normal(seed: int, name: str, start: int, numel: int, total: int) -> torch.Tensor:
    """Elements [start, start + numel) of the flattened standard-normal tensor of `total`
    elements keyed by (seed, name), float32 on the CPU.

    The values come in pieces of INIT_CHUNK elements, each from a generator seeded by (seed,
    name, piece), so any slice is the same numbers whoever asks for it: a rank materialises only
    its shard (a few pieces at its edges more), and every world size initialises the same
    global model."""
    out = torch.empty(numel)
    if numel == 0:
        return out
    for c in range(start // INIT_CHUNK, (start + numel - 1) // INIT_CHUNK + 1):
        lo = c * INIT_CHUNK
        g = torch.Generator().manual_seed(_init_key(seed, name, c))
        piece = torch.randn(min(INIT_CHUNK, total - lo), generator=g)
        a, b = max(start, lo), min(start + numel, lo + piece.numel())
        out[a - start:b - start] = piece[a - lo:b - lo]
    return out


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in float32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


def rotary_tables(head_dim: int, seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each [seq_len, head_dim // 2], of RoFormer's rotation angles (Su et al. 2021)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., j], x[..., j + head_dim/2]) of x [b, h, t, head_dim] (GPT-NeoX layout)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos.float(), sin.float()
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, seq_len: int, rope_theta: float):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.seq_len = seq_len
        self.rope_theta = rope_theta
        self.wqkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.wo = nn.Linear(d_model, d_model, bias=False)
        # Non-persistent: derived from the config, so they stay out of checkpoints.
        cos, sin = rotary_tables(self.head_dim, seq_len, rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def reset_buffers(self) -> None:
        cos, sin = rotary_tables(self.head_dim, self.seq_len, self.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        if t > self.seq_len:
            raise ValueError(f"sequence of {t} tokens is longer than the model's seq_len={self.seq_len}")
        qkv = self.wqkv(x).view(b, t, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [b, h, t, head_dim]
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [b, h, t, head_dim]
        return self.wo(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)); the mlp is a SwiGLU,
    or with moe.num_experts > 0 a Mixture-of-Experts layer (parallel/moe.py)."""

    def __init__(self, cfg: ModelConfig, seq_len: int, moe: Optional[MoEConfig] = None):
        super().__init__()
        hidden = cfg.ffn_hidden or default_ffn_hidden(cfg.d_model)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, seq_len, cfg.rope_theta)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if moe is not None and moe.num_experts:
            self.mlp = MoEFeedForward(cfg.d_model, moe.expert_hidden or hidden, moe)
        else:
            self.mlp = SwiGLU(cfg.d_model, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, seq_len: int, moe: Optional[MoEConfig] = None,
                 seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.init_seed = seed
        self.moe = moe
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.tok_embeddings = nn.Embedding(vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, seq_len, moe) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # global sizes, before an engine keeps only its experts or its shards
        self.global_numel = {name: p.numel() for name, p in self.named_parameters(remove_duplicate=False)}
        if self.tok_embeddings.weight.device.type != "meta":
            self.init_weights()

    def init_std(self, name: str) -> Optional[float]:
        """How parameter `name` starts: None for ones (the norms), else Normal(0, std): 0.02
        everywhere, 0.02 / sqrt(2 n_layers) for the projections that write into the residual
        stream (attn.wo, the w_down of every feed-forward) so the residual variance does not
        grow with depth (GPT-2, Radford et al. 2019, section 2.3)."""
        if name.endswith("norm.weight"):
            return None
        if name.endswith(("attn.wo.weight", "w_down.weight", "experts.w_down")):
            return INIT_STD / math.sqrt(2 * self.cfg.n_layers)
        return INIT_STD

    def init_slice(self, name: str, start: int, numel: int) -> torch.Tensor:
        """Elements [start, start + numel) of parameter `name`'s flattened initial value (its
        global form: all experts), float32 on the CPU: the same numbers for every layout."""
        if name == "output.weight" and self.cfg.tie_embeddings:  # one tensor (to_empty unties it)
            name = "tok_embeddings.weight"
        std = self.init_std(name)
        if std is None:
            return torch.ones(numel)
        return keyed_normal(self.init_seed, name, start, numel, self.global_numel[name]).mul_(std)

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter (init_slice: keyed by train.seed and the parameter's
        name) and every buffer in place, e.g. after `to_empty()`."""
        for name, p in self.named_parameters():
            p.copy_(self.init_slice(name, 0, p.numel()).view(p.shape))
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """The rotary tables and the MoE selection biases, float32 (e.g. after `to_empty()`)."""
        for block in self.blocks:
            block.attn.reset_buffers()
            if isinstance(block.mlp, MoEFeedForward):
                block.mlp.expert_bias.zero_()

    def materialize_buffers(self, device) -> None:
        """A model built on the meta device: its buffers made real (float32, on `device`) and
        reset; its parameters stay on meta for an engine to materialise as shards."""
        for module in self.modules():
            for key, buf in list(module._buffers.items()):
                if buf is not None and buf.is_meta:
                    module._buffers[key] = torch.empty(buf.shape, dtype=torch.float32, device=device)
        self.reset_buffers()

    # The sharded engine drives embed -> blocks -> head itself, one block at a time, so the
    # three stages are methods; forward is their composition.
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(tokens)  # [b, t] -> [b, t, d_model]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(x))  # [b, t, d_model] -> [b, t, vocab_size]

    def head_loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean next-token loss from the last block's output, x [b, t, d_model] in the compute
        dtype and targets [b, t] (int64) -> a float32 scalar: loss_fn(self.head(x), targets) within
        float32 rounding, gradients included, but the logits are never held for the whole batch
        (linear_cross_entropy: chunk by chunk). Under torch.no_grad it builds no autograd state."""
        h = self.norm(x)  # plain autograd: the norm's weight gets its gradient through h
        return linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.output.weight, targets.reshape(-1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, t] (int64) -> logits [b, t, vocab_size] in the parameters' dtype."""
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def build_model(cfg: ModelConfig, vocab_size: int, seq_len: int, moe: Optional[MoEConfig] = None,
                seed: int = 0) -> Transformer:
    """A freshly initialised model (float32, on the default device; on the meta device under
    `torch.device("meta")`, for an engine to materialise), its values keyed by `seed`
    (train.seed) and each parameter's name (Transformer.init_slice).
    With `moe` (moe.num_experts > 0) every block's feed-forward is a Mixture-of-Experts layer
    holding all experts until an engine binds it to an expert-parallel group."""
    errors = model_errors(cfg) + (moe.errors() if moe is not None else [])
    if vocab_size < 1:
        errors.append(f"vocab_size={vocab_size} must be at least 1 (it comes from data.vocab_size).")
    if seq_len < 1:
        errors.append(f"seq_len={seq_len} must be at least 1 (it comes from data.seq_len).")
    if errors:
        raise ValueError("\n".join(errors))
    return Transformer(cfg, vocab_size, seq_len, moe, seed)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats; logits [b, t, V], targets [b, t]. Computed in float32."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


IGNORE_INDEX = -100
"""A target that counts for nothing: F.cross_entropy's default ignore_index, which loss_fn keeps."""


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_tokens: Optional[int] = None) -> torch.Tensor:
    """loss_fn(F.linear(h, weight), targets) for h [N, d] and weight [V, d] in one dtype and
    targets [N] (int64), without the [N, V] logits: `chunk_tokens` tokens at a time
    (recipes.planning.loss_chunk_tokens: one chunk's float32 logits within 256 MiB).

    The gradients are made in the forward, chunk by chunk, while the chunk's softmax is at hand
    (_LinearCrossEntropy), as Liger-Kernel's fused linear cross-entropy does (Hsu et al. 2024,
    "Liger Kernel", arXiv:2410.10989): no recomputation, so the FLOPs are the plain loss's, and
    the backward needs neither the logits nor the weight. The norm before it stays plain autograd
    (Transformer.head_loss)."""
    chunk = chunk_tokens or loss_chunk_tokens(weight.shape[0])
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, targets, chunk)
    with torch.no_grad():
        return _chunk_loss(h, weight, targets, chunk, None, None)


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                grad_h: Optional[torch.Tensor], grad_w: Optional[torch.Tensor]) -> torch.Tensor:
    """The mean cross-entropy of F.linear(h, weight) against targets, `chunk` rows at a time,
    with autograd off; where given, writes d loss / d h into grad_h [N, d] (in the compute
    dtype, as the plain loss's backward makes it) and adds d loss / d weight into grad_w [V, d]
    (float32, zeroed by the caller: a sum over chunks, rounded to the compute dtype once, by the
    caller, as the plain backward's one matmul rounds it once).

    Per chunk, in float32 and in place: z = logits, lse = max + log sum exp(z - max) (what
    log_softmax computes), loss = lse - z[target]; d loss / d z = (softmax(z) - onehot) / N."""
    valid = targets != IGNORE_INDEX
    count = valid.sum()  # the mean's N, kept on the device (no host read)
    safe = targets.masked_fill(~valid, 0)  # an ignored row reads column 0 and weighs 0
    weigh = valid.float() / count if grad_h is not None or grad_w is not None else None
    total = h.new_zeros((), dtype=torch.float32)
    for lo in range(0, h.shape[0], chunk):
        hi = min(lo + chunk, h.shape[0])
        t = safe[lo:hi, None]  # [n, 1]
        z = F.linear(h[lo:hi], weight).float()  # [n, V] float32; the compute-dtype copy is gone
        target_logit = z.gather(1, t)
        zmax = z.amax(1, keepdim=True)
        sum_exp = z.sub_(zmax).exp_().sum(1, keepdim=True)
        row_loss = (zmax + sum_exp.log() - target_logit).squeeze(1)  # [n]
        total += row_loss.masked_fill(~valid[lo:hi], 0).sum()
        if weigh is None:
            del z
            continue
        z.div_(sum_exp).scatter_add_(1, t, torch.full_like(target_logit, -1.0))  # softmax - onehot
        dz = z.mul_(weigh[lo:hi, None]).to(h.dtype)  # [n, V]: d loss / d logits, as autograd casts it
        if grad_h is not None:
            torch.mm(dz, weight, out=grad_h[lo:hi])
        if grad_w is not None and dz.dtype == grad_w.dtype:
            grad_w.addmm_(dz.t(), h[lo:hi])
        elif grad_w is not None:  # a 16-bit chunk's [V, d] rounded once, summed in float32
            grad_w.add_(dz.t() @ h[lo:hi])  # (addmm_ takes no mixed dtypes)
        del z, dz  # before the next chunk's logits exist: one chunk at a time
    return total / count


class _LinearCrossEntropy(torch.autograd.Function):
    """linear_cross_entropy with its gradients computed in the forward (_chunk_loss) and kept
    for the backward, which only scales them by the loss's incoming gradient."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h, memory_format=torch.contiguous_format) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        loss = _chunk_loss(h, weight, targets, chunk, grad_h, grad_w)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        # saved, not ctx attributes: autograd frees them as soon as this backward has run, and a
        # second backward through a retained graph fails (they are scaled in place) instead of
        # silently scaling twice
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h.mul_(grad_loss)
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_loss)
        return grad_h, grad_w, None, None


def num_params(model: nn.Module) -> int:
    """Number of unique parameters (a tied embedding/output weight counts once)."""
    return sum(p.numel() for p in model.parameters())  # parameters() already de-duplicates


def count_params(cfg: ModelConfig, vocab_size: int, moe: Optional[MoEConfig] = None, active: bool = False) -> int:
    """What `num_params(build_model(cfg, vocab_size, ..., moe))` returns, without building the
    model; `active`: the parameters one token uses (top_k routed experts, not all of them)."""
    d, hidden = cfg.d_model, cfg.ffn_hidden or default_ffn_hidden(cfg.d_model)
    if moe is not None and moe.num_experts:
        h = moe.expert_hidden or hidden
        routed = moe.top_k if active else moe.num_experts
        mlp = d * moe.num_experts + 3 * d * h * (routed + moe.shared_experts)  # router + experts
    else:
        mlp = 3 * d * hidden
    per_block = 2 * d + 4 * d * d + mlp  # two norms, wqkv + wo, feed-forward
    embeddings = vocab_size * d * (1 if cfg.tie_embeddings else 2)
    return embeddings + cfg.n_layers * per_block + d


def flops_per_token(
    cfg: ModelConfig, vocab_size: int, seq_len: int, num_params: Optional[int] = None,
    moe: Optional[MoEConfig] = None,
) -> int:
    """Training FLOPs (forward + backward) per token: 6 N + 12 n_layers d_model seq_len.

    PaLM (Chowdhery et al. 2022), appendix B: 6N for the weight matmuls (2 forward, 4 backward)
    plus 12 L H Q T for the attention scores and values, with H x Q = d_model. N defaults to
    `count_params(cfg, vocab_size)`; the embedding lookup costs nothing, but with tied weights
    that same matrix is the output head's matmul, so counting it once is right.
    """
    if num_params is None or (moe is not None and moe.num_experts):
        num_params = count_params(cfg, vocab_size, moe, active=True)  # an MoE counts active params
    return 6 * num_params + 12 * cfg.n_layers * cfg.d_model * seq_len
