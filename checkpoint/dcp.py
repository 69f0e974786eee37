"""tierzero checkpoints <-> torch.distributed.checkpoint (DCP) folders, both ways, bit-exact.

The DCP layout (docs/checkpoint.md, "DCP"): the state dict torchtitan and DCP users hold, with
the optimizer flattened as `torch.distributed.checkpoint.state_dict.get_state_dict` does with
`StateDictOptions(flatten_optimizer_state_dict=True)`; DCP joins the nesting with dots:

    model.<fqn>                        parameters (tierzero's fp32 masters) and persistent buffers
    optimizer.state.<fqn>.exp_avg      AdamW's first moment, the parameter's global shape
    optimizer.state.<fqn>.exp_avg_sq   AdamW's second moment
    optimizer.state.<fqn>.step         AdamW's step count: a float32 scalar tensor, as torch.optim.AdamW keeps it
    train_state.step / .next_sample / .optimizer_steps   ints (the step, where the data stream continues)
    train_state.tierzero_state         the manifest's whole training state as JSON text (RNG seeds, plan, config)

No process group: one process reads or writes the whole checkpoint (`no_dist=True`), so it
needs host memory for all of it. Nothing in a DCP folder is trusted: `.metadata` is a pickle,
read here with an unpickler that builds only DCP's own metadata classes; every name, dtype,
shape, chunk and byte range is checked before a tensor is allocated; non-tensor entries are
loaded with `torch.load(weights_only=True)` (DCP's own planner uses weights_only=False).

The output is built in a hidden temp folder beside DST and renamed to DST at the end (for a
tierzero checkpoint after its COMMITTED marker): a killed convert leaves no DST that looks
complete, only a `.tz-convert-*` folder beside it, never read as a checkpoint.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import stat
import tempfile
import warnings
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from tierzero.checkpoint.manifest import (ITEMSIZE, MAX_NUMEL, ManifestError, Manifest, load_json, state_problems,
                                          step_dirname, summary)
from tierzero.checkpoint.store import (_STEP_DIR, _UMASK, DCP_METADATA, CheckpointStore, Slice, _np_dtype,
                                       folder_kind, fsync_dir, locate_step)

MODEL, OPTIMIZER, TRAIN_STATE = "model", "optimizer", "train_state"
MOMENTS = (("optim.exp_avg", "exp_avg"), ("optim.exp_avg_sq", "exp_avg_sq"))
"""tierzero's optimizer tensor prefix -> the AdamW state key (torch.optim.AdamW's names)."""
TRAIN_INTS = ("step", "next_sample", "optimizer_steps")
TIERZERO_STATE = "tierzero_state"
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64}
_FROM_TORCH = {v: k for k, v in TORCH_DTYPES.items()}
MAX_METADATA_BYTES = 2**30
"""DCP's .metadata is read whole; a bigger one is refused unread (like manifest.json)."""
MAX_BYTES_ENTRY = 2**26
"""A non-tensor entry (the training state's JSON holds the run's config): 64 MiB at most."""
_FQN = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
"""A module path as nn.Module.state_dict writes it: identifiers and indices joined by dots."""
_STEP_DTYPES = (torch.float32, torch.float64, torch.int64, torch.int32)
_ONE_PROCESS = r"torch\.distributed is disabled, unavailable or uninitialized"
"""DCP's warning that it runs in a single process: what no_dist=True asks for."""


class DcpError(ValueError):
    """A DCP folder tierzero will not read, or a destination it will not write: the user's to fix.
    The message names the path, the entry and the fix."""


# ---- names: pure --------------------------------------------------------------------------------

def dcp_key(name: str) -> str:
    """The DCP key of a tierzero tensor name (model/<fqn>, buffer/<fqn>, optim.exp_avg[_sq]/<fqn>)."""
    kind, _, fqn = name.partition("/")
    if kind in ("model", "buffer"):
        return f"{MODEL}.{fqn}"
    for prefix, key in MOMENTS:
        if kind == prefix:
            return f"{OPTIMIZER}.state.{fqn}.{key}"
    raise DcpError(f"tensor {name!r} is of no kind DCP's layout has (model/, buffer/, optim.exp_avg/, "
                   "optim.exp_avg_sq/): this checkpoint was written by another tierzero version")


