"""One consolidated .safetensors file with Hugging Face-style (Llama / Mixtral-like) names,
and the way back for `checkpoint.init_from`.

safetensors format (github.com/huggingface/safetensors): 8-byte little-endian header length,
a JSON header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}
padded with spaces, then the raw little-endian bytes. Written here directly (pure numpy):
no pickle, nothing executed on load.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import struct
import tempfile
from typing import Callable, Dict, Iterator, Optional, Tuple

import numpy as np

from tierzero.checkpoint.manifest import MAX_NUMEL, ManifestError, load_json

SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "int64": "I64"}
_BACK = {v: k for k, v in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100 * 2**20
"""safetensors' own limit on the JSON header (its reader refuses more)."""


class SafetensorsError(ValueError):
    """A file that is not a well-formed safetensors file tierzero can read; names the file and why."""


class ExportError(ValueError):
    """`tierzero ckpt export` refuses its output path (not a regular file): the user's to fix."""


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
            missing = [p for p in "qkv" if p not in parts]
            if missing:
                raise ValueError(f"layer {layer} has no self_attn.{'/'.join(missing)}_proj.weight beside the others")
            out[f"blocks.{layer}.attn.wqkv.weight"] = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
        else:
            if sorted(parts) != list(range(len(parts))):
                raise ValueError(f"layer {layer}'s experts are numbered {sorted(parts)[:8]}, not 0..{len(parts) - 1}")
            out[f"blocks.{layer}.mlp.experts.w_{kind.split('.')[1]}"] = np.stack([parts[e] for e in sorted(parts)])
    return out


def _fill(pattern: str, groups) -> str:
    """The tierzero name a _PLAIN pattern describes, with its groups filled in."""
    text = pattern.strip("^$").replace(r"\.", ".")
    for g in groups:
        text = re.sub(r"\([^)]*\)", g, text, count=1)
    return text


def _file_kind(mode: int) -> str:
    for test, word in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device")):
        if test(mode):
            return word
    return "not a regular file"


def write_safetensors(path: str, tensors: Dict[str, np.ndarray], metadata: Optional[Dict[str, str]] = None) -> int:
    """Write atomically: a mkstemp file in the output's folder (O_EXCL: no name another user
    can plant a link at), fsynced, renamed over `path`. An existing `path` that is not a
    regular file (a link, a FIFO, a folder, a device) is never replaced: ExportError. Returns
    the bytes written."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        raise ExportError(f"{path} exists and is {_file_kind(mode)}, not a regular file: tierzero ckpt export never "
                          "replaces it (nor writes through it); remove it or give another output file")
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
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            umask = os.umask(0o022)
            os.umask(umask)
            os.fchmod(f.fileno(), 0o666 & ~umask)  # what open() would have made, not mkstemp's 0600
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for raw in blobs:
                f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return 8 + len(text) + offset


def _read_file(path: str) -> bytes:
    """A regular file's bytes; a FIFO or device is refused without blocking on it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.EACCES, errno.EISDIR):
            raise
        raise SafetensorsError(f"{path} cannot be opened: {e.strerror or e}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SafetensorsError(f"{path} is {_file_kind(st.st_mode)}, not a file")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    finally:
        os.close(fd)


def _sizes(v) -> bool:
    return isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v)


def _entry_problem(name: str, info, data_len: int) -> Optional[str]:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        return f"tensor {name!r} is {str(info)[:60]!r}, not an object with dtype, shape and data_offsets"
    if not isinstance(info["dtype"], str) or info["dtype"] not in _BACK:
        return f"tensor {name} has dtype {str(info['dtype'])[:20]!r}; tierzero reads {sorted(_BACK)}"
    shape, offsets = info["shape"], info["data_offsets"]
    if not _sizes(shape) or int(np.prod(shape, dtype=object)) > MAX_NUMEL:
        return (f"tensor {name} has shape {str(shape)[:60]}: not a list of non-negative sizes "
                f"(at most {MAX_NUMEL} elements)")
    if not _sizes(offsets) or len(offsets) != 2 or not offsets[0] <= offsets[1] <= data_len:
        return f"tensor {name} has data_offsets {str(offsets)[:60]}: not [begin, end] inside the {data_len} data bytes"
    need = int(np.prod(shape, dtype=object)) * np.dtype(_BACK[info["dtype"]]).itemsize
    if offsets[1] - offsets[0] != need:
        return f"tensor {name}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, shape {shape} needs {need}"
    return None


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """Every tensor of a safetensors file, checked whole first: header length, JSON (depth
    bounded), each entry's dtype, shape and byte range inside the file. Raises
    SafetensorsError (a ValueError) naming the file and the first problems."""
    blob = _read_file(path)
    if len(blob) < 8:
        raise SafetensorsError(f"{path} is {len(blob)} bytes: too short for a safetensors file (8-byte header "
                               "length, JSON header, data)")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > min(MAX_HEADER_BYTES, len(blob) - 8):
        raise SafetensorsError(f"{path}: a {n}-byte header in a {len(blob)}-byte file is not a safetensors file")
    try:
        header = load_json(blob[8:8 + n])
    except ManifestError as e:
        raise SafetensorsError(f"{path}: the header is {e}") from e
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the header is a JSON {type(header).__name__}, not an object")
    data = memoryview(blob)[8 + n:]
    problems = [p for name, info in header.items() if name != "__metadata__"
                for p in [_entry_problem(name, info, len(data))] if p]
    if problems:
        raise SafetensorsError(f"{path}: " + "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)"
                                                                         if len(problems) > 3 else ""))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
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
    except (OSError, ValueError) as e:  # SafetensorsError and numpy's shape errors are ValueErrors
        raise InitFromError(f"checkpoint.init_from={path} cannot be read: {e}. Give a file written by "
                            "`tierzero ckpt export`") from e
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
        elif target.dtype.is_floating_point and value.dtype.kind != "f":
            want = str(target.dtype).removeprefix("torch.")
            problems.append(f"{name} has dtype {value.dtype}, the model's is {want}")
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
