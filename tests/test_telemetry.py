"""Telemetry: schema, Hive layout read by DuckDB/pandas/polars, crash safety, report."""

from __future__ import annotations

import ast
import datetime
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tierzero.telemetry import schema as telemetry_schema
from tierzero.telemetry.config import TelemetryConfig
from tierzero.telemetry.nodes import NodeSampler
from tierzero.telemetry.report import load_table, summarize, write_report
from tierzero.telemetry.schema import DERIVED, TABLES, TIME, table_path
from tierzero.telemetry.sink import TableWriter, Telemetry

REPO = Path(__file__).resolve().parents[1]
UTC = datetime.timezone.utc
PARTITION = {"run": "r1", "attempt": 0, "rank": 0}


def fast_cfg(**overrides) -> TelemetryConfig:
    return TelemetryConfig(**{"flush_every_s": 30.0, "peak_tflops": 1.0, **overrides})


def test_config_errors_name_the_dotted_key_and_a_fix():
    assert TelemetryConfig().errors() == []
    errors = TelemetryConfig(flush_every_s=0.0, node_sample_every_s=-1, peak_tflops=0.0, dir="").errors()
    assert "telemetry.flush_every_s=0 must be > 0; set e.g. telemetry.flush_every_s=10" in errors
    assert any(e.startswith("telemetry.node_sample_every_s=-1 must be > 0") for e in errors)
    assert any(e.startswith("telemetry.peak_tflops=0 must be > 0") for e in errors)
    assert any(e.startswith("telemetry.dir='' is empty") for e in errors)
    with pytest.raises(ValueError, match="telemetry.flush_every_s=0"):
        Telemetry(TelemetryConfig(flush_every_s=0.0), "/nowhere", "r1", 0, 0, "h")


def test_config_fields_have_docstrings():
    source = (REPO / "telemetry" / "config.py").read_text()
    body = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)).body
    fields = [i for i, n in enumerate(body) if isinstance(n, ast.AnnAssign)]
    assert len(fields) == 5
    for i in fields:
        assert isinstance(body[i + 1], ast.Expr) and isinstance(body[i + 1].value.value, str)


def test_table_path_is_hive_layout_and_rejects_bad_names():
    assert table_path("/x/", "steps", "r1", 2, -1) == "/x/steps/run=r1/attempt=2/rank=-1"
    with pytest.raises(ValueError, match="choose one of"):
        table_path("/x", "step", "r1", 0, 0)
    for bad in ("a/b", "a=b", ".hidden", ""):
        with pytest.raises(ValueError, match="run name"):
            table_path("/x", "steps", bad, 0, 0)


SAMPLE_ROWS = {
    "steps": {
        "time": datetime.datetime(2024, 6, 1, 12, 0, 0, 123456, tzinfo=UTC),
        "step": 3, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.7, "tokens": 4096, "step_time_s": 0.25,
        "tokens_per_s": 16384.0, "tflops": 12.5, "mfu": 0.4, "mem_rss_bytes": 1 << 30, "gpu_mem_bytes": None,
    },
    "events": {
        "time": datetime.datetime(2024, 6, 1, 12, 0, 1, tzinfo=UTC),
        "step": None, "kind": "restart", "detail": "rank 3 exited with -9", "host": "node-a", "stall_s": None,
    },
    "nodes": {
        "time": datetime.datetime(2024, 6, 1, 12, 0, 2, tzinfo=UTC),
        "host": "node-a", "cpu_percent": 55.5, "mem_used_bytes": 10, "mem_total_bytes": 20, "proc_rss_bytes": 5,
        "gpu_index": 1, "gpu_util_percent": 99.0, "gpu_mem_used_bytes": 7, "gpu_mem_total_bytes": 8,
        "gpu_power_w": 612.5, "gpu_temp_c": 71.0,
    },
    "comm": {
        "time": datetime.datetime(2024, 6, 1, 12, 0, 3, tzinfo=UTC),
        "step": 3, "phase": "bwd", "level": "cluster", "op": "reduce_scatter", "bytes": 1.5e6, "time_s": 0.01,
        "calls": 4, "wait_s": 0.002,
    },
    "collectives": {
        "time": datetime.datetime(2024, 6, 1, 12, 0, 4, tzinfo=UTC),
        "op": "all_gather", "scope": "cross:node", "group": 1, "ranks": "1,3", "placement": "out",
        "backend": "gloo", "dtype": "bfloat16", "size_bytes": 1 << 20, "count": 1 << 19, "nranks": 2,
        "time_us": 812.5, "time_min_us": 800.0, "time_max_us": 825.0, "algbw_gbps": 1.29, "busbw_gbps": 0.645,
        "wrong": 0, "hosts": "a/node0,a/node1", "peak_gbps": None, "fraction_of_peak": None,
    },
    "experts": {
        "time": datetime.datetime(2024, 6, 1, 12, 0, 5, tzinfo=UTC),
        "step": 7, "layer": 1, "expert": 5, "tokens": 130, "dropped_fraction": 0.0625, "aux_loss": 0.0101,
        "z_loss": 1.7, "bias": -0.002, "cross_node_fraction": 0.5, "cross_node_rows": 96,
    },
    "eval": {
        "time": datetime.datetime(2024, 6, 1, 12, 0, 6, tzinfo=UTC),
        "step": 50, "loss": 2.75, "tokens": 16384, "eval_time_s": 0.4,
    },
}


