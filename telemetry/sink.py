"""Crash-safe Parquet sinks: one buffered writer per table, and the per-rank facade.

The training loop only appends to a list under a lock; a daemon thread turns the list
into one new Parquet file per flush. A file is written under a hidden temporary name
and renamed into place, so every `*.parquet` file is complete at every moment and a
rank killed with SIGKILL loses only the rows of the current flush period.

Telemetry never stops training: a flush that cannot reach storage (disk full, permission
denied, a read-only folder, an unreachable URL) keeps its rows for the next flush, at most
`max_pending_rows` of them (the oldest are dropped beyond that), and says so once per table.
"""

from __future__ import annotations

import atexit
import datetime
import difflib
import errno
import logging
import os
import re
import secrets
import tempfile
import threading
from typing import Any, Callable, Optional

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

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

# Rows of one table kept in memory while its storage fails: a steps row is ~1 KB as a dict,
# so a few MB per table at most; beyond it the oldest rows are dropped (and counted).
MAX_PENDING_ROWS = 10_000

# os.link errors meaning "this filesystem has no hard links" (then a part is published by rename).
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK, errno.EXDEV})


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

    A storage failure never raises out of flush() or close(): the rows stay buffered for
    the next flush (at most `max_pending_rows`; beyond it the oldest are dropped, counted in
    `num_dropped`). The first failure is reported once: by `on_failure(writer, error)` when
    given (Telemetry), else as one warning naming the table, the folder and the error.
    After close(), `num_lost` is the number of rows never written; without on_failure,
    close() warns with it when it is not 0.
    """

    def __init__(self, root: str, table: str, schema: pa.Schema, partition: dict, flush_every_s: float, *,
                 max_pending_rows: int = MAX_PENDING_ROWS,
                 on_failure: Optional[Callable[["TableWriter", BaseException], None]] = None):
        if not flush_every_s > 0:
            raise ValueError(f"telemetry.flush_every_s={flush_every_s} must be > 0; set e.g. telemetry.flush_every_s=10")
        if max_pending_rows < 1:
            raise ValueError(f"max_pending_rows={max_pending_rows} must be >= 1")
        self.table = table
        self.schema = schema
        self.flush_every_s = flush_every_s
        self.max_pending_rows = max_pending_rows
        self._on_failure = on_failure
        self._root = root
        self._partition = partition
        # Connected at the first flush, not here (record() never touches storage); connecting may
        # itself fail (an unreachable ftp:// or s3:// endpoint): then the next flush tries again.
        self._fs = None
        self.dir = table_path(root, table, **partition)
        self._direct_put = False
        self._local = False
        self.error: Optional[str] = None  # the latest storage error, None once a flush succeeds again
        self.num_dropped = 0  # rows dropped beyond max_pending_rows while storage failed
        self.num_lost = 0  # set by close(): rows never written (dropped, or still unwritten at the end)
        self._warned = False
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
        """Write the buffered rows as one new file; returns its path, or None when nothing was written
        (nothing buffered, or the storage failed: then the rows stay buffered for the next flush)."""
        if os.getpid() != self._pid:  # a forked child (data-loader worker) owns none of these rows
            return None
        with self._flush_lock:
            with self._rows_lock:
                rows, self._rows = self._rows, []
            if not rows:
                return None
            try:
                # Rows were checked and coerced on append: a failure here is a bug, not storage.
                table = pa.Table.from_pylist(rows, schema=self.schema)
            except BaseException:
                self._keep(rows)
                raise
            try:
                path = self._write(table)
            except Exception as e:
                self._keep(rows)
                self._failed(e)
                return None
            except BaseException:  # KeyboardInterrupt, SystemExit from a signal handler: keep the rows, go on up
                self._keep(rows)
                raise
            self.error = None
            return path

    def close(self) -> None:
        """Stop the flush thread and write what is buffered (never raises for storage). Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        self.flush()
        with self._rows_lock:
            self.num_lost = self.num_dropped + len(self._rows)
            self._rows = []
        if self.num_lost and self._on_failure is None and os.getpid() == self._pid:
            logger.warning("telemetry: %d %s row(s) were never written to %s (%s)", self.num_lost, self.table,
                           self.dir, self.error or "storage failed earlier")

    def _run(self) -> None:
        while not self._stop.wait(self.flush_every_s):
            try:
                self.flush()
            except Exception:  # a bug (storage errors never leave flush): log it, keep the thread
                logger.exception("telemetry flush of %s to %s failed", self.table, self.dir)

    def _keep(self, rows: list[dict]) -> None:
        """Put unwritten rows back in front, in order, keeping at most max_pending_rows (the newest)."""
        with self._rows_lock:
            self._rows[:0] = rows
            excess = len(self._rows) - self.max_pending_rows
            if excess > 0:
                del self._rows[:excess]
                self.num_dropped += excess

    def _failed(self, error: BaseException) -> None:
        self.error = f"{type(error).__name__}: {error}"
        if self._warned:
            return
        self._warned = True
        if self._on_failure is None:
            logger.warning("telemetry: cannot write table %s to %s (%s); %s", self.table, self.dir, self.error,
                           self.keeping())
            return
        try:
            self._on_failure(self, error)
        except Exception:  # reporting a failure must not become one
            logger.debug("telemetry on_failure callback failed", exc_info=True)

    def keeping(self) -> str:
        """What happens to the rows while storage fails, for messages."""
        return (f"training goes on, the rows are kept for the next flush (at most {self.max_pending_rows} a table, "
                "then the oldest are dropped)")

    def _connect(self) -> None:
        fs, root_path = fsspec.core.url_to_fs(self._root)
        protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
        self._direct_put = bool(_OBJECT_STORES.intersection(protocols))
        self._local = isinstance(fs, LocalFileSystem)
        self.dir = table_path(root_path, self.table, **self._partition)
        self._fs = fs

    def _write(self, table: pa.Table) -> str:
        if self._fs is None:
            self._connect()
        if self._next_part is None:
            self._fs.makedirs(self.dir, exist_ok=True)
            self._next_part = self._highest_part() + 1
        if self._local:
            return self._write_local(table)
        name = f"part-{self._next_part:05d}.parquet"
        final = f"{self.dir}/{name}"
        if self._direct_put:
            with self._fs.open(final, "wb") as f:
                pq.write_table(table, f)
        else:
            # Hidden name (leading '.', no .parquet suffix): every reader and glob skips it.
            # Unpredictable, so nobody can plant something at it in advance.
            tmp = f"{self.dir}/.{name}.{secrets.token_hex(8)}.tmp"
            try:
                with self._fs.open(tmp, "wb") as f:
                    pq.write_table(table, f)
                self._fs.mv(tmp, final)
            except BaseException:
                _try(lambda: self._fs.rm(tmp))
                raise
        self._next_part += 1
        return final

    def _write_local(self, table: pa.Table) -> str:
        # mkstemp creates a new file (O_CREAT|O_EXCL, mode 0600) under a random hidden name (leading
        # '.', no .parquet suffix: every reader skips it): a symlink or file someone planted in the
        # folder is never followed or overwritten.
        fd, tmp = tempfile.mkstemp(prefix=f".part-{self._next_part:05d}.parquet.", suffix=".tmp", dir=self.dir)
        try:
            with os.fdopen(fd, "wb") as f:
                pq.write_table(table, f)
            os.chmod(tmp, 0o666 & ~_umask())  # what a plain open() would have given the part file
            final = self._publish(tmp)
        finally:
            _try(lambda: os.unlink(tmp))
        self._next_part += 1
        return final

    def _publish(self, tmp: str) -> str:
        """Give `tmp` the next free part name without replacing a part another writer of this
        partition put there since (a hard link fails on an existing name; rename would not)."""
        for _ in range(100):
            final = f"{self.dir}/part-{self._next_part:05d}.parquet"
            try:
                os.link(tmp, final)
                return final
            except FileExistsError:
                self._next_part = max(self._next_part, self._highest_part()) + 1
            except OSError as e:
                if e.errno not in _NO_HARD_LINKS:
                    raise
                os.replace(tmp, final)  # a filesystem without hard links: the plain rename
                return final
        raise FileExistsError(f"no free part name in {self.dir} after 100 tries")

    def _highest_part(self) -> int:
        highest = -1
        for path in self._fs.ls(self.dir, detail=False):
            match = _PART_NAME.match(path.rstrip("/").rsplit("/", 1)[-1])
            if match:
                highest = max(highest, int(match.group(1)))
        return highest


