"""RunConfig: every package's config section composed with omegaconf.

Precedence: dataclass defaults < YAML files in the order given < `key=value` overrides.
All problems are collected and raised together as one ConfigError, before anything is
written to disk.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import dataclasses
import difflib
import importlib.util
import inspect
import math
import os
import re
import stat
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from tierzero.checkpoint.config import CheckpointConfig
from tierzero.collectives_bench.config import BenchConfig
from tierzero.parallel.engines import engine_errors
from tierzero.parallel.moe_config import MoEConfig
from tierzero.parallel.config import ParallelConfig
from tierzero.parallel.topology import TopologyConfig
from tierzero.recipes.config import (DataConfig, ModelConfig, TrainConfig, apply_from_hf, data_errors, eval_errors,
                                      model_errors, train_errors)
from tierzero.slurm.config import SlurmConfig
from tierzero.telemetry.config import TelemetryConfig

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes" / "configs"
DEFAULT_RECIPE = RECIPE_DIR / "moe_tiny_cpu.yaml"
BACKENDS = ("auto", "gloo", "nccl")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\Z")  # \Z: `$` would also match before a trailing newline
NAME_MAX = 255
"""Bytes in one file or folder name: Linux's NAME_MAX (limits.h), what ext4, xfs, btrfs, tmpfs and NFS
take (os.pathconf(folder, "PC_NAME_MAX")); a longer name fails with "File name too long"."""
MAX_RUN_NAME_BYTES = 200
"""run.name names the folder runs/<run.name>, its lock file .tierzero-<run.name>.lock (15 bytes more)
and a sweep's tasks <run.name>-nodes<N>: 200 keeps every one of them within NAME_MAX."""


@dataclass
class RunSection:
    name: str = "default"
    """Run name; a plain folder name (letters, digits, . _ -), no path separators."""
    dir: Optional[str] = None
    """Run folder (config.yaml, telemetry, report); default runs/<run.name>."""


@dataclass
class LauncherConfig:
    nproc: int = 4
    """Local ranks to spawn when no scheduler started us (plain `tierzero run`)."""
    backend: str = "auto"
    """torch.distributed backend: auto (nccl when every local rank has a GPU of its own, else gloo on CPU), gloo or nccl. See docs/launch.md#devices."""
    timeout_s: float = 300.0
    """Collective / rendezvous timeout per rank."""
    isolate_network: bool = False
    """Run each topology.emulate node in its own network namespace joined by veths (root only; docs/netns.md)."""
    inter_node_gbit: Optional[float] = None
    """Rate limit (Gbit/s, tc tbf) of each emulated node's link with launcher.isolate_network; null = unlimited."""
    max_restarts: int = 3
    """Local supervisor: restarts of the whole group after a rank fails (from the newest committed checkpoint)."""
    restart_window_s: float = 3600.0
    """Only restarts within this many seconds count towards launcher.max_restarts."""
    hang_timeout_s: float = 300.0
    """No rank progressing for this long is a hang: the local supervisor stops the ranks, names the stalled ones and restarts; under a scheduler each rank's watchdog exits 1. 0 = off."""
    requeue_signal: str = "SIGUSR2"
    """Signal that, like SIGTERM and SIGINT, makes the ranks finish the step, checkpoint and exit 75 (requeue); not SIGUSR1, which NCCL takes."""

    def errors(self) -> List[str]:
        errs = []
        if self.nproc < 1:
            errs.append(
                f"launcher.nproc={self.nproc} must be >= 1 (it is the number of local ranks); "
                "e.g. launcher.nproc=4"
            )
        if self.backend not in BACKENDS:
            errs.append(f"launcher.backend={self.backend!r} is not one of {list(BACKENDS)}")
        if self.max_restarts < 0:
            errs.append(f"launcher.max_restarts={self.max_restarts} must be >= 0 (0 = never restart)")
        if not self.hang_timeout_s >= 0:
            errs.append(f"launcher.hang_timeout_s={self.hang_timeout_s} must be >= 0 (0 = off), e.g. 300")
        from tierzero.launcher.signals import signal_number

        try:
            signal_number(self.requeue_signal)
        except ValueError as e:
            errs.append(f"launcher.requeue_signal={self.requeue_signal!r} is not a signal a process can catch as a "
                        f"stop request ({e}); use a name such as SIGUSR2 (the default), SIGTERM or SIGHUP")
        if not self.restart_window_s > 0:
            errs.append(f"launcher.restart_window_s={self.restart_window_s} must be > 0, e.g. 3600")
        if not self.timeout_s > 0:
            errs.append(f"launcher.timeout_s={self.timeout_s} must be > 0, e.g. launcher.timeout_s=300")
        if self.inter_node_gbit is not None and not self.inter_node_gbit > 0:
            errs.append(
                f"launcher.inter_node_gbit={self.inter_node_gbit} must be > 0 (it is the rate of each emulated "
                "node's link in Gbit/s); e.g. launcher.inter_node_gbit=1, or null for no limit"
            )
        if self.inter_node_gbit is not None and not self.isolate_network:
            errs.append(
                f"launcher.inter_node_gbit={self.inter_node_gbit} only limits the links between emulated nodes, "
                "which exist only with launcher.isolate_network=true (launcher.isolate_network=false now); "
                "add launcher.isolate_network=true (needs root), or drop launcher.inter_node_gbit"
            )
        return errs


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


