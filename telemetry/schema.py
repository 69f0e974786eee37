"""The telemetry tables, their on-disk layout, and where a run's telemetry lives.

A table is defined here and nowhere else: add its schema to TABLES (and, if some of its
columns are computed when the caller leaves them out, a DERIVED entry), and
`Telemetry.record("<table>", **row)` checks and writes it, and `load_table` reads it back,
with no other change.

Units live in column names. The partition keys run, attempt and rank are not columns
inside the files: they live only in the Hive path
`<root>/<table>/run=<run>/attempt=<attempt>/rank=<rank>/part-00000.parquet`, which every
reader (pyarrow.dataset, DuckDB `hive_partitioning=1`, pandas, polars) turns back into
columns.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional, Protocol

import pyarrow as pa

TIME = pa.timestamp("us", tz="UTC")

STEPS = pa.schema(
    [
        pa.field("time", TIME, nullable=False),
        pa.field("step", pa.int64(), nullable=False),
        pa.field("loss", pa.float64()),
        pa.field("lr", pa.float64()),
        pa.field("grad_norm", pa.float64()),
        pa.field("tokens", pa.int64()),  # tokens this rank processed in the step
        pa.field("step_time_s", pa.float64()),
        pa.field("tokens_per_s", pa.float64()),  # this rank's tokens / step_time_s
        pa.field("tflops", pa.float64()),  # achieved by this rank
        pa.field("mfu", pa.float64()),  # tflops / peak_tflops, a fraction in [0, 1]
        pa.field("mem_rss_bytes", pa.int64()),
        pa.field("gpu_mem_bytes", pa.int64()),
    ]
)

EVENTS = pa.schema(
    [
        pa.field("time", TIME, nullable=False),
        pa.field("step", pa.int64()),
        pa.field("kind", pa.string(), nullable=False),  # start, end, error, restart, checkpoint, signal, ...
        pa.field("detail", pa.string(), nullable=False),
        pa.field("host", pa.string(), nullable=False),
        # kind=save, one row per checkpoint save on every rank: seconds its training loop spent in
        # the save() call (synchronous: the whole save; asynchronous: issuing or taking the copy).
        # An optimizer step that then waits for a background copy books that wait in its step_time_s.
        pa.field("stall_s", pa.float64(), nullable=True),
    ]
)

NODES = pa.schema(
    [
        pa.field("time", TIME, nullable=False),
        pa.field("host", pa.string(), nullable=False),
        pa.field("cpu_percent", pa.float64(), nullable=False),  # all cores, averaged since the previous sample
        pa.field("mem_used_bytes", pa.int64(), nullable=False),  # total - available
        pa.field("mem_total_bytes", pa.int64(), nullable=False),
        pa.field("proc_rss_bytes", pa.int64(), nullable=False),  # the sampling process
        pa.field("gpu_index", pa.int32()),
        pa.field("gpu_util_percent", pa.float64()),
        pa.field("gpu_mem_used_bytes", pa.int64()),
        pa.field("gpu_mem_total_bytes", pa.int64()),
        pa.field("gpu_power_w", pa.float64()),
        pa.field("gpu_temp_c", pa.float64()),
    ]
)

COMM = pa.schema(
    [
        pa.field("time", TIME, nullable=False),
        pa.field("step", pa.int64(), nullable=False),
        pa.field("phase", pa.string(), nullable=False),  # fwd, bwd, step
        pa.field("level", pa.string(), nullable=False),  # outermost topology level the group spans
        pa.field("op", pa.string(), nullable=False),  # all_gather, reduce_scatter, all_reduce, ...
        pa.field("bytes", pa.float64(), nullable=False),  # sent by this rank, nccl-tests conventions
        pa.field("time_s", pa.float64(), nullable=False),  # issue to completion, summed over calls
        pa.field("calls", pa.int64(), nullable=False),
        pa.field("wait_s", pa.float64(), nullable=True),  # parallel.comm_timing=aligned: at the barrier before
    ]
)
"""One row per (step, phase, level, op): the engine's byte ledger."""

COLLECTIVES = pa.schema(
    [
        pa.field("time", TIME, nullable=False),
        pa.field("op", pa.string(), nullable=False),  # all_reduce, reduce_scatter, ...
        pa.field("scope", pa.string(), nullable=False),  # global, level:<name>, cross:<name>
        pa.field("group", pa.int32(), nullable=False),  # index of the group inside its scope
        pa.field("ranks", pa.string(), nullable=False),  # the group's global ranks, comma-separated
        pa.field("placement", pa.string(), nullable=False),  # out (out-of-place) or in (in-place)
        pa.field("backend", pa.string(), nullable=False),  # gloo, nccl, mpi
        pa.field("dtype", pa.string(), nullable=False),
        pa.field("size_bytes", pa.int64(), nullable=False),  # nccl-tests' S: the whole buffer
        pa.field("count", pa.int64(), nullable=False),  # elements of S
        pa.field("nranks", pa.int32(), nullable=False),
        pa.field("time_us", pa.float64(), nullable=False),  # per op, mean over the group's ranks
        pa.field("time_min_us", pa.float64(), nullable=False),
        pa.field("time_max_us", pa.float64(), nullable=False),
        pa.field("algbw_gbps", pa.float64(), nullable=False),  # S / time
        pa.field("busbw_gbps", pa.float64(), nullable=False),  # algbw x nccl-tests factor
        pa.field("wrong", pa.int64(), nullable=False),  # elements differing from the expected result
        pa.field("hosts", pa.string(), nullable=False),
        pa.field("peak_gbps", pa.float64()),  # the topology's figure for this scope; null = unknown
        pa.field("fraction_of_peak", pa.float64()),
    ]
)
"""One row per (op, scope, group, placement, dtype, size): `tierzero bench` results, written by rank 0."""

