"""One consolidated .safetensors file with Hugging Face-style (Llama / Mixtral-like) names,
and the way back for `checkpoint.init_from`.

safetensors format (github.com/huggingface/safetensors): 8-byte little-endian header length,
a JSON header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}
padded with spaces, then the raw little-endian bytes. Written here directly (pure numpy):
no pickle, nothing executed on load.
"""

from __future__ import annotations

import json
import os
import re
import struct
from typing import Callable, Dict, Iterator, Optional, Tuple

import numpy as np

SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "int64": "I64"}
_BACK = {v: k for k, v in SAFETENSORS_DTYPES.items()}

# tierzero name -> HF name (per layer i); the fused qkv and the stacked experts are split.
_PLAIN = [
    (r"^tok_embeddings\.weight$", "model.embed_tokens.weight"),
    (r"^output\.weight$", "lm_head.weight"),
    (r"^norm\.weight$", "model.norm.weight"),
    (r"^blocks\.(\d+)\.attn_norm\.weight$", "model.layers.{0}.input_layernorm.weight"),
    (r"^blocks\.(\d+)\.mlp_norm\.weight$", "model.layers.{0}.post_attention_layernorm.weight"),
    (r"^blocks\.(\d+)\.attn\.wo\.weight$", "model.layers.{0}.self_attn.o_proj.weight"),
    (r"^blocks\.(\d+)\.mlp\.w_(gate|up|down)\.weight$", "model.layers.{0}.mlp.{1}_proj.weight"),
    (r"^blocks\.(\d+)\.mlp\.router\.weight$", "model.layers.{0}.mlp.gate.weight"),
    (r"^blocks\.(\d+)\.mlp\.expert_bias$", "model.layers.{0}.mlp.gate.e_score_correction_bias"),
    (r"^blocks\.(\d+)\.mlp\.shared\.w_(gate|up|down)\.weight$", "model.layers.{0}.mlp.shared_expert.{1}_proj.weight"),
]
_QKV = re.compile(r"^blocks\.(\d+)\.attn\.wqkv\.weight$")
_EXPERTS = re.compile(r"^blocks\.(\d+)\.mlp\.experts\.w_(gate|up|down)$")


def hf_tensors(name: str, value: np.ndarray) -> Iterator[Tuple[str, np.ndarray]]:
    """The HF-named tensors one tierzero tensor becomes."""
    m = _QKV.match(name)
    if m:
        for part, chunk in zip(("q", "k", "v"), np.split(value, 3, axis=0)):  # rows: q, k, v
            yield f"model.layers.{m.group(1)}.self_attn.{part}_proj.weight", chunk
        return
    m = _EXPERTS.match(name)
    if m:
        for e in range(value.shape[0]):  # ours [E, in, out] for x @ W; nn.Linear stores [out, in]
            yield f"model.layers.{m.group(1)}.mlp.experts.{e}.{m.group(2)}_proj.weight", value[e].T
        return
    for pattern, template in _PLAIN:
        m = re.match(pattern, name)
        if m:
            yield template.format(*m.groups()), value
            return
    raise ValueError(f"no Hugging Face name for tensor {name!r}")


def tierzero_tensors(hf: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The inverse of hf_tensors over a whole file."""
    out: Dict[str, np.ndarray] = {}
    layer_parts: Dict[Tuple[str, str], Dict] = {}
    for name, value in hf.items():
        m = re.match(r"^model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.weight$", name)
        if m:
            layer_parts.setdefault(("qkv", m.group(1)), {})[m.group(2)] = value
            continue
        m = re.match(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$", name)
        if m:
            layer_parts.setdefault((f"experts.{m.group(3)}", m.group(1)), {})[int(m.group(2))] = value.T
            continue
        for pattern, template in _PLAIN:
            regex = "^" + re.escape(template).replace(r"\{0\}", r"(\d+)").replace(r"\{1\}", r"(gate|up|down)") + "$"
            m = re.match(regex, name)
            if m:
                out[_fill(pattern, m.groups())] = value
                break
        else:
            raise ValueError(f"{name!r} is not a tensor tierzero writes; was this file made by `tierzero ckpt export`?")
    for (kind, layer), parts in layer_parts.items():
        if kind == "qkv":
            out[f"blocks.{layer}.attn.wqkv.weight"] = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
        else:
            out[f"blocks.{layer}.mlp.experts.w_{kind.split('.')[1]}"] = np.stack([parts[e] for e in sorted(parts)])
    return out


def _fill(pattern: str, groups) -> str:
    """The tierzero name a _PLAIN pattern describes, with its groups filled in."""
    text = pattern.strip("^$").replace(r"\.", ".")
    for g in groups:
        text = re.sub(r"\([^)]*\)", g, text, count=1)
    return text


def write_safetensors(path: str, tensors: Dict[str, np.ndarray], metadata: Optional[Dict[str, str]] = None) -> int:
    """Write atomically (temp file + rename); returns the bytes written."""
    header, offset, blobs = {}, 0, []
    for name, value in tensors.items():
        value = np.ascontiguousarray(value)
        dtype = SAFETENSORS_DTYPES[str(value.dtype)]
        raw = value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": dtype, "shape": list(value.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for raw in blobs:
            f.write(raw)
    os.replace(tmp, path)
    return 8 + len(text) + offset


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100 * 2**20:
            raise ValueError(f"{path}: a {n}-byte header is not a safetensors file")
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _BACK:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}; tierzero reads {sorted(_BACK)}")
        b, e = info["data_offsets"]
        out[name] = np.frombuffer(data[b:e], dtype=np.dtype(_BACK[info["dtype"]]).newbyteorder("<")).reshape(info["shape"])
    return out


def consolidated(manifest, read: Callable[[str, int, int], np.ndarray]) -> Dict[str, np.ndarray]:
    """The model's weights (fp32 masters) and buffers, HF-named, from a checkpoint."""
    out: Dict[str, np.ndarray] = {}
    for name, entry in sorted(manifest.tensors.items()):
        kind, _, tname = name.partition("/")
        if kind not in ("model", "buffer"):
            continue
        value = read(name, 0, entry.numel).reshape(entry.shape)
        for hf_name, hf_value in hf_tensors(tname, value):
            out[hf_name] = hf_value
    return out


class InitFromError(ValueError):
    """checkpoint.init_from names a file that does not fit the model: the user's to fix."""


def load_into(model, path: str) -> int:
    """checkpoint.init_from: copy a consolidated file's weights into a freshly built model
    (before an engine shards it). Every parameter must be there with its shape."""
    import torch

    try:
        tensors = tierzero_tensors(read_safetensors(path))
    except (OSError, ValueError) as e:
        raise InitFromError(f"checkpoint.init_from={path} cannot be read: {e}") from e
    problems = []
    targets = dict(model.named_parameters())
    keys = set(model.state_dict().keys())
    targets.update({n: b for n, b in model.named_buffers() if n in keys})
    for name, target in targets.items():
        value = tensors.get(name)
        if value is None:
            problems.append(f"{name} is missing")
        elif tuple(value.shape) != tuple(target.shape):
            problems.append(f"{name} has shape {list(value.shape)}, the model's is {list(target.shape)}")
    extra = sorted(set(tensors) - set(targets))
    if extra:
        problems.append(f"tensors the model does not have: {extra[:5]}")
    if problems:
        raise InitFromError(f"checkpoint.init_from={path} does not fit this model.* / moe.* config: "
                         + "; ".join(problems[:6]))
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(torch.from_numpy(np.array(tensors[name])).to(target.dtype))
    return len(targets)