@dataclass(frozen=True)
class Entry:
    """One DCP key read back: what it is in tierzero's terms."""
    key: str
    role: str
    """'model' (a parameter or buffer), 'exp_avg', 'exp_avg_sq', 'step' (AdamW's count), 'train' (a training
    state int or the JSON), or 'ignored' (optimizer hyperparameters, other programs' entries)."""
    fqn: str


def classify(key: str) -> Entry:
    """What a DCP key means to tierzero (pure). Raises DcpError for a key in tierzero's sections
    that is not a plain module path."""
    section, _, rest = key.partition(".")
    if section == MODEL:
        role, fqn = "model", rest
    elif section == OPTIMIZER and rest.startswith("state."):
        fqn, _, leaf = rest[len("state."):].rpartition(".")
        if leaf not in ("exp_avg", "exp_avg_sq", "step"):
            raise DcpError(f"{key}: optimizer state {leaf!r} is not AdamW's (exp_avg, exp_avg_sq, step); "
                           "tierzero trains with AdamW and reads no other optimizer's state")
        role = leaf
    elif section == TRAIN_STATE and rest in TRAIN_INTS + (TIERZERO_STATE,):
        return Entry(key, "train", rest)
    else:  # optimizer.param_groups.* (tierzero takes lr, betas, eps from its config), a data loader's state...
        return Entry(key, "ignored", rest)
    if len(fqn) > 1000 or not _FQN.match(fqn):
        raise DcpError(f"{key}: {fqn[:80]!r} is not a plain module path (identifiers and indices joined by dots)")
    return Entry(key, role, fqn)


# ---- .metadata: a pickle, unpickled into DCP's own classes only ---------------------------------

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "TensorProperties",
                                              "ChunkStorageMetadata", "BytesStorageMetadata", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "Path"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata dataclasses, torch.Size, dtypes and layouts; anything else (os.system,
    builtins.eval, ...) is refused before it is looked up."""

    def find_class(self, module, name):
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which is not part of DCP's metadata")


def _regular_size(path: str, what: str) -> int:
    """The size of a regular file (not a link, FIFO or folder) or DcpError."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise DcpError(f"{path} is missing ({what})") from None
    if not stat.S_ISREG(st.st_mode):
        raise DcpError(f"{path} is not a regular file ({what}): a link, FIFO or folder is not read")
    return st.st_size


def read_metadata(src: str):
    """DCP's Metadata of folder `src`, unpickled safely and checked whole (DcpError otherwise)."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = os.path.join(src, DCP_METADATA)
    size = _regular_size(path, "DCP's metadata")
    if size > MAX_METADATA_BYTES:
        raise DcpError(f"{path} is {size} bytes, more than {MAX_METADATA_BYTES}: not read")
    with open(path, "rb") as f:
        raw = f.read(MAX_METADATA_BYTES + 1)
    try:
        md = _MetadataUnpickler(io.BytesIO(raw)).load()
    except Exception as e:  # a hostile or foreign pickle fails in any way: all of them are "not DCP's"
        raise DcpError(f"{path} is not DCP metadata tierzero reads: {type(e).__name__}: {str(e)[:200]}") from e
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict) or \
            not isinstance(md.storage_data, dict):
        raise DcpError(f"{path} is a pickle of {type(md).__name__}, not DCP metadata with storage data "
                       "(a checkpoint written by FileSystemWriter)")
    return md


# ---- checking what the metadata declares ---------------------------------------------------------

def _ints(v, *, low: int = 0) -> Optional[Tuple[int, ...]]:
    if not isinstance(v, (tuple, list)) or not all(isinstance(d, int) and not isinstance(d, bool) and
                                                   low <= d <= MAX_NUMEL for d in v):
        return None
    return tuple(v)


def _volume(shape: Tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _tensor_problems(key: str, tmd) -> List[str]:
    """A tensor's declared dtype, bounded shape and chunks that tile it exactly."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorProperties

    props = getattr(tmd, "properties", None)
    dtype = getattr(props, "dtype", None) if isinstance(props, TensorProperties) else None
    if dtype not in _FROM_TORCH and dtype not in _STEP_DTYPES:
        return [f"{key}: dtype {dtype} is not one of {sorted(TORCH_DTYPES)}"]
    shape = _ints(tmd.size)
    if shape is None or len(shape) > 16 or _volume(shape) > MAX_NUMEL:
        return [f"{key}: shape {str(tmd.size)[:80]} is not a list of at most 16 sizes with at most {MAX_NUMEL} "
                "elements"]
    chunks = tmd.chunks
    if not isinstance(chunks, list) or not chunks or len(chunks) > 1 << 20:
        return [f"{key}: {type(chunks).__name__} of chunks, not a list of 1..{1 << 20} chunks"]
    total = 0
    for c in chunks:
        off, size = (_ints(c.offsets), _ints(c.sizes)) if isinstance(c, ChunkStorageMetadata) else (None, None)
        if off is None or size is None or len(off) != len(shape) or len(size) != len(shape) or \
                any(o + s > d for o, s, d in zip(off, size, shape)):
            return [f"{key}: chunk {str(c)[:120]} does not lie inside the tensor's shape {list(shape)}"]
        total += _volume(size)
    if total != _volume(shape):
        return [f"{key}: its chunks hold {total} elements, the tensor {_volume(shape)}: they do not tile it"]
    if len(chunks) > 1:  # the volumes add up: no overlap means every element is held exactly once
        seen = np.zeros(shape, dtype=bool)
        for c in chunks:
            region = seen[tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes))]
            if region.any():
                return [f"{key}: chunks overlap at offsets {list(c.offsets)}: they do not tile the tensor"]
            region[...] = True
    return []