@pytest.mark.parametrize("table", sorted(TABLES))
def test_schema_round_trip(tmp_path, table):
    writer = TableWriter(str(tmp_path), table, TABLES[table], PARTITION, flush_every_s=30)
    writer.append(SAMPLE_ROWS[table])
    path = writer.flush()
    writer.close()
    assert path == f"{tmp_path}/{table}/run=r1/attempt=0/rank=0/part-00000.parquet"
    read = pq.read_table(path)
    assert read.schema.equals(TABLES[table])  # partition keys are not columns inside files
    assert read.to_pylist() == [SAMPLE_ROWS[table]]
    loaded = load_table(str(tmp_path), table).to_pylist()
    assert loaded == [{**SAMPLE_ROWS[table], **PARTITION}]


def test_append_rejects_unknown_and_missing_columns_and_coerces(tmp_path):
    writer = TableWriter(str(tmp_path), "steps", TABLES["steps"], PARTITION, flush_every_s=30)
    with pytest.raises(ValueError, match=r"unknown steps column\(s\) \['los'\]"):
        writer.append({"step": 1, "los": 2.0})
    with pytest.raises(ValueError, match=r"lacks required column\(s\) \['step'\]"):
        writer.append({"loss": 2.0})
    writer.append({"step": True + 1, "loss": 2, "tokens": 3.0})  # coerced to the column types
    writer.close()
    (row,) = load_table(str(tmp_path), "steps").to_pylist()
    assert (row["step"], row["loss"], row["tokens"], row["grad_norm"]) == (2, 2.0, 3, None)
    assert row["time"] is not None


def sample_value(field: pa.Field, i: int):
    """A value of the field's type that Parquet gives back unchanged; row i differs from row j."""
    if pa.types.is_timestamp(field.type):
        return datetime.datetime(2024, 6, 1, 12, 0, i, tzinfo=UTC)
    if pa.types.is_integer(field.type):
        return 7 + i
    if pa.types.is_floating(field.type):
        return 0.5 + i
    if pa.types.is_string(field.type):
        return f"{field.name}-{i}"
    raise AssertionError(f"no sample value for {field.name}: {field.type}; teach sample_value() this type")


def record_and_read(root: str, table: str, rows: list[dict]) -> list[dict]:
    with Telemetry(fast_cfg(), root, "r1", 0, 0, "h") as tel:
        for row in rows:
            tel.record(table, **row)
    return load_table(root, table).to_pylist()


@pytest.mark.parametrize("table", sorted(TABLES))
def test_record_round_trips_every_table(tmp_path, table):
    """Driven by the schema alone: a table added to TABLES is covered without editing this test."""
    schema = TABLES[table]
    full = {f.name: sample_value(f, 1) for f in schema}
    required = {f.name: sample_value(f, 2) for f in schema if not f.nullable and f.name != "time"}
    got_full, got_required = record_and_read(str(tmp_path), table, [full, required])
    assert got_full == {**full, **PARTITION}
    assert got_required["time"] is not None  # filled in by record()
    for name in schema.names:
        if name in required:
            assert got_required[name] == required[name]
        elif name != "time" and name not in DERIVED.get(table, {}):
            assert got_required[name] is None, f"{table}.{name} was not given but reads back {got_required[name]!r}"


