"""`tierzero ckpt export` and the way back for `checkpoint.init_from` / `model.from_hf`: safetensors
files and Hugging Face folders (config.json + model.safetensors, or shards and
model.safetensors.index.json), named for the transformers class that computes what the tierzero
model computes (checkpoint/hf.py; docs/checkpoint.md, "Hugging Face").

safetensors format (github.com/huggingface/safetensors): 8-byte little-endian header length,
a JSON header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}
padded with spaces, then the raw little-endian bytes. Written and read here directly (pure
numpy): no pickle, nothing executed on load. bfloat16 has no numpy type: it is written as its
raw 16-bit patterns (fp32 rounded to nearest even) and read back shifted into fp32.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import struct
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np

from tierzero.checkpoint.hf import (GLM4_MOE, Architecture, Target, choose_class, hf_config, hf_tensors,
                                    tierzero_tensors)
from tierzero.checkpoint.manifest import MAX_NUMEL, ManifestError, load_json
from tierzero.checkpoint.store import fsync_dir

__all__ = ["hf_tensors", "tierzero_tensors", "read_safetensors", "read_weights", "write_safetensors",
           "write_hf_folder", "load_into", "consolidated", "architecture_of", "export_plan"]

SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "int64": "I64"}
_BACK = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64}
"""safetensors dtype -> the numpy type its bytes are read as (BF16: raw bits, then shifted to fp32)."""
MAX_HEADER_BYTES = 100 * 2**20
"""safetensors' own limit on the JSON header (its reader refuses more)."""
MAX_JSON_FILE_BYTES = 64 * 2**20
"""config.json and model.safetensors.index.json are read whole; a bigger one is refused unread."""
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
"""transformers' save_pretrained default (max_shard_size="5GB")."""
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.safetensors$")
"""A shard an index may name: a plain file name in the folder (no separator, no leading dot, no '..')."""


class SafetensorsError(ValueError):
    """A file that is not a well-formed safetensors file tierzero can read; names the file and why."""


class ExportError(ValueError):
    """`tierzero ckpt export` refuses its input or output: the user's to fix."""


@dataclass(frozen=True)
class Bfloat16:
    """A tensor to be written as bfloat16: its raw 16-bit patterns (numpy has no bfloat16)."""
    bits: np.ndarray

    @property
    def shape(self) -> Tuple[int, ...]:
        return self.bits.shape