def _storage_problems(src: str, md, needed: Mapping[str, object]) -> List[str]:  # long: one check per rule
    """Every chunk or byte entry of `needed` keys stored in a plain file of `src`, its byte range
    inside the file and apart from every other range, and no storage transforms (extensions)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import MetadataIndex

    by_fqn: Dict[str, list] = {}
    for index, info in md.storage_data.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            return [f"storage entry {str(index)[:80]} is not a MetadataIndex -> _StorageInfo (FileSystemWriter's)"]
        by_fqn.setdefault(index.fqn, []).append((index, info))
    problems, sizes, ranges = [], {}, {}
    for key, tmd in needed.items():
        infos = by_fqn.get(key, [])
        chunks = getattr(tmd, "chunks", None)
        if len(infos) != (len(chunks) if chunks is not None else 1):
            problems.append(f"{key}: {len(infos)} stored pieces for {len(chunks) if chunks else 1} chunk(s)")
            continue
        for index, info in infos:
            name, offset, length = info.relative_path, info.offset, info.length
            if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith(".") or \
                    len(name) > 255:
                problems.append(f"{key}: stored in {str(name)[:80]!r}, not a plain file name inside the folder")
                continue
            if getattr(info, "transform_descriptors", None):
                problems.append(f"{key}: stored through transforms {list(info.transform_descriptors)[:3]} "
                                "(DCP extensions): tierzero reads plain FileSystemWriter checkpoints only")
                continue
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, length)):
                problems.append(f"{key}: byte range {offset!r}+{length!r} is not two non-negative integers")
                continue
            if name not in sizes:
                try:
                    sizes[name] = _regular_size(os.path.join(src, name), f"entry {key}")
                except DcpError as e:
                    problems.append(str(e))
                    sizes[name] = None
            if sizes[name] is None:
                continue
            if offset + length > sizes[name]:
                problems.append(f"{src}/{name} is truncated: {key} needs bytes {offset}..{offset + length}, "
                                f"the file has {sizes[name]}")
                continue
            if chunks is None:
                if length > MAX_BYTES_ENTRY:
                    problems.append(f"{key}: {length} bytes, more than a training state ever needs ({MAX_BYTES_ENTRY})")
            else:
                chunk = next((c for c in chunks if tuple(c.offsets) == tuple(index.offset or ())), None)
                itemsize = torch.empty((), dtype=tmd.properties.dtype).element_size()
                if chunk is None:
                    problems.append(f"{key}: a stored piece at offsets {index.offset} that no chunk declares")
                elif length < _volume(tuple(chunk.sizes)) * itemsize:
                    problems.append(f"{key}: chunk at {list(chunk.offsets)} needs {_volume(tuple(chunk.sizes)) * itemsize}"
                                    f" bytes, its stored piece has {length}")
            ranges.setdefault(name, []).append((offset, offset + length, key))
    for name, spans in ranges.items():  # ranges apart: allocation stays bounded by the bytes on disk
        spans.sort()
        for (a0, a1, ka), (b0, b1, kb) in zip(spans, spans[1:]):
            if b0 < a1:
                problems.append(f"{src}/{name}: {ka} and {kb} claim the same bytes {b0}..{min(a1, b1)}")
    return problems


# ---- DCP -> tierzero -------------------------------------------------------------------------------

@dataclass
class Loaded:
    """A DCP checkpoint read back in tierzero's terms."""
    tensors: Dict[str, torch.Tensor]
    """tierzero name (model/, buffer/, optim.exp_avg/, optim.exp_avg_sq/) -> the global tensor."""
    state: dict
    ignored: List[str]