@pytest.mark.parametrize("enabled", [True, False])
def test_record_rejects_unknown_table_unknown_column_and_missing_required(tmp_path, enabled):
    root = tmp_path / "t"
    with Telemetry(fast_cfg(enabled=enabled), str(root), "r1", 0, 0, "h") as tel:
        with pytest.raises(ValueError) as e:
            tel.record("step", step=1)
        assert "unknown telemetry table 'step'" in str(e.value) and str(sorted(TABLES)) in str(e.value)

        with pytest.raises(ValueError) as e:
            tel.record("comm", step=1, phase="fwd", level="node", op="all_gather", bytes=1.0, time_s=0.1, calls=1,
                       byte=2.0, colls=3)
        message = str(e.value)
        assert "unknown comm column(s) ['byte', 'colls']" in message
        assert "'byte' -> 'bytes'" in message and "'colls' -> 'calls'" in message  # the likely fix
        assert str(TABLES["comm"].names) in message  # every valid column

        with pytest.raises(ValueError) as e:
            tel.record("experts", step=1, layer=0, expert=2, tokens=5, dropped_fraction=0.0, aux_loss=None)
        message = str(e.value)
        assert "experts row lacks required column(s) ['aux_loss', 'z_loss', 'bias']" in message
        assert str(TABLES["experts"].names) in message
        # time is never required of the caller: record() fills it in.
        assert "give every one of ['step', 'layer', 'expert', 'tokens', 'dropped_fraction', 'aux_loss', " in message

        with pytest.raises(ValueError, match=r"events row lacks required column\(s\) \['kind'\]"):
            tel.event(None)
        with pytest.raises(TypeError):  # the table name is positional only, so no column can clash with it
            tel.record(table="steps", step=1)
    assert not (root / "comm").exists() and not (root / "experts").exists()  # a rejected row writes nothing


def test_a_table_added_to_schema_py_needs_no_other_change(tmp_path, monkeypatch):
    widgets = pa.schema(
        [
            pa.field("time", TIME, nullable=False),
            pa.field("widget", pa.string(), nullable=False),
            pa.field("count", pa.int64(), nullable=False),
            pa.field("area_m2", pa.float64()),
            pa.field("count_per_m2", pa.float64()),
        ]
    )

    def count_per_m2(row, context):
        return row["count"] / row["area_m2"] if row.get("area_m2") else None

    monkeypatch.setattr(telemetry_schema, "TABLES", {**TABLES, "widgets": widgets})
    monkeypatch.setattr(telemetry_schema, "DERIVED", {**DERIVED, "widgets": {"count_per_m2": count_per_m2}})
    root = str(tmp_path)
    with Telemetry(fast_cfg(), root, "r1", 0, 0, "h") as tel:
        tel.record("widgets", widget="a", count=3, area_m2=1.5)
        tel.record("widgets", widget="b", count=4.0)  # coerced to int64
        with pytest.raises(ValueError, match=r"unknown widgets column\(s\) \['cont'\]"):
            tel.record("widgets", widget="c", cont=1)
        tel.record("steps", step=1)  # the existing tables still work
    rows = load_table(root, "widgets").to_pylist()
    assert [(r["widget"], r["count"], r["area_m2"], r["count_per_m2"]) for r in rows] == [
        ("a", 3, 1.5, 2.0), ("b", 4, None, None),
    ]
    assert all(r["time"] is not None and (r["run"], r["attempt"], r["rank"]) == ("r1", 0, 0) for r in rows)
    (path,) = Path(table_path(root, "widgets", "r1", 0, 0)).glob("*.parquet")
    assert pq.read_table(path).schema.equals(widgets)
    assert load_table(root, "steps").num_rows == 1


def test_error_events_are_written_at_once(tmp_path):
    with Telemetry(fast_cfg(), str(tmp_path), "r1", 0, 0, "node-a") as tel:
        tel.event("start")
        tel.event("error", "boom", step=3)  # flushes the start event with it
        (event_start, event_error) = load_table(str(tmp_path), "events").to_pylist()
        tel.event("checkpoint", "step 4", step=4)
        assert load_table(str(tmp_path), "events").num_rows == 2  # buffered until the next flush
    assert (event_error["kind"], event_error["detail"], event_error["step"], event_error["host"]) == (
        "error", "boom", 3, "node-a",
    )
    assert event_start["kind"] == "start" and event_start["step"] is None
    assert load_table(str(tmp_path), "events").num_rows == 3