def _try(action: Callable[[], Any]) -> None:
    try:
        action()
    except Exception:  # cleanup after a failure already being reported
        pass


def _umask() -> int:
    """This process's umask, read without setting it (os.umask would race other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return 0o022


class Telemetry:
    """One rank's telemetry: rows of any table in schema.TABLES, events, and (on one rank per node) node samples.

    `root` is the resolved telemetry root (see schema.telemetry_root). Rank -1 is the
    launcher/supervisor. With cfg.enabled false nothing is written or created, but record()
    still checks every row, so a misspelt column fails in a run with telemetry off too.
    `peak_tflops` is the recipe's measured device peak, used when telemetry.peak_tflops is
    unset; without either, the CPU matmul peak is measured once, when first needed.
    The tables and their derived columns are read from schema.py when this is constructed.
    Storage failures never raise out of flush(), event() or close() (see TableWriter): each
    table's first one is a warning on stderr and, while events can still be written, a
    `warning` event naming the table, the folder and the error.
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
        self._warned: set = set()  # kinds of storage error already reported on stderr
        self._pid = os.getpid()
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
            except Exception:  # a bug, not storage; the caller is likely handling a failure already
                logger.warning("could not write the %s event to %s", kind, writer.dir, exc_info=True)

    def start_node_sampler(self) -> None:
        """Sample this node every telemetry.node_sample_every_s (call on one rank per node)."""
        if not self.cfg.enabled or self._dropped("start_node_sampler") or self._sampler is not None:
            return
        self._sampler = NodeSampler(self.host, self.cfg.node_sample_every_s, self._writer("nodes").append)
        self._sampler.start()

    def flush(self) -> None:
        """Write every buffered row now. A storage failure does not raise: the rows stay buffered (TableWriter)."""
        for writer in self._events_last():
            writer.flush()

    def close(self) -> None:
        """Stop the node sampler (after a last sample) and flush every table; emits no event. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._sampler is not None:
            self._sampler.stop()
        writers = self._events_last()
        for writer in writers:
            writer.close()
        lost = [writer for writer in writers if writer.num_lost]
        if lost and os.getpid() == self._pid:
            logger.warning("telemetry: rows never written to %s: %s (%s)", self.root,
                           ", ".join(f"{writer.num_lost} {writer.table}" for writer in lost),
                           "; ".join(sorted({writer.error or "storage failed earlier" for writer in lost})))

    def _events_last(self) -> list[TableWriter]:
        # events go last: a warning another table's failed flush just recorded is written with them
        with self._writers_lock:
            return sorted(self._writers.values(), key=lambda writer: writer.table == "events")

    def _storage_failed(self, failed: TableWriter, error: BaseException) -> None:
        """A table's first storage failure: one stderr warning per kind of error (a full disk fails
        every table alike) and, for a table other than events, a `warning` event, written when events can be."""
        message = f"telemetry: cannot write table {failed.table} to {failed.dir} ({failed.error}); {failed.keeping()}"
        kind = (type(error).__name__, getattr(error, "errno", None))
        with self._writers_lock:
            if kind not in self._warned:
                self._warned.add(kind)
                logger.warning("%s; other tables failing alike are not reported again", message)
            if failed.table == "events":  # the stderr warning is all there is
                return
            events = self._writers.get("events")
            if events is None and not self._closed:
                events = self._writer("events")
        if events is not None and not events._closed:
            events._append_checked({"kind": "warning", "host": self.host, "step": None, "detail": message})

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
                writer = TableWriter(self.root, table, self._columns[table].schema, partition, self.cfg.flush_every_s,
                                     on_failure=self._storage_failed)
                self._writers[table] = writer
            return writer