def _plan(src: str, md) -> Tuple[Dict[str, Entry], List[str]]:  # long: one check per rule
    """The entries tierzero reads (by key) and the keys it leaves, after every check of names,
    roles and shapes; DcpError listing the problems."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    problems, entries, ignored = [], {}, []
    for key, tmd in md.state_dict_metadata.items():
        if not isinstance(key, str):
            problems.append(f"key {str(key)[:80]!r} is not a string")
            continue
        try:
            e = classify(key)
        except DcpError as err:
            problems.append(str(err))
            continue
        if e.role == "ignored":
            ignored.append(key)
            continue
        if e.role in ("train",) and e.fqn != TIERZERO_STATE and isinstance(tmd, TensorStorageMetadata):
            problems += _tensor_problems(key, tmd)  # an int saved as a 0-d tensor (torchtitan's TrainState)
        elif e.role == "train":
            if not isinstance(tmd, BytesStorageMetadata):
                problems.append(f"{key}: a {type(tmd).__name__}, not a saved Python value")
        elif not isinstance(tmd, TensorStorageMetadata):
            problems.append(f"{key}: a {type(tmd).__name__}, not a tensor")
            continue
        else:
            problems += _tensor_problems(key, tmd)
        entries[key] = e
    if problems:
        raise DcpError(f"{src} cannot be read: {summary(problems)}")
    model = {e.fqn: md.state_dict_metadata[k] for k, e in entries.items() if e.role == "model"}
    if not model:
        raise DcpError(f"{src} holds no model.<name> tensors: not a model checkpoint in DCP's layout "
                       f"(its keys: {sorted(map(str, md.state_dict_metadata))[:5]} ...)")
    opt: Dict[str, Dict[str, object]] = {}
    for k, e in entries.items():
        if e.role in ("exp_avg", "exp_avg_sq", "step"):
            opt.setdefault(e.fqn, {})[e.role] = md.state_dict_metadata[k]
    for fqn, parts in sorted(opt.items()):
        where = f"{OPTIMIZER}.state.{fqn}"
        if fqn not in model:
            problems.append(f"{where}: optimizer state for model.{fqn}, which the checkpoint does not hold")
            continue
        missing = [r for r in ("exp_avg", "exp_avg_sq") if r not in parts]
        if missing:
            problems.append(f"{where}: has no {' or '.join(missing)} (AdamW keeps both moments)")
        for role in ("exp_avg", "exp_avg_sq"):
            if role in parts and tuple(parts[role].size) != tuple(model[fqn].size):
                problems.append(f"{where}.{role}: shape {list(parts[role].size)} is not the parameter's "
                                f"{list(model[fqn].size)}")
            if role in parts and parts[role].properties.dtype not in _FROM_TORCH:
                problems.append(f"{where}.{role}: dtype {parts[role].properties.dtype} is not one of "
                                f"{sorted(TORCH_DTYPES)}")
        if "step" in parts and _volume(tuple(parts["step"].size)) != 1:
            problems.append(f"{where}.step: shape {list(parts['step'].size)}, not a single count")
    for fqn, tmd in model.items():
        if tmd.properties.dtype not in _FROM_TORCH:
            problems.append(f"{MODEL}.{fqn}: dtype {tmd.properties.dtype} is not one of {sorted(TORCH_DTYPES)}")
    if not opt:
        problems.append("no optimizer.state.<name>.exp_avg / exp_avg_sq: a resume needs AdamW's state "
                        "(weights alone: export them to safetensors and use checkpoint.init_from)")
    if problems:
        raise DcpError(f"{src} cannot be read: {summary(problems)}")
    problems = _storage_problems(src, md, {k: md.state_dict_metadata[k] for k in entries})
    if problems:
        raise DcpError(f"{src} cannot be read: {summary(problems)}")
    return entries, sorted(ignored)


def _safe_planner():
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        """DCP's planner, but a non-tensor entry is loaded with weights_only=True (plain values
        only: nothing in the file can make a Python object that runs code)."""

        def load_bytes(self, read_item, value):
            loaded = torch.load(value, weights_only=True)
            self.state_dict[read_item.dest_index.fqn] = loaded
            if self.flatten_state_dict:
                self.original_state_dict[read_item.dest_index.fqn] = loaded

    return SafeLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)


def _reader(src: str, md):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class CheckedReader(FileSystemReader):
        """FileSystemReader with the metadata read and checked above (its own read_metadata
        unpickles .metadata with pickle.load)."""

        def read_metadata(self, *args, **kwargs):
            md.storage_meta = StorageMeta(load_id=self.load_id)  # the file's own is not needed, nor trusted
            md.planner_data = None
            return md

    return CheckedReader(src)


def _state(src: str, values: Dict[str, object], steps: Dict[str, torch.Tensor]) -> dict:
    """The tierzero training state from train_state.* (and the optimizer's step counts), checked."""
    ints = {}
    for name in TRAIN_INTS:
        v = values.get(f"{TRAIN_STATE}.{name}")
        if v is None:
            continue
        if isinstance(v, torch.Tensor):
            v = v.item() if v.numel() == 1 and not v.is_floating_point() else v
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise DcpError(f"{src}: {TRAIN_STATE}.{name} is {str(v)[:60]!r}, not a non-negative integer")
        ints[name] = v
    text = values.get(f"{TRAIN_STATE}.{TIERZERO_STATE}")
    if text is not None:
        if not isinstance(text, str) or len(text) > MAX_BYTES_ENTRY:
            raise DcpError(f"{src}: {TRAIN_STATE}.{TIERZERO_STATE} is a {type(text).__name__}, not JSON text")
        try:
            state = load_json(text.encode())
        except ManifestError as e:
            raise DcpError(f"{src}: {TRAIN_STATE}.{TIERZERO_STATE}: {e}") from e
        if not isinstance(state, dict):
            raise DcpError(f"{src}: {TRAIN_STATE}.{TIERZERO_STATE} is a JSON {type(state).__name__}, not an object")
        for name, v in ints.items():
            if name in state and state[name] != v:
                raise DcpError(f"{src}: {TRAIN_STATE}.{name}={v} disagrees with the training state's {name}="
                               f"{str(state[name])[:40]}")
        state = {**ints, **state}
    else:
        state = dict(ints)
    if "step" not in state:
        raise DcpError(f"{src} has no {TRAIN_STATE}.step: tierzero cannot tell which step this checkpoint is "
                       f"(save {{'{TRAIN_STATE}': {{'step': S, 'next_sample': N}}}} beside the model and optimizer)")
    problems = state_problems(state, required=("next_sample",))
    if problems:
        raise DcpError(f"{src}: {TRAIN_STATE}: {summary(problems)} (next_sample: the first sample of the data "
                       "stream the resumed run reads, step x train.global_batch_size for a run that never changed it)")
    big = [f"{k}={state[k]}" for k, limit in (("step", 10**8 - 1), ("next_sample", 2**53), ("optimizer_steps", 2**53))
           if isinstance(state.get(k), int) and state[k] > limit]
    if big:  # a step folder's name has 8 digits; the counts must survive float64 arithmetic
        raise DcpError(f"{src}: {TRAIN_STATE}: {', '.join(big)} is past what a tierzero checkpoint records")
    counts = {float(t.reshape(-1)[0]) for t in steps.values()}
    want = state.setdefault("optimizer_steps", state["step"])
    if counts and counts != {float(torch.tensor(want, dtype=torch.float32))}:
        raise DcpError(f"{src}: optimizer.state.*.step holds {sorted(counts)[:4]}, the training state "
                       f"optimizer_steps={want}: AdamW's bias correction would restart from another count")
    return state


def read_dcp(src: str) -> Loaded:
    """A local DCP folder read whole into tierzero's tensor names and training state, after
    every check (DcpError naming the entry otherwise)."""
    import torch.distributed.checkpoint as dcp

    md = read_metadata(src)
    try:
        entries, ignored = _plan(src, md)
    except DcpError:
        raise
    except (AttributeError, TypeError, ValueError, KeyError, IndexError) as e:  # an object missing DCP's fields
        raise DcpError(f"{src}/{DCP_METADATA} does not describe a DCP checkpoint tierzero reads: "
                       f"{type(e).__name__}: {str(e)[:200]}") from e
    md.state_dict_metadata = {k: v for k, v in md.state_dict_metadata.items() if k in entries}
    buffers: Dict[str, object] = {}
    for key, e in entries.items():
        tmd = md.state_dict_metadata[key]
        buffers[key] = torch.empty(tuple(tmd.size), dtype=tmd.properties.dtype) if hasattr(tmd, "chunks") else None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", _ONE_PROCESS)
            dcp.load(buffers, storage_reader=_reader(src, md), planner=_safe_planner(), no_dist=True)
    except DcpError:
        raise
    except Exception as e:  # a chunk that does not unpickle as a tensor, a short read: the folder is broken
        raise DcpError(f"{src} cannot be read: {type(e).__name__}: {str(e)[:300]}") from e
    optimized = {e.fqn for e in entries.values() if e.role == "exp_avg"}
    tensors: Dict[str, torch.Tensor] = {}
    for key, e in entries.items():
        if e.role == "model":
            tensors[f"{'model' if e.fqn in optimized else 'buffer'}/{e.fqn}"] = buffers[key]
        elif e.role in ("exp_avg", "exp_avg_sq"):
            tensors[f"optim.{e.role}/{e.fqn}"] = buffers[key]
    steps = {e.fqn: buffers[k] for k, e in entries.items() if e.role == "step"}
    for fqn, t in steps.items():
        v = float(t.reshape(-1)[0])
        if not (v >= 0 and v == int(v)):
            raise DcpError(f"{src}: optimizer.state.{fqn}.step is {v}, not a count of steps")
    state = _state(src, {k: buffers[k] for k, e in entries.items() if e.role == "train"}, steps)
    return Loaded(tensors, state, ignored)


# ---- tierzero -> DCP ---------------------------------------------------------------------------

def to_torch(a: np.ndarray, dtype: str, shape) -> torch.Tensor:
    """A tierzero array (bfloat16 as its raw uint16 pattern) as a torch tensor of `dtype`, no copy."""
    if dtype == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).reshape(shape)
    return torch.from_numpy(a).reshape(shape)