def test_part_numbers_continue_after_existing_files(tmp_path):
    folder = Path(table_path(str(tmp_path), "events", "r1", 0, 0))
    folder.mkdir(parents=True)
    writer = TableWriter(str(tmp_path), "events", TABLES["events"], PARTITION, flush_every_s=30)
    writer.append(SAMPLE_ROWS["events"])
    pq.write_table(pq.read_table(writer.flush()), folder / "part-00011.parquet")  # as if an earlier writer left it
    writer.close()
    writer = TableWriter(str(tmp_path), "events", TABLES["events"], PARTITION, flush_every_s=30)
    writer.append(SAMPLE_ROWS["events"])
    assert writer.flush().endswith("/part-00012.parquet")
    assert writer.flush() is None  # nothing buffered: no empty file
    writer.close()
    assert sorted(p.name for p in folder.iterdir()) == ["part-00000.parquet", "part-00011.parquet", "part-00012.parquet"]


def write_two_ranks_two_attempts(root: str, steps_per_attempt: int = 6) -> None:
    for attempt in (0, 1):
        for rank in (0, 1):
            with Telemetry(fast_cfg(), root, "r1", attempt, rank, f"host{rank}") as tel:
                tel.event("start")
                for step in range(steps_per_attempt):
                    tel.record("steps", step=step, loss=1.0 / (step + 1), tokens=128, step_time_s=0.5)
                    if step == 2:
                        tel.flush()  # more than one part per folder