def to_bfloat16(x: np.ndarray) -> Bfloat16:
    """fp32 -> bfloat16 rounded to nearest, ties to even (what torch's .to(torch.bfloat16) does);
    NaN stays a quiet NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    bits = ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)  # uint32 arithmetic: no overflow below NaN
    return Bfloat16(np.where(np.isnan(x), np.uint16(0x7FC0), bits).astype(np.uint16))


def from_bfloat16(bits: np.ndarray) -> np.ndarray:
    """Raw bfloat16 patterns -> the same values in fp32 (exact: bf16 is fp32's top half)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _file_kind(mode: int) -> str:
    for test, word in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device")):
        if test(mode):
            return word
    return "not a regular file"


def write_safetensors(path: str, tensors: Dict[str, Union[np.ndarray, Bfloat16]],
                      metadata: Optional[Dict[str, str]] = None) -> int:
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
        if isinstance(value, Bfloat16):
            dtype, value = "BF16", np.ascontiguousarray(value.bits)
        else:
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


def _read_file(path: str, *, follow_links: bool = True, limit_bytes: Optional[int] = None) -> bytes:
    """A regular file's bytes; a FIFO or device is refused without blocking on it, a link too
    with follow_links=False (a file inside a folder tierzero reads), a file past limit_bytes unread."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP and not follow_links:
            raise SafetensorsError(f"{path} is a symbolic link: tierzero reads only regular files inside the "
                                   "folder") from e
        if e.errno in (errno.ENOENT, errno.EACCES, errno.EISDIR):
            raise
        raise SafetensorsError(f"{path} cannot be opened: {e.strerror or e}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SafetensorsError(f"{path} is {_file_kind(st.st_mode)}, not a file")
        if limit_bytes is not None and st.st_size > limit_bytes:
            raise SafetensorsError(f"{path} is {st.st_size} bytes, more than the {limit_bytes} such a file may be")
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


def read_safetensors(path: str, *, follow_links: bool = True) -> Dict[str, np.ndarray]:
    """Every tensor of a safetensors file, checked whole first: header length, JSON (depth
    bounded), each entry's dtype, shape and byte range inside the file. F32, F16 and I64 come
    back as they are, BF16 as fp32 (exact). Raises SafetensorsError (a ValueError) naming the
    file and the first problems."""
    blob = _read_file(path, follow_links=follow_links)
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
        value = np.frombuffer(data[b:e], dtype=np.dtype(_BACK[info["dtype"]]).newbyteorder("<")).reshape(info["shape"])
        out[name] = from_bfloat16(value) if info["dtype"] == "BF16" else value
    return out


# ---- reading a folder (init_from, model.from_hf) ----------------------------------------------------

def _shard_problem(folder: str, name) -> Optional[str]:
    """Why an index's file name is not a plain safetensors file of `folder` (None: it is)."""
    if not isinstance(name, str) or not _SHARD_NAME.match(name) or ".." in name:
        return (f"names the file {str(name)[:80]!r}; a shard must be a plain file name in the folder ending in "
                ".safetensors (no path separator, no '..', no leading dot)")
    real_folder = os.path.realpath(folder)
    if os.path.dirname(os.path.realpath(os.path.join(folder, name))) != real_folder:
        return f"names {name!r}, which resolves outside the folder"
    return None


def read_index(folder: str) -> Dict[str, str]:
    """model.safetensors.index.json's weight_map {tensor: shard file}, every file name checked."""
    path = os.path.join(folder, INDEX_FILE)
    blob = _read_file(path, follow_links=False, limit_bytes=MAX_JSON_FILE_BYTES)
    try:
        data = load_json(blob)
    except ManifestError as e:
        raise SafetensorsError(f"{path} is {e}") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise SafetensorsError(f"{path} has no weight_map object {{tensor name: shard file}}")
    problems = sorted({p for p in (_shard_problem(folder, f) for f in weight_map.values()) if p})
    if problems:
        raise SafetensorsError(f"{path} " + "; ".join(problems[:3]))
    return weight_map


def read_weights(path: str) -> Dict[str, np.ndarray]:
    """Every tensor of a safetensors file, or of a folder: its model.safetensors.index.json and the
    shards it names (each a regular file inside the folder, holding exactly the tensors the index
    gives it), else its model.safetensors. BF16 comes back as fp32."""
    if not os.path.isdir(path):
        return read_safetensors(path)
    if os.path.lexists(os.path.join(path, INDEX_FILE)):
        weight_map = read_index(path)
        out: Dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            tensors = read_safetensors(os.path.join(path, shard), follow_links=False)
            want = {n for n, f in weight_map.items() if f == shard}
            if set(tensors) != want:
                odd = sorted(set(tensors) ^ want)[:3]
                raise SafetensorsError(f"{os.path.join(path, shard)} does not hold the tensors {INDEX_FILE} gives it "
                                       f"(differing: {odd})")
            out.update(tensors)
        return out
    single = os.path.join(path, SINGLE_FILE)
    if os.path.lexists(single):
        return read_safetensors(single, follow_links=False)
    raise SafetensorsError(f"{path} is a folder without {SINGLE_FILE} or {INDEX_FILE}")


def read_hf_config(folder: str) -> dict:
    """A folder's config.json (bounded, depth-limited JSON; a regular file, not a link)."""
    path = os.path.join(folder, "config.json")
    try:
        blob = _read_file(path, follow_links=False, limit_bytes=MAX_JSON_FILE_BYTES)
        return load_json(blob)
    except ManifestError as e:
        raise SafetensorsError(f"{path} is {e}") from e


# ---- export ------------------------------------------------------------------------------------------

MAX_CONFIG_CHARS = 2**22
"""The training state's config text is a YAML file a few KB long; more is not tierzero's."""


def _recorded_config(manifest) -> Optional[dict]:
    """The resolved run config the training state records (launcher/rank.py writes it), or None."""
    import yaml

    text = manifest.state.get("config") if isinstance(manifest.state, dict) else None
    if not isinstance(text, str) or len(text) > MAX_CONFIG_CHARS:
        return None
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    return cfg if isinstance(cfg, dict) else None


def architecture_of(manifest) -> Optional[Architecture]:
    """What the checkpointed model computes: sizes from its global tensors, the rest (heads, rope,
    eps, routing) from the resolved config its training state records; None without that config."""
    cfg = _recorded_config(manifest)
    if cfg is None:
        return None
    section = {k: (cfg.get(k) if isinstance(cfg.get(k), dict) else {}) for k in ("model", "moe", "data")}
    model, moe, data = section["model"], section["moe"], section["data"]
    shape = {n.partition("/")[2]: t.shape for n, t in manifest.tensors.items() if n.startswith("model/")}
    emb = shape.get("tok_embeddings.weight")
    if emb is None or len(emb) != 2:
        raise ExportError(f"step {manifest.step} has no model/tok_embeddings.weight [vocab, d_model]: not a tierzero "
                          "language model checkpoint")
    layers = {int(m.group(1)) for n in shape for m in [re.match(r"blocks\.(\d+)\.", n)] if m}
    experts = shape.get("blocks.0.mlp.experts.w_gate")
    dense = shape.get("blocks.0.mlp.w_gate.weight")
    n_heads = int(model.get("n_heads") or 1)
    rate = moe.get("bias_update_rate") or 0.0
    return Architecture(
        vocab_size=emb[0], d_model=emb[1], n_layers=len(layers), n_heads=n_heads,
        ffn_hidden=int(dense[0]) if dense else int(model.get("ffn_hidden") or (experts[2] if experts else 0)),
        rope_theta=float(model.get("rope_theta", 10000.0)), norm_eps=float(model.get("norm_eps", 1e-5)),
        tie_embeddings="output.weight" not in shape, seq_len=int(data.get("seq_len") or 2048),
        num_experts=int(experts[0]) if experts else 0, top_k=int(moe.get("top_k") or 0),
        gate=str(moe.get("gate", "softmax")), norm_topk_prob=bool(moe.get("norm_topk_prob", True)),
        bias_active=bool(experts) and rate > 0, shared_experts=int(moe.get("shared_experts") or 0) if experts else 0,
        expert_hidden=int(experts[2]) if experts else 0,
        max_nodes_per_token=int(moe.get("max_nodes_per_token") or 0) if experts else 0,
        capacity_factor=float(moe.get("capacity_factor") or 0.0) if experts else 0.0)


def export_plan(manifest, *, need_config: bool) -> Tuple[Optional[Architecture], Target]:
    """The architecture and the class to write it for. Without a recorded config a dense model
    still gets Llama names (they do not depend on it); a folder (config.json) or an MoE needs it."""
    arch = architecture_of(manifest)
    if arch is not None:
        return arch, choose_class(arch)
    is_moe = any(n.endswith("mlp.router.weight") for n in manifest.tensors)
    if need_config or is_moe:
        what = "config.json (heads, rope, norm eps)" if need_config else "the MoE's names (its routing)"
        raise ExportError(f"step {manifest.step}'s training state records no run config (model.* / moe.*), which "
                          f"{what} comes from: the checkpoint was not written by `tierzero run`. Export a dense "
                          "model's weights alone with `tierzero ckpt export STEP_DIR OUT.safetensors`")
    from tierzero.checkpoint.hf import LLAMA

    return None, Target(LLAMA)


def consolidated(manifest, read: Callable[[str, int, int], np.ndarray],
                 target: Optional[Target] = None) -> Dict[str, np.ndarray]:
    """The model's weights (fp32 masters) and the buffers its computation uses, named for
    `target`'s class (default: Llama / tierzero's documented MoE names). The selection bias is
    written only where the class computes with it: GLM-4.5 always (zeros when it was off),
    tierzero's own names only when it was on; Mixtral never."""
    target = target or Target(None)
    out: Dict[str, np.ndarray] = {}
    for name, entry in sorted(manifest.tensors.items()):
        kind, _, tname = name.partition("/")
        if kind not in ("model", "buffer"):
            continue
        value = read(name, 0, entry.numel).reshape(entry.shape)
        if tname.endswith("mlp.expert_bias"):
            active = bool(np.any(value != 0))
            if target.hf_class == GLM4_MOE or (target.hf_class is None and active):
                pass
            else:
                continue
        for hf_name, hf_value in hf_tensors(tname, value, target.moe_names):
            out[hf_name] = hf_value
    return out


def cast_for_export(tensors: Dict[str, np.ndarray], dtype: str) -> Dict[str, Union[np.ndarray, Bfloat16]]:
    """fp32 as saved, or bf16 (rounded to nearest even); the selection bias stays fp32 (transformers
    keeps that buffer in fp32)."""
    if dtype == "fp32":
        return {n: np.ascontiguousarray(v, dtype=np.float32) for n, v in tensors.items()}
    return {n: (np.ascontiguousarray(v, dtype=np.float32) if n.endswith("e_score_correction_bias")
                else to_bfloat16(v)) for n, v in tensors.items()}


def plan_shards(sizes: List[Tuple[str, int]], max_shard_bytes: int) -> List[List[str]]:
    """Tensors in order, cut into shards of at most max_shard_bytes (a bigger tensor alone)."""
    shards: List[List[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def _check_out_dir(out_dir: str) -> None:
    try:
        st = os.lstat(out_dir)
    except FileNotFoundError:
        parent = os.path.dirname(os.path.abspath(out_dir))
        if not os.path.isdir(parent):
            raise ExportError(f"the folder {parent} (where {out_dir} would go) does not exist; create it first") from None
        return
    if not stat.S_ISDIR(st.st_mode):
        raise ExportError(f"{out_dir} exists and is {_file_kind(st.st_mode)}, not a folder: tierzero ckpt export "
                          "never replaces it (nor writes through it); remove it or give a new folder")
    if os.listdir(out_dir):
        raise ExportError(f"{out_dir} is a folder that is not empty: tierzero ckpt export writes a whole folder and "
                          "never mixes its files with others; remove it or give a new folder")


def write_hf_folder(out_dir: str, tensors: Dict[str, Union[np.ndarray, Bfloat16]], config: dict, *,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, metadata: Optional[Dict[str, str]] = None
                    ) -> Tuple[List[str], int]:
    """config.json + model.safetensors, or model-0000i-of-0000N.safetensors shards and
    model.safetensors.index.json past max_shard_bytes, as transformers' save_pretrained lays them
    out. Written into a temporary folder beside out_dir and renamed into place: out_dir is either
    complete or untouched (it must not exist, or be an empty folder). Returns (files, bytes)."""
    _check_out_dir(out_dir)
    parent, name = os.path.split(os.path.abspath(out_dir))
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".tmp")
    try:
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # what mkdir would have made, not mkdtemp's 0700
        sizes = [(n, int(np.prod(v.shape, dtype=np.int64)) * (2 if isinstance(v, Bfloat16) else v.itemsize))
                 for n, v in tensors.items()]
        shards = plan_shards(sizes, max_shard_bytes)
        files, total = ["config.json"], 0
        write_text(os.path.join(tmp, "config.json"), json.dumps(config, indent=2, sort_keys=True) + "\n")
        weight_map = {}
        for i, names in enumerate(shards):
            shard = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            total += write_safetensors(os.path.join(tmp, shard), {n: tensors[n] for n in names},
                                       {"format": "pt", **(metadata or {})})
            weight_map.update({n: shard for n in names})
            files.append(shard)
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(b for _, b in sizes)}, "weight_map": weight_map}
            write_text(os.path.join(tmp, INDEX_FILE), json.dumps(index, indent=2, sort_keys=True) + "\n")
            files.append(INDEX_FILE)
        fsync_dir(tmp)
        os.rename(tmp, out_dir)  # replaces an empty folder; a non-empty one was refused above
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files, total