def dcp_state_dict(manifest: Manifest, read) -> dict:
    """The nested state dict DCP saves for a tierzero checkpoint (`read` = CheckpointStore.reader)."""
    model, optim, fqns = {}, {}, set()
    for name in sorted(manifest.tensors):
        entry = manifest.tensors[name]
        key = dcp_key(name)
        value = to_torch(read(name, 0, entry.numel), entry.dtype, entry.shape)
        section, _, rest = key.partition(".")
        target = model if section == MODEL else optim
        if rest in target:
            raise DcpError(f"tensors {name} and another one share the DCP key {key}: this checkpoint has a "
                           "parameter and a buffer of one name")
        target[rest] = value
        if name.startswith("optim."):
            fqns.add(name.partition("/")[2])
    st = manifest.state
    count = torch.tensor(float(st.get("optimizer_steps", manifest.step)), dtype=torch.float32)
    for fqn in sorted(fqns):
        optim[f"state.{fqn}.step"] = count.clone()  # torch.optim.AdamW keeps one float32 count per parameter
    train = {k: st[k] for k in TRAIN_INTS if k in st}
    train[TIERZERO_STATE] = json.dumps(st, sort_keys=True)
    return {MODEL: model, OPTIMIZER: optim, TRAIN_STATE: train}


# ---- the destination: a temp sibling, renamed at the end ---------------------------------------