def test_duckdb_pandas_polars_read_partition_columns(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    pd = pytest.importorskip("pandas")
    pl = pytest.importorskip("polars")
    root = str(tmp_path / "telemetry")
    write_two_ranks_two_attempts(root)
    # What a SIGKILL in the middle of a flush leaves behind: every reader must skip it.
    Path(table_path(root, "steps", "r1", 1, 1), ".part-00002.parquet.tmp").write_bytes(b"PAR1 torn")
    expected = {(a, r): 6 for a in (0, 1) for r in (0, 1)}

    got = duckdb.sql(
        f"select attempt, rank, count(*) as n, min(run) as run from read_parquet('{root}/steps/**/*.parquet', "
        "hive_partitioning=1) group by attempt, rank"
    ).fetchall()
    assert {(a, r): n for a, r, n, _ in got} == expected
    assert {run for *_, run in got} == {"r1"}

    frame = pd.read_parquet(f"{root}/steps")
    assert len(frame) == 24
    counts = frame.groupby([frame["attempt"].astype(int), frame["rank"].astype(int)], observed=True).size()
    assert counts.to_dict() == expected
    assert set(frame["run"].astype(str)) == {"r1"}

    lazy = pl.scan_parquet(f"{root}/steps/**/*.parquet", hive_partitioning=True)
    counts = lazy.group_by("attempt", "rank").len().collect()
    assert {(a, r): n for a, r, n in counts.iter_rows()} == expected
    events = pl.scan_parquet(f"{root}/events/**/*.parquet", hive_partitioning=True).collect()
    assert events.height == 4 and set(events["kind"]) == {"start"}
    assert load_table(root, "steps").num_rows == 24


def test_memory_url(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    root = "memory://tierzero-test/telemetry"
    with Telemetry(fast_cfg(), root, "mem", 0, -1, "launcher-host") as tel:
        tel.event("restart", "rank 1 died", step=7)
        tel.record("steps", step=1, loss=3.0)
    fs = fsspec.filesystem("memory")
    assert fs.ls("/tierzero-test/telemetry/events/run=mem/attempt=0/rank=-1", detail=False)
    (event,) = load_table(root, "events").to_pylist()
    assert (event["kind"], event["detail"], event["step"], event["rank"], event["host"]) == (
        "restart", "rank 1 died", 7, -1, "launcher-host",
    )
    assert load_table(root, "steps").num_rows == 1
    fs.rm("/tierzero-test", recursive=True)


def test_disabled_telemetry_creates_nothing(tmp_path):
    tel = Telemetry(TelemetryConfig(enabled=False, flush_every_s=0.01), str(tmp_path / "t"), "r1", 0, 0, "h")
    tel.start_node_sampler()
    tel.event("start")
    tel.record("steps", step=1, loss=1.0)
    with pytest.raises(ValueError, match=r"unknown steps column\(s\) \['los'\]"):
        tel.record("steps", step=1, los=1.0)  # checked even with telemetry off
    tel.close()
    assert list(tmp_path.iterdir()) == []


def test_record_derives_step_throughput_mfu_and_rss(tmp_path):
    given = dict(step=1, tokens=1000, step_time_s=0.5, tflops=10.0)
    with Telemetry(fast_cfg(peak_tflops=50.0), str(tmp_path), "r1", 0, 0, "h") as tel:
        tel.record("steps", **given)
        tel.record("steps", step=2, tokens=1000, step_time_s=0.5, tokens_per_s=7.0, mfu=0.5, mem_rss_bytes=3)
    assert given == dict(step=1, tokens=1000, step_time_s=0.5, tflops=10.0)  # the caller's dict is untouched
    row, explicit = load_table(str(tmp_path), "steps").to_pylist()
    assert row["tokens_per_s"] == 2000.0
    assert row["mfu"] == pytest.approx(0.2)
    assert row["mem_rss_bytes"] > 0
    assert (explicit["tokens_per_s"], explicit["mfu"], explicit["mem_rss_bytes"]) == (7.0, 0.5, 3)  # given wins


def test_derived_columns_are_nullable_columns_of_their_table():
    # record() checks the caller's row before deriving, so a derived column must be allowed to be absent.
    for table, derived in DERIVED.items():
        assert table in TABLES, f"DERIVED names unknown table {table!r}"
        for column in derived:
            assert TABLES[table].field(column).nullable, f"{table}.{column} is derived but not nullable"


def test_node_sampler_rows(tmp_path):
    with Telemetry(fast_cfg(node_sample_every_s=0.05), str(tmp_path), "r1", 0, 0, "node-a") as tel:
        tel.start_node_sampler()
        time.sleep(0.3)
    rows = load_table(str(tmp_path), "nodes").to_pylist()
    assert len(rows) >= 2
    for row in rows:
        assert row["host"] == "node-a" and row["mem_total_bytes"] >= row["mem_used_bytes"] > 0
        assert row["proc_rss_bytes"] > 0 and 0 <= row["cpu_percent"] <= 100
        # Without a driver (CI) every GPU column is null; with one, gpu_index is set.
        if row["gpu_index"] is None:
            assert row["gpu_mem_total_bytes"] is None and row["gpu_power_w"] is None


def test_node_sampler_survives_a_missing_nvml(monkeypatch):
    pynvml = pytest.importorskip("pynvml")

    def no_driver():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_driver)
    rows = []
    sampler = NodeSampler("h", 10.0, rows.append)
    sampler.start()
    sampler.stop()  # one last sample on stop
    assert len(rows) == 1 and rows[0]["gpu_index"] is None and "cpu_percent" in rows[0]


CRASHING_WRITER = textwrap.dedent(
    """
    import sys, time
    from tierzero.telemetry.schema import STEPS
    from tierzero.telemetry.sink import TableWriter
    writer = TableWriter(sys.argv[1], "steps", STEPS, {"run": "crash", "attempt": 0, "rank": 0}, 0.2)
    print("ready", flush=True)
    step = 0
    while True:
        writer.append({"step": step, "loss": float(step)})
        step += 1
        time.sleep(0.0002)
    """
)


def test_sigkill_leaves_only_valid_files_holding_a_prefix(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHING_WRITER, str(tmp_path)], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        # ~1.5 s of appends, longer on a loaded machine until two flushes have landed.
        start = time.monotonic()
        while time.monotonic() - start < 1.5 or len(list(tmp_path.rglob("*.parquet"))) < 2:
            assert time.monotonic() - start < 60, "the writer made fewer than 2 files in 60 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    files = sorted(tmp_path.rglob("*.parquet"))
    assert len(files) >= 2
    steps = []
    for path in files:  # every visible file is complete; part order is append order
        table = pq.read_table(path)
        assert table.schema.equals(TABLES["steps"])
        steps += table.column("step").to_pylist()
    assert steps == list(range(len(steps))) and len(steps) > 1


def synthetic_run(run_dir: Path) -> list[dict]:
    """Two ranks; attempt 0 logs steps 1..6, dies; attempt 1 resumes from step 4 and logs 5..8."""
    root = str(run_dir / "telemetry")
    rows = []
    for attempt, steps in ((0, range(1, 7)), (1, range(5, 9))):
        for rank in (0, 1):
            with Telemetry(fast_cfg(), root, "synth", attempt, rank, f"h{rank}") as tel:
                tel.event("start")
                for step in steps:
                    row = dict(
                        step=step, loss=10.0 - step + 0.1 * attempt + 0.01 * rank, tokens=100 * (rank + 1),
                        step_time_s=0.1 * step + attempt, tokens_per_s=1000.0 * step + 10 * rank + attempt,
                        mfu=0.01 * step + 0.001 * rank,
                    )
                    tel.record("steps", **row)
                    rows.append({**row, "attempt": attempt, "rank": rank})
                if attempt == 0 and rank == 1:
                    tel.event("error", "killed", step=6)
    with Telemetry(fast_cfg(), root, "synth", 1, -1, "launcher") as tel:
        tel.event("restart", "from step 4", step=4)
    return rows


def test_report_numbers_match_the_written_rows(tmp_path):
    run_dir = tmp_path / "run"
    rows = synthetic_run(run_dir)
    latest = {s: max(r["attempt"] for r in rows if r["step"] == s) for s in {r["step"] for r in rows}}
    kept = [r for r in rows if r["attempt"] == latest[r["step"]]]
    rank0 = sorted((r for r in kept if r["rank"] == 0), key=lambda r: r["step"])
    per_step = [sum(r["tokens_per_s"] for r in kept if r["step"] == s) for s in sorted(latest)]

    summary = summarize(str(run_dir))
    assert summary.runs == ("synth",) and summary.attempts == (0, 1) and summary.ranks == (-1, 0, 1)
    assert summary.num_step_rows == len(rows) == 20
    assert summary.last_step == 8
    assert summary.loss_rank == 0
    assert summary.first_loss == rank0[0]["loss"] and summary.last_loss == rank0[-1]["loss"]
    assert summary.median_tokens_per_s == pytest.approx(statistics.median(per_step))
    assert summary.median_step_time_s == pytest.approx(statistics.median(r["step_time_s"] for r in kept))
    assert summary.median_mfu == pytest.approx(statistics.median(r["mfu"] for r in kept))
    assert summary.event_counts == {"error": 1, "restart": 1, "start": 4}
    assert summary.last_events[-1]["kind"] == "restart"

    text = write_report(str(run_dir))
    for name in ("loss.png", "throughput.png"):
        png = run_dir / "report" / name
        assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
        assert str(png) in text
    assert "last step 8" in text and "restart=1" in text


def test_report_reads_telemetry_dir_from_config_yaml(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    with Telemetry(fast_cfg(), str(elsewhere), "r1", 0, 0, "h") as tel:
        tel.record("steps", step=3, loss=1.5)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(f"run:\n  name: r1\ntelemetry:\n  dir: {elsewhere}\n  enabled: true\n")
    summary = summarize(str(run_dir))
    assert summary.telemetry_root == str(elsewhere) and summary.last_step == 3 and summary.first_loss == 1.5


def test_report_errors_name_the_missing_path(tmp_path):
    missing = tmp_path / "no-such-run"
    with pytest.raises(ValueError, match=f"run dir {missing} does not exist"):
        write_report(str(missing))
    (tmp_path / "empty-run").mkdir()
    with pytest.raises(ValueError, match=f"no telemetry at {tmp_path / 'empty-run' / 'telemetry'}"):
        summarize(str(tmp_path / "empty-run"))


def test_load_table_of_an_empty_root_is_empty(tmp_path):
    table = load_table(str(tmp_path), "nodes")
    assert table.num_rows == 0 and table.schema.names[-3:] == ["run", "attempt", "rank"]


IN_HOUSE = {"launcher", "recipes", "parallel", "checkpoint", "collectives_bench", "slurm"}
LAZY_ONLY = {"pynvml", "matplotlib", "torch", "yaml"}


def test_imports_point_one_way_and_heavy_ones_are_lazy():
    for path in sorted((REPO / "telemetry").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in IN_HOUSE, f"{path.name} imports {name}"
        for node in tree.body:  # module level only
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                top = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for name in top:
                    assert name.split(".")[0] not in LAZY_ONLY, f"{path.name} imports {name} at module level"
