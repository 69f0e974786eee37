"""Crash-safe Parquet sinks: one buffered writer per table, and the per-rank facade.

The training loop only appends to a list under a lock; a daemon thread turns the list
into one new Parquet file per flush. A file is written under a hidden temporary name
and renamed into place, so every `*.parquet` file is complete at every moment and a
rank killed with SIGKILL loses only the rows of the current flush period.
"""

from __future__ import annotations

import atexit
import datetime
import difflib
import logging
import os
import re
import threading
from typing import Any, Callable, Optional

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from tierzero.telemetry import schema as telemetry_schema
from tierzero.telemetry.config import TelemetryConfig
from tierzero.telemetry.nodes import NodeSampler
from tierzero.telemetry.schema import table_path

logger = logging.getLogger(__name__)

_PART_NAME = re.compile(r"^part-(\d+)\.parquet$")

# On object stores an upload becomes visible only when it completes, so writing the
# final name directly is already atomic, and a rename there would be a second full copy.
_OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "az", "adl"})

# Events that usually precede the death of the process: written at once, not at the next flush.
_URGENT_EVENT_KINDS = frozenset({"error", "signal"})


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _converter(type_: pa.DataType) -> Callable[[Any], Any]:
    # Coercing on append turns numpy scalars and 0-d tensors into plain numbers, and
    # makes a bad value fail at the caller instead of later in the flush thread.
    if pa.types.is_floating(type_):
        return float
    if pa.types.is_integer(type_):
        return int
    if pa.types.is_string(type_):
        return str
    return lambda value: value


class _Columns:
    """One table's columns, precomputed from its schema: checking a row is a set difference and a few look-ups."""

    __slots__ = ("table", "schema", "_names", "_required", "_convert", "_has_time")

    def __init__(self, table: str, schema: pa.Schema):
        self.table = table
        self.schema = schema
        self._names = frozenset(schema.names)
        self._required = tuple(f.name for f in schema if not f.nullable and f.name != "time")
        self._convert = {f.name: _converter(f.type) for f in schema}
        self._has_time = "time" in self._names

    def check(self, row: dict) -> None:
        """ValueError naming the table, the bad column(s) and the valid ones, for an unknown or missing column."""
        unknown = row.keys() - self._names
        if unknown:
            hints = [f"{name!r} -> {close[0]!r}" for name in sorted(unknown)
                     if (close := difflib.get_close_matches(name, self.schema.names, n=1))]
            hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
            raise ValueError(
                f"unknown {self.table} column(s) {sorted(unknown)}{hint}; {self.table} columns are "
                f"{self.schema.names} (telemetry/schema.py)"
            )
        missing = [name for name in self._required if row.get(name) is None]
        if missing:
            raise ValueError(
                f"{self.table} row lacks required column(s) {missing}; give every one of {list(self._required)} "
                f"(time is filled in); {self.table} columns are {self.schema.names}"
            )

    def coerce(self, row: dict) -> dict:
        """A checked row converted to the column types, with `time` set to now when not given."""
        converted = {k: (None if v is None else self._convert[k](v)) for k, v in row.items()}
        if self._has_time and converted.get("time") is None:
            converted["time"] = _now()
        return converted