class ConfigError(ValueError):
    """One or more problems a user can fix; str() is the whole message, one paragraph each."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# ---- field descriptions ------------------------------------------------------------

def field_docs(cls) -> Dict[str, str]:
    """The attribute docstrings of a dataclass (the string literal under each field)."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for prev, node in zip(body, body[1:]):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


@functools.lru_cache(maxsize=None)
def describe_keys() -> Tuple[tuple, ...]:
    """(dotted key, type, default, doc) for every key of RunConfig."""
    rows = []
    for section in dataclasses.fields(RunConfig):
        cls = section.default_factory
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls)
        inst = cls()
        for f in dataclasses.fields(cls):
            rows.append(
                (f"{section.name}.{f.name}", _type_name(hints[f.name]), getattr(inst, f.name), docs.get(f.name, ""))
            )
    return tuple(rows)


def describe_markdown() -> str:
    """The key table of docs/config.md (regenerate with `tierzero config --describe --markdown`)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tname, default, doc in describe_keys():
        shown = "null" if default is None else repr(default)
        lines.append(f"| `{key}` | {tname.replace(' | ', ' or ')} | `{shown}` | {doc} |")
    return "\n".join(lines) + "\n"


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin is typing.Union and len(args) == 1:
        return _type_name(args[0]) + " | null"
    if origin in (list, List):
        return f"list[{_type_name(args[0])}]"
    return getattr(tp, "__name__", str(tp))


def _all_keys() -> List[str]:
    return [row[0] for row in describe_keys()]


def _key_type(key: str) -> Optional[str]:
    for row in describe_keys():
        if row[0] == key:
            return row[1]
    return None


_EXAMPLES = {"int": "a whole number, e.g. 4", "float": "a number, e.g. 0.5", "bool": "true or false",
             "str": "a word", "list[int]": "a list, e.g. [2,2]", "list[str]": "a list, e.g. [node,cluster]"}


def _shown(value, limit: int = 120) -> str:
    """repr(value), cut to about `limit` characters: a message names the value, it does not echo a megabyte."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _path_shown(path: str) -> str:
    """A path as typed when it is printable and of a length a real path has, else its cut repr."""
    return path if path.isprintable() and len(path) <= 2 * NAME_MAX else _shown(path)


def _long_name(path: str) -> Optional[str]:
    """The first file or folder name of `path` longer than NAME_MAX bytes, else None."""
    return next((part for part in path.split("/") if len(part.encode("utf-8", "surrogatepass")) > NAME_MAX), None)


def _key_shown(key: str) -> str:
    """A key as typed when it is plain and short, else its cut repr."""
    return key if key.isprintable() and len(key) <= 80 else _shown(key)


@functools.lru_cache(maxsize=None)
def _known_keys() -> frozenset:
    return frozenset(_all_keys())


KEY_SHOWN_CHARS = 40
"""An unknown key is shown cut to this many characters (the longest real key has 30)."""
_KEY_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)*\Z")
"""What a top-level key of a config file looks like: a section or a dotted key, or a typo of one."""