def write_text(path: str, text: str) -> None:
    with open(path, "x", encoding="utf-8") as f:  # a fresh file in a fresh folder: never through a link
        f.write(text)
        f.flush()
        os.fsync(f.fileno())



# ---- init_from ---------------------------------------------------------------------------------------

class InitFromError(ValueError):
    """checkpoint.init_from names weights that do not fit the model: the user's to fix."""


def load_into(model, path: str, key: str = "checkpoint.init_from") -> int:
    """checkpoint.init_from / model.from_hf: copy a file's or a folder's weights (fp32, fp16 or
    bf16; Llama, Mixtral or tierzero names) into a freshly built model (before an engine shards
    it). Every parameter must be there with its shape; the MoE selection bias may be absent (it
    then starts at zero, as in a fresh model)."""
    import torch

    try:
        tensors = tierzero_tensors(read_weights(path))
    except (OSError, ValueError) as e:  # SafetensorsError and numpy's shape errors are ValueErrors
        raise InitFromError(f"{key}={path} cannot be read: {e}. Give a .safetensors file, or a folder with "
                            f"{SINGLE_FILE} or {INDEX_FILE} (what `tierzero ckpt export` and transformers' "
                            "save_pretrained write)") from e
    problems = []
    targets = dict(model.named_parameters())
    keys = set(model.state_dict().keys())
    targets.update({n: b for n, b in model.named_buffers() if n in keys})
    for name, target in targets.items():
        value = tensors.get(name)
        if value is None:
            if not name.endswith("mlp.expert_bias"):
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
        raise InitFromError(f"{key}={path} does not fit this model.* / moe.* config: " + "; ".join(problems[:6]))
    with torch.no_grad():
        for name, target in targets.items():
            if name in tensors:
                target.copy_(torch.from_numpy(np.array(tensors[name])).to(target.dtype))
            else:
                target.zero_()
    return len(targets)


