"""RunConfig: every package's config section composed with omegaconf.

Precedence: dataclass defaults < YAML files in the order given < `key=value` overrides.
All problems are collected and raised together as one ConfigError, before anything is
written to disk.
"""

from __future__ import annotations

import ast
import functools
import dataclasses
import difflib
import inspect
import re
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
from tierzero.recipes.config import DataConfig, ModelConfig, TrainConfig, data_errors, model_errors, train_errors
from tierzero.slurm.config import SlurmConfig
from tierzero.telemetry.config import TelemetryConfig

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes" / "configs"
DEFAULT_RECIPE = RECIPE_DIR / "moe_tiny_cpu.yaml"
BACKENDS = ("auto", "gloo", "nccl")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


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
    """torch.distributed backend: auto (nccl with CUDA, else gloo), gloo or nccl."""
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
        if self.hang_timeout_s < 0:
            errs.append(f"launcher.hang_timeout_s={self.hang_timeout_s} must be >= 0 (0 = off), e.g. 300")
        from tierzero.launcher.signals import signal_number

        try:
            signal_number(self.requeue_signal)
        except ValueError:
            errs.append(f"launcher.requeue_signal={self.requeue_signal!r} is not a signal a process can catch; use a "
                        "name such as SIGUSR2 (the default), SIGTERM or SIGHUP (SIGKILL and SIGSTOP cannot be caught)")
        if self.restart_window_s <= 0:
            errs.append(f"launcher.restart_window_s={self.restart_window_s} must be > 0, e.g. 3600")
        if self.timeout_s <= 0:
            errs.append(f"launcher.timeout_s={self.timeout_s} must be > 0, e.g. launcher.timeout_s=300")
        if self.inter_node_gbit is not None and self.inter_node_gbit <= 0:
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


def _unknown_key_message(key: str, where: str) -> str:
    guesses = difflib.get_close_matches(key, _all_keys(), n=3, cutoff=0.6)
    if not guesses:
        # a typo in the leaf, right section: compare with that section's keys
        section = key.split(".")[0]
        leafs = [k for k in _all_keys() if k.startswith(section + ".")]
        guesses = difflib.get_close_matches(key, leafs, n=3, cutoff=0.4)
    hint = f" Did you mean {' or '.join(guesses)}?" if guesses else ""
    return (
        f"Unknown config key {key!r} ({where}).{hint} "
        f"`tierzero config --describe` lists every key."
    )


def _type_message(key: str, value, where: str) -> str:
    tname = _key_type(key) or "?"
    base = tname.replace(" | null", "")
    example = _EXAMPLES.get(base, base)
    null = " or null" if tname.endswith("| null") else ""
    return f"{key}={value!r} ({where}) is not a valid {tname}; give {example}{null}."


def _error_key(e: OmegaConfBaseException, prefix: str = "") -> str:
    key = getattr(e, "full_key", None) or ""
    return f"{prefix}{key}" if key else prefix.rstrip(".")


# ---- composition -------------------------------------------------------------------

def resolve_config_path(arg: str) -> Path:
    """A path as given, else a recipe name from recipes/configs (with or without .yaml)."""
    p = Path(arg)
    if p.exists():
        return p
    for cand in (RECIPE_DIR / arg, RECIPE_DIR / f"{arg}.yaml"):
        if cand.is_file() and "/" not in arg:
            return cand
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
        for key, value in _file_items(path, problems):
            merged, err = _merge_one(merged, key, value, where=f"in {path}")
            problems += [err] if err else []
    for item in overrides:
        parsed = _override(item, problems)
        if parsed is not None:
            merged, err = _merge_one(merged, *parsed, where="on the command line")
            problems += [err] if err else []
    if problems:
        raise ConfigError(problems)
    cfg: RunConfig = OmegaConf.to_object(merged)
    problems = validate(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def _file_items(path: Path, problems: List[str]):
    """The (dotted key, value) pairs of one YAML file; what is wrong with it goes to `problems`."""
    if not path.is_file():
        problems.append(f"Config file {str(path)!r} not found. Give a YAML file path or a recipe name from "
                        f"{RECIPE_DIR} (e.g. {DEFAULT_RECIPE.stem}).")
        return []
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problems.append(f"Config file {str(path)!r} is not valid YAML{where}: {getattr(e, 'problem', e)}. "
                        "Fix the file (indentation, a missing ':' or an unclosed bracket are the usual causes).")
        return []
    if data is None:
        return []
    if not isinstance(data, dict):
        problems.append(f"Config file {str(path)!r} must hold a mapping of sections (run:, train:, ...), "
                        f"not a {type(data).__name__}.")
        return []
    return list(_flatten(data))


def _override(item: str, problems: List[str]):
    """`key=value` from the command line -> (key, value), or None (the problem goes to `problems`)."""
    if "=" not in item or item.startswith("="):
        problems.append(f"Override {item!r} is not key=value; write e.g. train.steps=100 (no spaces around '=').")
        return None
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if _key_type(key) in ("str", "str | null") and value is not None and not _quoted(raw):
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
    if key not in _all_keys():
        return merged, _unknown_key_message(key, where)
    try:
        candidate = OmegaConf.merge(merged, OmegaConf.from_dotlist([]))
        OmegaConf.update(candidate, key, value, merge=False, force_add=False)
        return candidate, None
    except ConfigKeyError:
        return merged, _unknown_key_message(key, where)
    except OmegaConfBaseException:
        return merged, _type_message(key, value, where)


def validate(cfg: RunConfig) -> List[str]:
    """Value checks that need the whole config; every section adds its own."""
    errs: List[str] = []
    name = cfg.run.name
    if not _NAME_RE.match(name) or ".." in name:
        errs.append(
            f"run.name={name!r} must be a plain folder name (letters, digits, '.', '_', '-'; "
            "no '/', no '..', not absolute) so the run stays inside its parent folder; "
            "e.g. run.name=tiny-1. Use run.dir to choose another location."
        )
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
    emulate = cfg.topology.emulate
    if emulate and not errs:
        import math

        if math.prod(emulate) != cfg.launcher.nproc:
            errs.append(
                f"topology.emulate={list(emulate)} describes {math.prod(emulate)} ranks but "
                f"launcher.nproc={cfg.launcher.nproc}; make them agree, e.g. "
                f"launcher.nproc={math.prod(emulate)}"
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
                    f"holds the same number of experts; pick parallel.ep from "
                    f"{[d for d in range(1, experts + 1) if experts % d == 0]}")
    return errs


def check_world(cfg: RunConfig, world_size: int, *, batch: bool = True) -> List[str]:
    """Checks that need the world size (known at launch, not at parse time); `batch=False`
    skips the batch split (planning for a cluster does not need the recipe's batch to fit it)."""
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
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        problems.append(
            f"parallel.ep={cfg.parallel.ep} (expert-parallel group size) does not divide the {world_size} rank(s) "
            f"of this launch; pick one of {divisors}, e.g. parallel.ep=1 on a single rank"
        )
    return problems


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