def _unknown_key_message(key: str, where: str) -> str:
    if key in {f.name for f in dataclasses.fields(RunConfig)}:
        return (f"{key} ({where}) is a section: give it a mapping of its keys (e.g. {key}: {{...}} in a file) or "
                f"set one key, {key}.<name>=...; `tierzero config --describe` lists them.")
    shown = _shown(key, KEY_SHOWN_CHARS)  # a file's key may be a line of another file, not the user's typing
    if len(key) > 200:  # no close match is worth the comparison
        return f"Unknown config key {shown} ({where}). `tierzero config --describe` lists every key."
    guesses = difflib.get_close_matches(key, _all_keys(), n=3, cutoff=0.6)
    if not guesses:
        # a typo in the leaf, right section: compare with that section's keys
        section = key.split(".")[0]
        leafs = [k for k in _all_keys() if k.startswith(section + ".")]
        guesses = difflib.get_close_matches(key, leafs, n=3, cutoff=0.4)
    hint = f" Did you mean {' or '.join(guesses)}?" if guesses else ""
    return f"Unknown config key {shown} ({where}).{hint} `tierzero config --describe` lists every key."


def _type_message(key: str, value, where: str) -> str:
    tname = _key_type(key) or "?"
    base = tname.replace(" | null", "")
    example = _EXAMPLES.get(base, base)
    null = " or null" if tname.endswith("| null") else ""
    return f"{key}={_shown(value)} ({where}) is not a valid {tname}; give {example}{null}."


def _error_key(e: OmegaConfBaseException, prefix: str = "") -> str:
    key = getattr(e, "full_key", None) or ""
    return f"{prefix}{key}" if key else prefix.rstrip(".")


# ---- YAML within a budget ----------------------------------------------------------

MAX_CONFIG_BYTES = 256 * 1024
"""A config file (or one `key=value` override) larger than this is refused unread; a recipe or a
resolved config.yaml is a few KB (and PyYAML's pure-Python reader takes about a second per MB)."""
MAX_YAML_DEPTH = 16
"""Nesting of mappings and lists in one YAML document; a config needs 3 (file, section, list value)."""
MAX_YAML_NODES = 5_000
"""Values (scalars, lists, mappings) in one YAML document; a resolved config.yaml has about 300."""
MAX_PROBLEMS_PER_FILE = 20
"""Problems listed for one config file; the rest are counted (a file of junk is one paragraph, not a book)."""


class YAMLBudgetError(yaml.MarkedYAMLError):
    """YAML that tierzero will not build: an anchor or alias, or nesting or size beyond the budget."""


class _BudgetLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses anchors and aliases -- `&a` / `*a` / `<<: *a`: a few hundred
    bytes of nested aliases ("billion laughs") expand to gigabytes once walked; no tierzero recipe
    uses them -- and stops at MAX_YAML_DEPTH levels and MAX_YAML_NODES values, before the
    recursive composer can hit Python's recursion limit."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            sign = "*" if isinstance(event, yaml.AliasEvent) else "&"
            raise YAMLBudgetError(problem=f"a YAML anchor or alias ({sign}{_shown(anchor, 40)[1:-1]}), which "
                                          "tierzero configs do not take", problem_mark=event.start_mark)
        self._nodes += 1
        if self._nodes > MAX_YAML_NODES:
            raise YAMLBudgetError(problem=f"more than {MAX_YAML_NODES} values", problem_mark=event.start_mark)
        if self._depth >= MAX_YAML_DEPTH:
            raise YAMLBudgetError(problem=f"nesting deeper than {MAX_YAML_DEPTH} levels",
                                  problem_mark=event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _refuse_tag(loader, node):
    raise yaml.constructor.ConstructorError(
        None, None, f"a value tagged {node.tag.replace('tag:yaml.org,2002:', '!!')}, which a config does not take "
        "(numbers, words, true/false, null, lists and mappings only)", node.start_mark)


# A date is a word in a config (YAML would make 2001-12-14 a datetime.date); bytes, sets and
# ordered pairs have no config key to go to.
_BudgetLoader.add_constructor("tag:yaml.org,2002:timestamp", lambda loader, node: loader.construct_scalar(node))
for _tag in ("binary", "set", "omap", "pairs"):
    _BudgetLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _refuse_tag)


def load_yaml(text: str):
    """yaml.safe_load within the budget (_BudgetLoader): YAMLBudgetError for what it refuses,
    another yaml.YAMLError for text that is not YAML (or a value its tag cannot build, `!!float x`)."""
    loader = _BudgetLoader(text)
    try:
        return loader.get_single_data()
    except (ValueError, TypeError, OverflowError) as e:  # PyYAML's constructors raise these for `!!int 1.5`
        raise yaml.YAMLError(f"a value its tag cannot build ({e})") from e
    finally:
        loader.dispose()