@dataclass(frozen=True)
class Exported:
    files: Tuple[str, ...]
    nbytes: int
    num_tensors: int
    target: Target


def export_step(manifest, read: Callable[[str, int, int], np.ndarray], out: str, *, dtype: str = "fp32",
                max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Exported:
    """`tierzero ckpt export`: a Hugging Face folder at `out` (config.json + weights), or, for a
    path ending in .safetensors, that one file alone (the weights, the same names, no config)."""
    if dtype not in ("fp32", "bf16"):
        raise ExportError(f"--dtype {dtype} is not one of fp32, bf16")
    if not max_shard_bytes >= 1:
        raise ExportError(f"--max-shard-gb gives {max_shard_bytes} bytes per file; give a positive size, e.g. 5")
    single = out.endswith(".safetensors")
    arch, target = export_plan(manifest, need_config=not single)
    tensors = cast_for_export(consolidated(manifest, read, target), dtype)
    metadata = {"format": "pt", "tierzero_step": str(manifest.step)}
    if single:
        return Exported((out,), write_safetensors(out, tensors, metadata), len(tensors), target)
    config = hf_config(arch, target, "float32" if dtype == "fp32" else "bfloat16")
    files, nbytes = write_hf_folder(out, tensors, config, max_shard_bytes=max_shard_bytes, metadata=metadata)
    return Exported(tuple(files), nbytes, len(tensors), target)