def check_destination(dst: str) -> str:
    """DST as an absolute local path that does not exist or is an empty real folder; DcpError
    otherwise (tierzero never writes into or over what it cannot prove is its own)."""
    if "://" in dst:
        raise DcpError(f"{dst}: convert writes to a local path only; convert locally, then copy the folder")
    path = os.path.abspath(dst)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    if not stat.S_ISDIR(st.st_mode):
        raise DcpError(f"{dst} exists and is not a folder: nothing is written over it; choose a new path")
    if os.listdir(path):
        raise DcpError(f"{dst} exists and is not empty: convert never writes into or over a folder it cannot "
                       "prove is its own; choose a new path or move that folder away")
    return path


def _temp_beside(path: str) -> str:
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tz-convert-{os.path.basename(path)}.")
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp's 0700 widened to what mkdir would have made
    return tmp


def _publish(tmp: str, path: str) -> None:
    """Rename `tmp` to `path` (replacing only an empty folder) and make the name durable."""
    try:
        os.rename(tmp, path)
    except OSError as e:
        raise DcpError(f"{path} appeared or filled while converting ({e.strerror}): nothing was written there; "
                       "choose a new path") from e
    fsync_dir(os.path.dirname(path))


def write_dcp(src_url: str, dst: str) -> Tuple[str, Manifest, int]:
    """Convert the tierzero checkpoint at `src_url` (a step folder, or a checkpoints folder: its
    newest committed step) into a DCP folder at `dst`. Returns (the step folder read, its
    manifest, bytes of tensor data)."""
    import torch.distributed.checkpoint as dcp

    path = check_destination(dst)
    store, step_path, url = locate_step(src_url)
    manifest = store.manifest(step_path)  # validated whole, every piece's crc checked as it is read
    state = dcp_state_dict(manifest, store.reader(step_path, manifest))
    tmp = _temp_beside(path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", _ONE_PROCESS)
            dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True), no_dist=True)
        _publish(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # made by mkdtemp just now: ours
        raise
    return url, manifest, sum(t.nbytes for t in manifest.tensors.values())


def write_tierzero(src: str, dst: str) -> Tuple[Loaded, int, str]:
    """Convert the local DCP folder `src` into a committed tierzero checkpoint. `dst` named
    step-<8 digits> is that step folder (its step must be the checkpoint's); any other name is a
    checkpoints folder that gets the step folder inside (checkpoint.resume=DST or
    checkpoint.dir=DST reads it). Returns (what was read, the step, the step folder written)."""
    path = check_destination(dst)
    loaded = read_dcp(src)
    step = loaded.state["step"]
    m = _STEP_DIR.match(os.path.basename(path))
    if m and int(m.group(1)) != step:
        raise DcpError(f"{dst} is named for step {int(m.group(1))}, the checkpoint is step {step}: name it "
                       f"{step_dirname(step)} or give the folder above it")
    tmp = _temp_beside(path)
    try:
        store = CheckpointStore(tmp, fsync=True)
        slices = []
        for name, t in sorted(loaded.tensors.items()):
            dtype = _FROM_TORCH[t.dtype]
            flat = t.reshape(-1)
            data = (flat.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else flat.numpy())
            assert data.dtype == np.dtype(_np_dtype(dtype)) and data.itemsize == ITEMSIZE[dtype]
            slices.append(Slice(name, tuple(t.shape), dtype, 0, data))
        store.write_rank(step, 0, slices, token="convert")
        store.commit(step, 1, loaded.state, token="convert")  # manifest, then COMMITTED last
        if m:
            _publish(store.step_path(step), path)
            os.unlink(os.path.join(tmp, "LATEST"))
            os.rmdir(tmp)
        else:
            _publish(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return loaded, step, path if m else os.path.join(path, step_dirname(step))


def source_kind(src: str) -> str:
    """folder_kind of a local folder (CheckpointError for one that is not there)."""
    if "://" not in src and not os.path.isdir(src):
        raise DcpError(f"{src} is not a folder")
    store = CheckpointStore(src)
    return folder_kind(store._listing(store.path))