def _yaml_where(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MiB" if num_bytes >= 2**20 else f"{num_bytes / 1024:g} KiB"


def read_config_file(path: Path) -> Tuple[Optional[str], Optional[str]]:
    """(the text of one config file, None), or (None, one message naming the file, what is wrong
    and the fix). Opened before it is looked at (no check-then-open race) and without blocking
    (O_NONBLOCK: a FIFO opens at once and is then refused); at most MAX_CONFIG_BYTES are read."""
    name = _shown(str(path))
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None, (f"Config file {name} not found. Give a YAML file path or a recipe name from "
                      f"{RECIPE_DIR} (e.g. {DEFAULT_RECIPE.stem}).")
    except (OSError, ValueError) as e:  # permissions, a loop of links, a name too long, a NUL byte
        return None, f"Config file {name} cannot be opened ({getattr(e, 'strerror', None) or e}); give a readable YAML file."
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            return None, (f"Config file {name} is a folder, not a YAML file; give a file in it (a run folder's "
                          f"config.yaml), or a recipe name such as {DEFAULT_RECIPE.stem}.")
        if not stat.S_ISREG(info.st_mode):
            return None, (f"Config file {name} is not a regular file (a FIFO, socket or device), and tierzero reads "
                          "configs only from files; write the config to a file and give its path.")
        chunks, total = [], 0
        while total <= MAX_CONFIG_BYTES:
            chunk = os.read(fd, min(1 << 16, MAX_CONFIG_BYTES + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as e:
        return None, f"Config file {name} cannot be read ({e.strerror or e}); give a readable YAML file."
    finally:
        os.close(fd)
    if total > MAX_CONFIG_BYTES:
        return None, (f"Config file {name} is larger than {_size(MAX_CONFIG_BYTES)} (a recipe is a few KB); "
                      "check that the path names a config, or split it.")
    data = b"".join(chunks)
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, (f"Config file {name} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                      "a config is YAML text: check that the path names a config file, not a binary one.")


# ---- composition -------------------------------------------------------------------

def resolve_config_path(arg: str) -> Path:
    """A path as given, else a recipe name from recipes/configs (with or without .yaml)."""
    p = Path(arg)
    try:
        if p.exists():
            return p
        for cand in (RECIPE_DIR / arg, RECIPE_DIR / f"{arg}.yaml"):
            if cand.is_file() and "/" not in arg:
                return cand
    except (OSError, ValueError):  # a name too long, a NUL byte: read_config_file says so, naming the file
        pass
    return p


def load_config(
    files: Sequence[str] = (),
    overrides: Sequence[str] = (),
    *,
    use_default_recipe: bool = True,
) -> RunConfig:
    """Compose and validate; raises ConfigError listing every problem found."""
    problems: List[str] = []
    merged = OmegaConf.structured(RunConfig)
    paths = [resolve_config_path(f) for f in files]
    if not paths and use_default_recipe:
        paths = [DEFAULT_RECIPE]
    for path in paths:
        merged = _merge_file(merged, path, problems)
    for item in overrides:
        parsed = _override(item, problems)
        if parsed is not None:
            merged, err = _merge_one(merged, *parsed, where="on the command line")
            problems += [err] if err else []
    if problems:
        raise ConfigError(problems)
    cfg: RunConfig = OmegaConf.to_object(merged)
    # model.from_hf: the shape comes from a Hugging Face config.json (recipes/config.py)
    problems = apply_from_hf(cfg.model, cfg.data, cfg.moe, cfg.checkpoint) or validate(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def _merge_file(merged, path: Path, problems: List[str]):
    """`merged` with one file's values; its problems (at most MAX_PROBLEMS_PER_FILE, then a count) go to `problems`."""
    found: List[str] = []
    skipped = 0
    for key, value in _file_items(path, found):
        if len(found) >= MAX_PROBLEMS_PER_FILE and key not in _known_keys():
            skipped += 1  # not worth a close-match search each
            continue
        merged, err = _merge_one(merged, key, value, where=f"in {path}")
        found += [err] if err else []
    skipped += max(0, len(found) - MAX_PROBLEMS_PER_FILE)
    problems += found[:MAX_PROBLEMS_PER_FILE]
    if skipped:
        problems.append(f"... and {skipped} more problem(s) in {_shown(str(path))}; fix the ones above first.")
    return merged


def _file_items(path: Path, problems: List[str]):
    """The (dotted key, value) pairs of one YAML file; what is wrong with it goes to `problems`."""
    text, problem = read_config_file(path)
    if problem:
        problems.append(problem)
        return []
    name = _shown(str(path))
    try:
        data = load_yaml(text)
    except YAMLBudgetError as e:
        problems.append(f"Config file {name}{_yaml_where(e)} holds {e.problem}; nothing was built from it. Write "
                        "the values out plainly: sections of keys holding numbers, words or short lists.")
        return []
    except yaml.YAMLError as e:
        why = str(getattr(e, "problem", None) or e)  # PyYAML's words, which may quote a tag or a value: cut
        why = why if len(why) <= 80 else why[:80] + "..."
        problems.append(f"Config file {name} is not valid YAML{_yaml_where(e)}: {why}. "
                        "Fix the file (indentation, a missing ':' or an unclosed bracket are the usual causes).")
        return []
    if data is None:
        return []
    # A file that is not a mapping of names is not shown at all: it may be another file given by
    # mistake or through a link (/etc/shadow's lines read as keys), and errors go to logs others read.
    names = [k for k in data if isinstance(k, str) and len(k) <= 2 * KEY_SHOWN_CHARS and _KEY_NAME_RE.match(k)] \
        if isinstance(data, dict) else []
    if not isinstance(data, dict) or len(names) < len(data):
        what = (f"{len(data) - len(names)} of its {len(data)} top-level keys are not names of sections or keys"
                if isinstance(data, dict) else f"it holds a {type(data).__name__}")
        sections = ", ".join(f.name for f in dataclasses.fields(RunConfig))
        problems.append(f"Config file {name} is not a tierzero config: its top level must be a mapping of sections "
                        f"({sections}), and {what}; nothing of it is shown here or used. Check that the path (or the "
                        f"file a link points to) is a config: a recipe such as {DEFAULT_RECIPE.stem}, or a run "
                        "folder's config.yaml.")
        return []
    return list(_flatten(data))


def _override(item: str, problems: List[str]):
    """`key=value` from the command line -> (key, value), or None (the problem goes to `problems`)."""
    if "=" not in item or item.startswith("="):
        problems.append(f"Override {_shown(item)} is not key=value; write e.g. train.steps=100 (no spaces around "
                        "'=').")
        return None
    key, raw = item.split("=", 1)
    key = key.strip()
    text_key = _key_type(key) in ("str", "str | null")
    if len(raw) > MAX_CONFIG_BYTES:
        problems.append(f"Override {_key_shown(key)}=... is {_size(len(raw))} long, over {_size(MAX_CONFIG_BYTES)}; "
                        "give a shorter value, or put it in a config file.")
        return None
    try:
        value = load_yaml(raw) if raw != "" else ""
    except YAMLBudgetError as e:
        if not text_key or _quoted(raw):  # a text key takes the text as typed below
            problems.append(f"Override {_key_shown(key)}={_shown(raw)} holds {e.problem}; write the value "
                            f"out plainly: {_EXAMPLES.get(str(_key_type(key)).replace(' | null', ''), 'a value')}.")
            return None
        value = raw
    except yaml.YAMLError:
        value = raw
    if text_key and value is not None and not _quoted(raw):
        # keep a string key's text as typed: YAML would read slurm.time=10:00 as the number 600
        value = raw
    return key, value


def _quoted(raw: str) -> bool:
    return len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""


def _flatten(data: dict, prefix: str = ""):
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and "." not in key:
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def _merge_one(merged, key: str, value, where: str):
    """Set one key of `merged` (in place: a copy per key made composing quadratic), or say why not;
    a value that fails leaves the key as it was."""
    if key not in _known_keys():
        return merged, _unknown_key_message(key, where)
    before = OmegaConf.select(merged, key)
    if OmegaConf.is_config(before):
        before = OmegaConf.to_container(before)
    try:
        OmegaConf.update(merged, key, value, merge=False, force_add=False)
        return merged, None
    except ConfigKeyError:
        return merged, _unknown_key_message(key, where)
    except (OmegaConfBaseException, ValueError, TypeError, OverflowError):
        # OverflowError: an integer too large for a float key (train.lr=1 followed by 400 zeros)
        with contextlib.suppress(OmegaConfBaseException, ValueError, TypeError):
            OmegaConf.update(merged, key, before, merge=False, force_add=False)
        return merged, _type_message(key, value, where)


MAX_DURATION_S = 1e9
"""Every duration key (`*_s`) is at most this (about 31 years): thread waits and timedeltas
overflow beyond ~9.2e9 s (threading.TIMEOUT_MAX), so a larger value crashes where it is used."""


def _example(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "null" if value is None else str(value)


def number_errors(cfg: RunConfig) -> Dict[str, str]:
    """{dotted key: problem} for the rules every number follows whatever its section, walked
    over every field of every section (a new key is covered without being listed): a float,
    alone or in a list, is finite -- not .nan, not .inf, not a number beyond a float such as
    1e400 (read as inf) -- unless its field opts out with `field(metadata={"allow_nonfinite":
    True})` (none does); an integer fits 64 bits (what torch, numpy and Slurm take); a duration
    (`*_s`) is at most MAX_DURATION_S."""
    found: Dict[str, str] = {}
    for section in dataclasses.fields(cfg):
        part, defaults = getattr(cfg, section.name), section.default_factory()
        for f in dataclasses.fields(part):
            key, value = f"{section.name}.{f.name}", getattr(part, f.name)
            items = list(value) if isinstance(value, (list, tuple)) else [value]
            numbers = [v for v in items if isinstance(v, (int, float)) and not isinstance(v, bool)]
            default = getattr(defaults, f.name)
            floats = [v for v in numbers if isinstance(v, float)]
            if not f.metadata.get("allow_nonfinite") and not all(math.isfinite(v) for v in floats):
                found[key] = (f"{key}={_shown(value)} is not a finite number: tierzero takes finite numbers only "
                              "(not .nan or .inf, nor a number too large for a float such as 1e400, which reads as "
                              f"inf); give e.g. {key}={_example(default)}.")
            elif any(isinstance(v, int) and not -2**63 <= v < 2**63 for v in numbers):
                found[key] = (f"{key}={_shown(value)} does not fit a 64-bit integer (what torch, numpy and Slurm "
                              f"take); give e.g. {key}={_example(default)}.")
            elif f.name.endswith("_s") and any(v > MAX_DURATION_S for v in numbers):
                found[key] = (f"{key}={_shown(value)} seconds is longer than {MAX_DURATION_S:g} s (about 31 years), "
                              f"past what a timer can wait; give e.g. {key}={_example(default)}.")
    return found


SUPPORTED_PROTOCOLS = ("file", "memory", "s3")
"""URL protocols of checkpoint and telemetry locations (besides plain local paths)."""
LOCATION_KEYS = ("checkpoint.dir", "telemetry.dir", "checkpoint.resume", "checkpoint.init_from")
_SUPPORTED_TEXT = ("a local path, or a file://, memory:// (one process only) or s3:// URL "
                   "(s3:// needs the s3 extra: pip install 'tierzero[s3]')")


def _get(cfg: RunConfig, key: str):
    section, name = key.split(".", 1)
    return getattr(getattr(cfg, section), name)


def url_protocol(location: str) -> Optional[str]:
    """The fsspec protocol of a location, None for a plain local path -- as fsspec.core.split_protocol
    reads it (a one-letter protocol is a Windows drive; `data:` is a protocol of its own)."""
    if "://" in location:
        protocol = location.split("://", 1)[0]
        if len(protocol) > 1:
            return protocol
    if location.startswith("data:"):
        return "data"
    return None


def location_errors(cfg: RunConfig) -> Dict[str, str]:
    """{key: problem} for each location key (LOCATION_KEYS) whose URL tierzero cannot use, found
    without importing a backend or opening a connection: a protocol outside SUPPORTED_PROTOCOLS, a
    chained URL (`a::b`), or s3:// without s3fs installed."""
    found: Dict[str, str] = {}
    for key in LOCATION_KEYS:
        value = _get(cfg, key)
        if value is None or (key == "checkpoint.resume" and value in ("auto", "none")):
            continue
        value = str(value)
        protocol = url_protocol(value)
        if "::" in value:
            found[key] = (f"{key}={_shown(value)} is a chained fsspec URL ('::'), which tierzero does not use; "
                          f"give {_SUPPORTED_TEXT}.")
        elif protocol is not None and protocol not in SUPPORTED_PROTOCOLS:
            found[key] = (f"{key}={_shown(value)} uses the protocol {_shown(protocol, 40)}, which tierzero does not "
                          f"support; give {_SUPPORTED_TEXT}.")
        elif protocol == "s3" and importlib.util.find_spec("s3fs") is None:
            found[key] = (f"{key}={_shown(value)} is an s3:// URL, but the s3fs package is not installed here; "
                          "pip install 'tierzero[s3]', or give a local path.")
    return found


def shared_storage_errors(cfg: RunConfig, num_processes: int, launch: str) -> List[str]:
    """A memory:// checkpoint.dir or telemetry.dir when `num_processes` > 1 processes would use it
    (`launch` says which: "launcher.nproc=4", "this launch"): each process has its own in-memory
    filesystem, so the ranks never see each other's files and the first checkpoint commit, which
    waits for every rank's report, never completes."""
    if num_processes <= 1:
        return []
    errs = []
    for key in ("checkpoint.dir", "telemetry.dir"):
        value = _get(cfg, key)
        if value is not None and url_protocol(str(value)) == "memory":
            errs.append(
                f"{key}={_shown(value)} is an in-memory filesystem, which every process has its own of, but "
                f"{launch} runs {num_processes} processes: they would never see each other's files (the first "
                f"checkpoint would wait forever for the other ranks). Give a folder or s3:// URL all ranks share "
                f"(or leave {key} unset for the run folder), or use memory:// with launcher.nproc=1."
            )
    return errs


def written_size_errors(cfg: RunConfig) -> List[str]:
    """The config as `tierzero run` writes it (config.yaml, which every rank reads back) must fit the
    budget its reader keeps (MAX_CONFIG_BYTES, MAX_YAML_NODES): overrides each within it can add up
    past it (a few long lists). Written out and read back only when a rough count comes near."""
    nodes, chars = 1, 0
    for section in dataclasses.fields(cfg):
        part = getattr(cfg, section.name)
        nodes += 2
        for f in dataclasses.fields(part):
            value = getattr(part, f.name)
            items = value if isinstance(value, (list, tuple)) else [value]
            nodes += 2 + (len(items) if isinstance(value, (list, tuple)) else 0)
            chars += len(f.name) + sum(len(str(v)) + 4 for v in items)
    if nodes < MAX_YAML_NODES // 2 and chars < MAX_CONFIG_BYTES // 8:
        return []
    text = to_yaml(cfg)
    try:
        if len(text.encode("utf-8", "surrogatepass")) > MAX_CONFIG_BYTES:
            raise YAMLBudgetError(problem=f"more than {_size(MAX_CONFIG_BYTES)}")
        load_yaml(text)
    except YAMLBudgetError as e:
        return [f"This config, written out as the config.yaml every rank reads, would hold {e.problem}, more than a "
                "config file may; shorten the longest values or lists (slurm.setup, slurm.extra_sbatch, bench.*)."]
    return []


def validate(cfg: RunConfig) -> List[str]:
    """Value checks that need the whole config: the rules every number and every location follow
    (number_errors, location_errors), then each section's own checks. A key that breaks a rule is
    named once: the section's message about the same key (e.g. "must be > 0" for nan) is dropped."""
    numbers = number_errors(cfg)
    errs: List[str] = list(numbers.values())
    errs += run_errors(cfg.run)
    errs += cfg.launcher.errors()
    errs += cfg.topology.errors()
    errs += cfg.parallel.errors()
    errs += cfg.telemetry.errors()
    errs += cfg.bench.errors()
    errs += cfg.slurm.errors()
    errs += cfg.checkpoint.errors()
    errs += train_errors(cfg.train)
    errs += model_errors(cfg.model)
    errs += cfg.moe.errors()
    errs += moe_parallel_errors(cfg)
    errs += engine_errors(parallel=cfg.parallel, moe=cfg.moe, checkpoint=cfg.checkpoint, train=cfg.train)
    errs += data_errors(cfg.data)
    errs += eval_errors(cfg.train, cfg.data)
    named = tuple(f"{key}=" for key in numbers)
    errs = [e for e in errs if e in numbers.values() or not e.startswith(named)] if named else errs
    errs += [problem for key, problem in location_errors(cfg).items() if not any(e.startswith(f"{key}=") for e in errs)]
    errs += shared_storage_errors(cfg, cfg.launcher.nproc, f"launcher.nproc={cfg.launcher.nproc}")
    errs += written_size_errors(cfg)
    emulate = cfg.topology.emulate
    if emulate and not errs:
        if math.prod(emulate) != cfg.launcher.nproc:
            errs.append(
                f"topology.emulate={list(emulate)} describes {math.prod(emulate)} ranks but "
                f"launcher.nproc={cfg.launcher.nproc}; make them agree, e.g. "
                f"launcher.nproc={math.prod(emulate)}"
            )
    return errs


def run_errors(run: RunSection) -> List[str]:
    """run.name is one folder name, run.dir a path of names a filesystem takes: found here, before
    `tierzero run` creates runs/ or any other folder on the way."""
    errs = []
    name = run.name
    if not _NAME_RE.match(name) or ".." in name:
        errs.append(
            f"run.name={_shown(name)} must be a plain folder name (letters, digits, '.', '_', '-'; "
            "no '/', no '..', not absolute) so the run stays inside its parent folder; "
            "e.g. run.name=tiny-1. Use run.dir to choose another location."
        )
    elif len(name.encode("utf-8")) > MAX_RUN_NAME_BYTES:
        errs.append(
            f"run.name={_shown(name, 40)} is {len(name.encode('utf-8'))} bytes long, over the {MAX_RUN_NAME_BYTES} "
            f"a run name may have: it names the folder runs/<run.name> and its lock file, and a filesystem takes "
            f"at most {NAME_MAX} bytes in a name (File name too long); give a shorter name, e.g. run.name=tiny-1."
        )
    long_name = _long_name(run.dir) if run.dir is not None else None
    if long_name is not None:
        errs.append(
            f"run.dir={_path_shown(run.dir)} holds a name of {len(long_name.encode('utf-8', 'surrogatepass'))} "
            f"bytes, over the {NAME_MAX} a filesystem takes in one file or folder name (File name too long); "
            "give a path of shorter folder names, e.g. run.dir=runs/tiny-1."
        )
    return errs


def moe_parallel_errors(cfg: RunConfig) -> List[str]:
    """How parallel.* and moe.* must agree."""
    ep, experts = cfg.parallel.ep, cfg.moe.num_experts
    if ep > 1 and not experts:
        return [f"parallel.ep={ep} splits experts over ranks, but moe.num_experts=0 (a dense model); "
                "set moe.num_experts (e.g. moe.num_experts=8) or parallel.ep=1"]
    errs = []
    if experts and ep >= 1 and experts % ep:
        errs.append(f"moe.num_experts={experts} is not divisible by parallel.ep={ep}: every expert-parallel rank "
                    f"holds the same number of experts; pick parallel.ep from {_divisors(experts)}")
    return errs


def _divisors(n: int, limit: int = 12) -> str:
    """The first `limit` divisors of n, found among 1..100000 (n may be any size a user typed)."""
    found = [d for d in range(1, min(n, 100_000) + 1) if n % d == 0]
    return f"{str(found[:limit])[:-1]}, ...]" if n > 100_000 or len(found) > limit else str(found)


def check_world(cfg: RunConfig, world_size: int, *, batch: bool = True) -> List[str]:
    """Checks that need the world size (known at launch, not at parse time); `batch=False`
    skips the batch split (planning for a cluster does not need the recipe's batch to fit it).
    A launch (batch=True) also may not put its storage on memory:// with more than one process
    (shared_storage_errors)."""
    t = cfg.train
    problems = []
    per_pass = t.micro_batch_size * world_size
    if batch and t.global_batch_size % per_pass:
        problems.append(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={t.micro_batch_size} x {world_size} data-parallel ranks = {per_pass}; "
            f"gradient accumulation must be a whole number. Pick e.g. "
            f"train.global_batch_size={per_pass * max(1, round(t.global_batch_size / per_pass))}, "
            f"or a train.micro_batch_size that divides global_batch_size / {world_size}."
        )
    if world_size % cfg.parallel.ep:
        problems.append(
            f"parallel.ep={cfg.parallel.ep} (expert-parallel group size) does not divide the {world_size} rank(s) "
            f"of this launch; pick one of {_divisors(world_size)}, e.g. parallel.ep=1 on a single rank"
        )
    if batch:  # a launch (planning runs nothing)
        problems += shared_storage_errors(cfg, world_size, "this launch")
    return problems


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