class TableWriter:
    """Buffers rows of one table for one partition and flushes them as new Parquet files.

    `partition` is the ordered Hive partition, {"run": ..., "attempt": ..., "rank": ...}.
    Files land in `<root>/<table>/run=<run>/attempt=<a>/rank=<r>/part-00012.parquet`,
    numbered after the highest part already in that folder. Nothing is created before
    the first non-empty flush.
    """

    def __init__(self, root: str, table: str, schema: pa.Schema, partition: dict, flush_every_s: float):
        if not flush_every_s > 0:
            raise ValueError(f"telemetry.flush_every_s={flush_every_s} must be > 0; set e.g. telemetry.flush_every_s=10")
        self.table = table
        self.schema = schema
        self.flush_every_s = flush_every_s
        self._fs, root_path = fsspec.core.url_to_fs(root)
        self.dir = table_path(root_path, table, **partition)
        protocols = self._fs.protocol if isinstance(self._fs.protocol, tuple) else (self._fs.protocol,)
        self._direct_put = bool(_OBJECT_STORES.intersection(protocols))
        self._columns = _Columns(table, schema)
        # Re-entrant: a signal handler may append or flush while the main thread holds a lock.
        self._rows_lock = threading.RLock()
        self._flush_lock = threading.RLock()
        self._rows: list[dict] = []
        self._next_part: Optional[int] = None
        self._pid = os.getpid()
        self._closed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"telemetry-{table}", daemon=True)
        self._thread.start()
        # A process that exits normally without close() still writes its last rows.
        atexit.register(self.close)

    def append(self, row: dict) -> None:
        """Check and buffer one row (a list append under a lock; never touches storage)."""
        self._columns.check(row)
        self._append_checked(row)

    def _append_checked(self, row: dict) -> None:
        # Telemetry.record() has checked the row already, before deriving columns.
        if self._closed:
            raise RuntimeError(f"append to the closed {self.table} writer of {self.dir}")
        converted = self._columns.coerce(row)
        with self._rows_lock:
            self._rows.append(converted)

    def flush(self) -> Optional[str]:
        """Write the buffered rows as one new file; returns its path, or None when nothing was buffered."""
        if os.getpid() != self._pid:  # a forked child (data-loader worker) owns none of these rows
            return None
        with self._flush_lock:
            with self._rows_lock:
                rows, self._rows = self._rows, []
            if not rows:
                return None
            try:
                return self._write(rows)
            except BaseException:
                with self._rows_lock:  # keep them for the next try, in order
                    self._rows[:0] = rows
                raise

    def close(self) -> None:
        """Stop the flush thread and write what is buffered. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_every_s):
            try:
                self.flush()
            except Exception:  # storage hiccup: rows stay buffered for the next period
                logger.warning("telemetry flush to %s failed; retrying in %ss", self.dir, self.flush_every_s, exc_info=True)

    def _write(self, rows: list[dict]) -> str:
        table = pa.Table.from_pylist(rows, schema=self.schema)
        if self._next_part is None:
            self._fs.makedirs(self.dir, exist_ok=True)
            self._next_part = self._highest_part() + 1
        name = f"part-{self._next_part:05d}.parquet"
        final = f"{self.dir}/{name}"
        if self._direct_put:
            with self._fs.open(final, "wb") as f:
                pq.write_table(table, f)
        else:
            # Hidden name (leading '.', no .parquet suffix): every reader and glob skips it.
            tmp = f"{self.dir}/.{name}.tmp"
            with self._fs.open(tmp, "wb") as f:
                pq.write_table(table, f)
            self._fs.mv(tmp, final)
        self._next_part += 1
        return final

    def _highest_part(self) -> int:
        highest = -1
        for path in self._fs.ls(self.dir, detail=False):
            match = _PART_NAME.match(path.rstrip("/").rsplit("/", 1)[-1])
            if match:
                highest = max(highest, int(match.group(1)))
        return highest


class Telemetry:
    """One rank's telemetry: rows of any table in schema.TABLES, events, and (on one rank per node) node samples.

    `root` is the resolved telemetry root (see schema.telemetry_root). Rank -1 is the
    launcher/supervisor. With cfg.enabled false nothing is written or created, but record()
    still checks every row, so a misspelt column fails in a run with telemetry off too.
    `peak_tflops` is the recipe's measured device peak, used when telemetry.peak_tflops is
    unset; without either, the CPU matmul peak is measured once, when first needed.
    The tables and their derived columns are read from schema.py when this is constructed.
    """

    def __init__(
        self,
        cfg: TelemetryConfig,
        root: str,
        run: str,
        attempt: int,
        rank: int,
        host: str,
        *,
        peak_tflops: Optional[float] = None,
    ):
        self.cfg = cfg
        self.root = root
        self.run = run
        self.attempt = attempt
        self.rank = rank
        self.host = host
        self._peak_tflops = cfg.peak_tflops if cfg.peak_tflops is not None else peak_tflops
        self._columns = {name: _Columns(name, schema) for name, schema in telemetry_schema.TABLES.items()}
        self._derived = {name: tuple(derived.items()) for name, derived in telemetry_schema.DERIVED.items()}
        self._writers: dict[str, TableWriter] = {}
        self._writers_lock = threading.RLock()  # re-entrant for signal handlers
        self._sampler: Optional[NodeSampler] = None
        self._process = None
        self._closed = False
        if cfg.enabled:
            errors = cfg.errors()
            if errors:
                raise ValueError("; ".join(errors))
            table_path(root, "steps", run, attempt, rank)  # validates the partition values now

    @property
    def peak_tflops(self) -> float:
        """MFU denominator: telemetry.peak_tflops, else the recipe's, else the CPU matmul peak (measured once)."""
        if self._peak_tflops is None:
            from tierzero.telemetry.peak import measure_matmul_tflops

            self._peak_tflops = measure_matmul_tflops()
            logger.debug("measured CPU matmul peak %.3f TFLOP/s for MFU", self._peak_tflops)
        return self._peak_tflops

    def rss_bytes(self) -> int:
        """Resident memory of this process (schema.DERIVED's steps.mem_rss_bytes asks for it)."""
        if self._process is None:
            import psutil

            self._process = psutil.Process()
        return self._process.memory_info().rss

    def record(self, table: str, /, **row: Any) -> None:
        """Append one row to `table`, checked against schema.TABLES[table] now; never touches storage.

        An unknown table, a column the schema lacks, or a missing non-nullable column other
        than `time` (filled in with now) is a ValueError naming the table and the valid
        columns. Columns of schema.DERIVED[table] left None are then computed. Values may be
        Python numbers, numpy scalars or 0-d tensors: they are coerced to the column type.
        """
        columns = self._columns.get(table)
        if columns is None:
            raise ValueError(
                f"unknown telemetry table {table!r}; choose one of {sorted(self._columns)} "
                "(a new table is added to TABLES in telemetry/schema.py)"
            )
        columns.check(row)
        if not self.cfg.enabled or self._dropped(table):
            return
        for column, derive in self._derived.get(table, ()):
            if row.get(column) is None:
                row[column] = derive(row, self)
        self._writer(table)._append_checked(row)

    def event(self, kind: str, detail: str = "", step: Optional[int] = None, *, flush: Optional[bool] = None) -> None:
        """Record one event row with this host; error and signal events (or flush=True) are written at once."""
        self.record("events", step=step, kind=kind, detail=detail, host=self.host)
        writer = self._writers.get("events")
        if writer is not None and (flush or (flush is None and kind in _URGENT_EVENT_KINDS)):
            try:
                writer.flush()
            except Exception:  # the caller is likely handling a failure already
                logger.warning("could not write the %s event to %s", kind, writer.dir, exc_info=True)

    def start_node_sampler(self) -> None:
        """Sample this node every telemetry.node_sample_every_s (call on one rank per node)."""
        if not self.cfg.enabled or self._dropped("start_node_sampler") or self._sampler is not None:
            return
        self._sampler = NodeSampler(self.host, self.cfg.node_sample_every_s, self._writer("nodes").append)
        self._sampler.start()

    def flush(self) -> None:
        """Write every buffered row now."""
        for writer in list(self._writers.values()):
            writer.flush()

    def close(self) -> None:
        """Stop the node sampler (after a last sample) and flush every table; emits no event. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._sampler is not None:
            self._sampler.stop()
        for writer in list(self._writers.values()):
            writer.close()

    def __enter__(self) -> "Telemetry":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _dropped(self, what: str) -> bool:
        if self._closed:
            logger.warning("telemetry %s after close() dropped (run=%s rank=%s)", what, self.run, self.rank)
        return self._closed

    def _writer(self, table: str) -> TableWriter:
        with self._writers_lock:
            writer = self._writers.get(table)
            if writer is None:
                partition = {"run": self.run, "attempt": self.attempt, "rank": self.rank}
                writer = TableWriter(self.root, table, self._columns[table].schema, partition, self.cfg.flush_every_s)
                self._writers[table] = writer
            return writer