EXPERTS = pa.schema(
    [
        pa.field("time", TIME, nullable=False),
        pa.field("step", pa.int64(), nullable=False),
        pa.field("layer", pa.int32(), nullable=False),  # index among the model's MoE layers
        pa.field("expert", pa.int32(), nullable=False),
        pa.field("tokens", pa.int64(), nullable=False),  # assignments routed to it in the step, every rank
        pa.field("dropped_fraction", pa.float64(), nullable=False),  # of the layer's assignments, for capacity
        pa.field("aux_loss", pa.float64(), nullable=False),  # the layer's weighted aux + z loss, mean per micro-batch
        pa.field("z_loss", pa.float64(), nullable=False),  # the layer's unweighted router z-loss, mean
        pa.field("bias", pa.float64(), nullable=False),  # auxiliary-loss-free selection bias after the step
        # the layer's kept assignments whose expert is on another node than the rank routing them
        pa.field("cross_node_fraction", pa.float64(), nullable=True),
        # rows dispatch sent across nodes for them, every rank (flat: one per assignment;
        # moe.dispatch=hierarchical: one per token and destination node)
        pa.field("cross_node_rows", pa.int64(), nullable=True),
    ]
)
"""One row per (step, MoE layer, expert), written by rank 0 from routing summed over every rank."""

EVAL = pa.schema(
    [
        pa.field("time", TIME, nullable=False),
        pa.field("step", pa.int64(), nullable=False),  # the optimizer step evaluated after
        pa.field("loss", pa.float64(), nullable=False),  # mean held-out cross-entropy over every rank, nats
        pa.field("tokens", pa.int64(), nullable=False),  # held-out target tokens evaluated, all ranks together
        pa.field("eval_time_s", pa.float64()),  # wall time of the evaluation on the recording rank
    ]
)
"""One row per evaluation (train.eval_every), written by rank 0 from the loss averaged over every rank."""

TABLES: dict[str, pa.Schema] = {"steps": STEPS, "events": EVENTS, "nodes": NODES, "comm": COMM,
                                "collectives": COLLECTIVES, "experts": EXPERTS, "eval": EVAL}


class RowContext(Protocol):
    """What a derivation may ask of the process recording the row (sink.Telemetry is one)."""

    @property
    def peak_tflops(self) -> float:
        """This rank's device peak, the MFU denominator (may be measured on first use)."""

    def rss_bytes(self) -> int:
        """Resident memory of the recording process."""


Derivation = Callable[[dict, RowContext], Any]
"""fn(row, context) -> the column's value, or None to leave it null."""


def _step_rss_bytes(row: dict, context: RowContext) -> int:
    return context.rss_bytes()


def _step_tokens_per_s(row: dict, context: RowContext) -> Optional[float]:
    tokens, step_time_s = row.get("tokens"), row.get("step_time_s")
    return float(tokens) / float(step_time_s) if tokens is not None and step_time_s else None


def _step_mfu(row: dict, context: RowContext) -> Optional[float]:
    tflops = row.get("tflops")
    return None if tflops is None else float(tflops) / context.peak_tflops


DERIVED: dict[str, dict[str, Derivation]] = {
    "steps": {"mem_rss_bytes": _step_rss_bytes, "tokens_per_s": _step_tokens_per_s, "mfu": _step_mfu},
}
"""Per table, the nullable columns Telemetry.record() computes, in this order, when a row leaves them None.

Derivations run only when telemetry is enabled, after the row has passed the column check.
"""

PARTITION = pa.schema([("run", pa.string()), ("attempt", pa.int32()), ("rank", pa.int32())])
"""Types of the Hive partition keys, in path order."""

# A run name becomes a path segment that readers parse back: no separators, no '=',
# and no leading '.' or '_' (pyarrow skips such names as hidden).
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def table_path(root: str, table: str, run: str, attempt: int, rank: int) -> str:
    """The folder that holds one rank's files of one table: `<root>/<table>/run=../attempt=../rank=..`."""
    if table not in TABLES:
        raise ValueError(f"unknown telemetry table {table!r}; choose one of {sorted(TABLES)}")
    if not isinstance(run, str) or not _RUN_NAME.match(run):
        raise ValueError(
            f"run name {run!r} cannot be a Hive partition value; use letters, digits and . _ + - "
            "starting with a letter or digit, e.g. moe_tiny-2024-06-01"
        )
    for key, value in (("attempt", attempt), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}={value!r} must be an integer")
    if attempt < 0 or rank < -1:
        raise ValueError(f"attempt={attempt}, rank={rank}: attempt must be >= 0 and rank >= -1 (-1 = the launcher)")
    return f"{root.rstrip('/')}/{table}/run={run}/attempt={attempt}/rank={rank}"


def telemetry_root(run_dir: str, dir: Optional[str] = None) -> str:
    """Where a run's telemetry lives: telemetry.dir when set, else `<run_dir>/telemetry`."""
    return dir if dir else f"{run_dir.rstrip('/')}/telemetry"
