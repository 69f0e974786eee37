"""Read a run's telemetry back and summarise it: numbers as text, loss and throughput PNGs.

`tierzero report RUN_DIR` prints write_report(RUN_DIR); a ValueError means the user gave
something other than a folder with telemetry (exit 2).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Optional, Union

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from tierzero.telemetry import schema as telemetry_schema
from tierzero.telemetry.schema import PARTITION, telemetry_root

logger = logging.getLogger(__name__)

NUM_LAST_EVENTS = 5


@dataclasses.dataclass(frozen=True)
class RunSummary:
    run_dir: str
    telemetry_root: str
    runs: tuple[str, ...]
    attempts: tuple[int, ...]
    ranks: tuple[int, ...]
    num_step_rows: int
    last_step: Optional[int]
    """Highest step recorded by any rank in any attempt."""
    loss_rank: Optional[int]
    """The rank whose losses are reported: 0, or the lowest rank present."""
    first_loss: Optional[float]
    last_loss: Optional[float]
    median_tokens_per_s: Optional[float]
    """Median over steps of tokens/s summed across ranks."""
    median_step_time_s: Optional[float]
    median_mfu: Optional[float]
    event_counts: dict[str, int]
    last_events: tuple[dict, ...]


def load_table(telemetry_root: str, table: str) -> pa.Table:
    """Every file of one table with run, attempt and rank columns; empty (with the schema) when there are none."""
    tables = telemetry_schema.TABLES  # at call time, so a table added to schema.TABLES is readable here too
    if table not in tables:
        raise ValueError(f"unknown telemetry table {table!r}; choose one of {sorted(tables)}")
    schema = pa.schema(list(tables[table]) + list(PARTITION))
    fs, root = fsspec.core.url_to_fs(telemetry_root)
    path = f"{root.rstrip('/')}/{table}"
    if not fs.isdir(path):
        return schema.empty_table()
    dataset = ds.dataset(
        path,
        schema=schema,  # files written before a column existed read it as null
        format="parquet",
        filesystem=_arrow_fs(fs),
        partitioning=ds.partitioning(PARTITION, flavor="hive"),
    )
    return dataset.to_table()


def resolve_telemetry_root(run_dir: str, *, check_location: Optional[Callable[[str], Optional[str]]] = None) -> str:
    """telemetry.dir from `<run_dir>/config.yaml` when set, else `<run_dir>/telemetry`; ValueError if
    absent, or if run_dir is not a folder. `check_location(url)` is the caller's rule for a URL
    (a problem, or None), applied to that telemetry.dir before it is opened: config.yaml is a file
    anyone can edit, and a URL such as ftp://host/... would make fsspec look the host up."""
    import yaml

    fs, path = fsspec.core.url_to_fs(run_dir)
    if fs.isfile(path):
        raise ValueError(f"run dir {run_dir} is a file, not a run folder; pass the folder a run wrote (it holds "
                         "config.yaml), such as runs/NAME")
    if not fs.isdir(path):
        raise ValueError(f"run dir {run_dir} does not exist; pass the folder a run wrote (it holds config.yaml)")
    configured = None
    config_path = f"{path.rstrip('/')}/config.yaml"
    if fs.isfile(config_path):
        with fs.open(config_path, "r") as f:
            config = yaml.safe_load(f) or {}
        section = config.get("telemetry") if isinstance(config, dict) else None
        configured = section.get("dir") if isinstance(section, dict) else None
    if configured is not None and not isinstance(configured, str):
        raise ValueError(f"telemetry.dir in {run_dir}/config.yaml is {str(configured)[:80]!r}, not a path; give it the "
                         "folder or URL the run wrote its telemetry to, or remove it for <run_dir>/telemetry")
    problem = check_location(configured) if configured and check_location else None
    if problem:
        raise ValueError(f"telemetry.dir in {run_dir}/config.yaml: {problem}")
    root = telemetry_root(run_dir, configured)
    root_fs, root_path = fsspec.core.url_to_fs(root)
    if not root_fs.isdir(root_path):
        source = f"telemetry.dir in {run_dir}/config.yaml" if configured else "the default <run_dir>/telemetry"
        raise ValueError(f"no telemetry at {root} ({source}); was the run started with telemetry.enabled=false?")
    return root


def summarize(run_dir: Union[str, os.PathLike], *,
              check_location: Optional[Callable[[str], Optional[str]]] = None) -> RunSummary:
    """The run's numbers; a step replayed after a restart counts once, from its latest attempt.
    check_location: as for resolve_telemetry_root."""
    run_dir = os.fspath(run_dir)
    root = resolve_telemetry_root(run_dir, check_location=check_location)
    steps = load_table(root, "steps")
    events = load_table(root, "events")
    nodes = load_table(root, "nodes")

    def distinct(column: str) -> tuple:
        values = set()
        for table in (steps, events, nodes):
            values.update(v for v in table.column(column).to_pylist() if v is not None)
        return tuple(sorted(values))

    kept = _latest_attempt_rows(steps)
    loss_rank = first_loss = last_loss = None
    if kept.num_rows:
        ranks = kept.column("rank").to_numpy()
        loss_rank = 0 if (ranks == 0).any() else int(ranks.min())
        losses = kept.filter(pc.equal(kept.column("rank"), loss_rank))
        losses = losses.filter(pc.is_valid(losses.column("loss"))).sort_by([("step", "ascending"), ("run", "ascending")])
        if losses.num_rows:
            first_loss = losses.column("loss")[0].as_py()
            last_loss = losses.column("loss")[-1].as_py()
    per_step = kept.group_by(["run", "step"]).aggregate([("tokens_per_s", "sum")]) if kept.num_rows else None

    kinds = events.column("kind").to_pylist()
    counts = {kind: kinds.count(kind) for kind in sorted(set(kinds))}
    recent = events.sort_by([("time", "ascending")]).slice(max(events.num_rows - NUM_LAST_EVENTS, 0))
    last_step = pc.max(steps.column("step")).as_py() if steps.num_rows else None
    return RunSummary(
        run_dir=run_dir,
        telemetry_root=root,
        runs=distinct("run"),
        attempts=distinct("attempt"),
        ranks=distinct("rank"),
        num_step_rows=steps.num_rows,
        last_step=last_step,
        loss_rank=loss_rank,
        first_loss=first_loss,
        last_loss=last_loss,
        median_tokens_per_s=_median(per_step.column("tokens_per_s_sum")) if per_step is not None else None,
        median_step_time_s=_median(kept.column("step_time_s")),
        median_mfu=_median(kept.column("mfu")),
        event_counts=counts,
        last_events=tuple(recent.select(["time", "run", "attempt", "rank", "step", "kind", "detail", "host"]).to_pylist()),
    )


def write_report(run_dir: Union[str, os.PathLike], *,
                 check_location: Optional[Callable[[str], Optional[str]]] = None) -> str:
    """Write `<run_dir>/report/loss.png` and `throughput.png`; return the text to print.
    check_location: as for resolve_telemetry_root."""
    run_dir = os.fspath(run_dir)
    summary = summarize(run_dir, check_location=check_location)
    lines = [_format_summary(summary)]
    events = load_table(summary.telemetry_root, "events")
    lines += restart_lines(load_table(summary.telemetry_root, "steps"), events)
    lines += stop_lines(events)
    if summary.num_step_rows:
        steps = load_table(summary.telemetry_root, "steps")
        report_dir = f"{run_dir.rstrip('/')}/report"
        fs, report_path = fsspec.core.url_to_fs(report_dir)
        fs.makedirs(report_path, exist_ok=True)
        loss_png = f"{report_dir}/loss.png"
        throughput_png = f"{report_dir}/throughput.png"
        held_out = _latest_attempt_rows(load_table(summary.telemetry_root, "eval"))
        _plot_loss(steps, summary.loss_rank, loss_png, held_out)
        _plot_throughput(steps, throughput_png)
        lines[1:1] = eval_lines(held_out)
        lines += ["plots:", f"  {loss_png}", f"  {throughput_png}"]
        experts = _latest_attempt_rows(load_table(summary.telemetry_root, "experts"))
        if experts.num_rows:
            heatmap_png = f"{report_dir}/expert_load.png"
            _plot_expert_load(experts, heatmap_png)
            lines.append(f"  {heatmap_png}")
            lines[1:1] = _expert_lines(experts)
    else:
        lines.append("plots: none (no step rows)")
    sweep = sweep_busbw(load_table(summary.telemetry_root, "collectives"))
    if len(sweep) >= 2:
        png = f"{run_dir.rstrip('/')}/report/busbw_vs_nodes.png"
        fsspec.core.url_to_fs(png)[0].makedirs(png.rsplit("/", 1)[0], exist_ok=True)
        lines += sweep_lines(sweep)
        _plot_sweep(sweep, png)
        lines.append(f"  {png}")
    return "\n".join(lines)


def sweep_busbw(collectives: pa.Table) -> dict[int, dict[str, tuple[int, float]]]:
    """A collective sweep over node counts (`tierzero sbatch slurm.command=bench
    slurm.sweep_nodes=[...]` writes one run per count into one run dir): nodes -> op ->
    (largest size in bytes, its busbw in GB/s), from the global scope, out-of-place where the
    op has it. Nodes are the distinct hosts of the global rows; the newest run per count wins."""
    rows = [r for r in collectives.to_pylist() if r["scope"] == "global"]
    out: dict[int, dict[str, tuple[int, float]]] = {}
    for run in sorted({r["run"] for r in rows}, key=lambda name: max(r["time"] for r in rows if r["run"] == name)):
        mine = [r for r in rows if r["run"] == run]
        nodes = len({h for r in mine for h in r["hosts"].split(",")})
        per_op: dict[str, tuple[int, float]] = {}
        for op in sorted({r["op"] for r in mine}):
            of_op = [r for r in mine if r["op"] == op]
            placement = "out" if any(r["placement"] == "out" for r in of_op) else "in"
            of_op = [r for r in of_op if r["placement"] == placement]
            top = max(r["size_bytes"] for r in of_op)
            busbw = [r["busbw_gbps"] for r in of_op if r["size_bytes"] == top]
            per_op[op] = (top, sum(busbw) / len(busbw))
        out[nodes] = per_op
    return out


def sweep_lines(sweep: dict[int, dict[str, tuple[int, float]]]) -> list[str]:
    counts = sorted(sweep)
    ops = sorted({op for per_op in sweep.values() for op in per_op})
    lines = ["collective sweep: busbw (GB/s) at the largest size, global scope, by nodes",
             "  " + f"{'op':<16}" + "".join(f"{f'{n} node' + ('s' if n > 1 else ''):>12}" for n in counts)]
    for op in ops:
        cells = "".join(f"{sweep[n][op][1]:>12.3f}" if op in sweep[n] else f"{'-':>12}" for n in counts)
        lines.append(f"  {op:<16}{cells}")
    return lines


def _plot_sweep(sweep: dict[int, dict[str, tuple[int, float]]], url: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.subplots()
    counts = sorted(sweep)
    for op in sorted({op for per_op in sweep.values() for op in per_op}):
        xs = [n for n in counts if op in sweep[n]]
        ax.plot(xs, [sweep[n][op][1] for n in xs], marker="o", label=op)
    ax.set_title("busbw at the largest size vs nodes (global scope)")
    ax.set_xlabel("nodes")
    ax.set_ylabel("busbw (GB/s)")
    ax.set_xticks(counts)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with fsspec.open(url, "wb") as f:
        fig.savefig(f, format="png")


def _latest_attempt_rows(steps: pa.Table) -> pa.Table:
    # After a restart from a checkpoint the new attempt replays steps the old one already
    # logged; the replay is what the final model saw, so it wins.
    if not steps.num_rows:
        return steps
    latest = steps.group_by(["run", "step"]).aggregate([("attempt", "max")])
    joined = steps.join(latest, keys=["run", "step"])
    kept = joined.filter(pc.equal(joined.column("attempt"), joined.column("attempt_max")))
    return kept.drop_columns(["attempt_max"])


def _median(column: pa.ChunkedArray) -> Optional[float]:
    values = column.drop_null().to_numpy(zero_copy_only=False).astype(np.float64)
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else None


def _format_summary(s: RunSummary) -> str:
    def num(value: Optional[float], fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    ranks = ", ".join(str(r) for r in s.ranks) or "none"
    lines = [
        f"# run: {', '.join(s.runs) or 'n/a'}",
        f"# telemetry: {s.telemetry_root}",
        f"attempts: {', '.join(str(a) for a in s.attempts) or 'none'}   ranks: {ranks}",
        f"steps: last step {num(s.last_step, 'd')} ({s.num_step_rows} rows)",
        f"loss (rank {num(s.loss_rank, 'd')}): first {num(s.first_loss, '.4f')} -> last {num(s.last_loss, '.4f')}",
        f"throughput: median {num(s.median_tokens_per_s, ',.0f')} tokens/s (all ranks)   "
        f"median step {num(s.median_step_time_s, '.4f')} s   "
        f"median MFU {num(None if s.median_mfu is None else 100 * s.median_mfu, '.2f')}%",
        "events: " + (" ".join(f"{k}={v}" for k, v in s.event_counts.items()) or "none"),
    ]
    if s.last_events:
        lines.append("last events:")
        for e in s.last_events:
            step = "" if e["step"] is None else f" step {e['step']}"
            detail = f": {e['detail']}" if e["detail"] else ""
            lines.append(
                f"  {e['time']:%Y-%m-%d %H:%M:%S} attempt {e['attempt']} rank {e['rank']} {e['host']} {e['kind']}{step}{detail}"
            )
    return "\n".join(lines)


def stop_lines(events: pa.Table) -> list[str]:
    """One line per attempt that a signal stopped (SIGTERM, Ctrl-C, the requeue signal): the
    step it stopped after, with its checkpoint, and where the next attempt resumed."""
    if not events.num_rows:
        return []
    rows = events.to_pylist()
    run = sorted({e["run"] for e in rows})[-1]
    rows = [e for e in rows if e["run"] == run]
    # rank 0's event of each attempt (the ranks' own, not the supervisor's, which has rank -1)
    stops = {e["attempt"]: e for e in sorted(rows, key=lambda e: -e["rank"]) if e["kind"] == "signal" and e["rank"] >= 0}
    if not stops:
        return []
    resumes = {e["attempt"]: e["step"] for e in rows if e["kind"] == "resume"}
    lines = [f"stopped by a signal: {len(stops)}"]
    for attempt, e in sorted(stops.items()):
        after = resumes.get(attempt + 1)
        nxt = f"attempt {attempt + 1} resumed from step {after}" if after is not None else "not resumed yet"
        lines.append(f"  attempt {attempt}: {e['detail']}; {nxt}")
    return lines


def restart_lines(steps: pa.Table, events: pa.Table) -> list[str]:
    """One line per restart of the latest run: its cause, where the new attempt resumed, the
    steps it recomputed, and the time lost (from the failed attempt's last logged step to the
    first step past it)."""
    restarts = events.filter(pc.equal(events.column("kind"), "restart")).to_pylist()
    if not restarts:
        return []
    run = sorted(set(steps.column("run").to_pylist()) or {restarts[0]["run"]})[-1]
    rows = [r for r in steps.to_pylist() if r["run"] == run]
    resumes = [e for e in events.to_pylist() if e["kind"] == "resume" and e["run"] == run]
    lines = [f"restarts: {len(restarts)}"]
    total_steps = total_s = 0.0
    for ev in sorted(restarts, key=lambda e: e["attempt"]):
        k = ev["attempt"]
        before = [r for r in rows if r["attempt"] == k - 1]
        after = [r for r in rows if r["attempt"] == k]
        # the failed attempt's progress: its last logged step, or where the supervisor saw it
        # fail (step rows still buffered in a killed rank never reach disk)
        failed = [e for e in events.to_pylist() if e["kind"] in ("error", "hang") and e["attempt"] == k - 1
                  and e["rank"] == -1 and e["run"] == run]
        last = max([r["step"] for r in before] + [e["step"] for e in failed if e["step"] is not None], default=0)
        t_fail = max([r["time"] for r in before if r["step"] == last] + [e["time"] for e in failed], default=None)
        resumed = next((e["step"] for e in resumes if e["attempt"] == k), None)
        recomputed = max(0, last - (resumed or 0))
        past = [r["time"] for r in after if r["step"] > last]
        lost = (min(past) - t_fail).total_seconds() if past and t_fail is not None else None
        total_steps += recomputed
        total_s += lost or 0.0
        cause = ev["detail"].split(" after ", 1)[-1]
        lines.append(f"  attempt {k}: after {cause}; resumed from "
                     f"{'step ' + str(resumed) if resumed is not None else 'scratch'}; {recomputed} step(s) recomputed; "
                     + (f"{lost:.1f} s lost" if lost is not None else "time lost unknown (no step past the failure)"))
    lines.append(f"  in all: {int(total_steps)} step(s) recomputed, {total_s:.1f} s lost")
    return lines


def _expert_load(experts: pa.Table) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """layer -> (steps, load [step, expert] as a share of the layer's assignments), the latest run."""
    run = sorted(set(experts.column("run").to_pylist()))[-1]
    rows = experts.filter(pc.equal(experts.column("run"), run))
    step = rows.column("step").to_numpy()
    layer = rows.column("layer").to_numpy()
    expert = rows.column("expert").to_numpy()
    tokens = rows.column("tokens").to_numpy().astype(np.float64)
    out = {}
    for li in sorted(set(layer.tolist())):
        sel = layer == li
        steps = np.unique(step[sel])
        load = np.zeros((steps.size, int(expert[sel].max()) + 1))
        load[np.searchsorted(steps, step[sel]), expert[sel]] = tokens[sel]
        out[li] = (steps, load / np.maximum(load.sum(1, keepdims=True), 1.0))
    return out


def _cross_node(experts: pa.Table, layer: int) -> str:
    """", cross-node X% of assignments, N rows/step across" for a layer whose EP group spans nodes
    (mean over the run's steps); "" when the table has no such figure."""
    if "cross_node_fraction" not in experts.column_names:
        return ""
    rows = experts.filter(pc.equal(experts.column("layer"), layer))
    rows = rows.filter(pc.equal(rows.column("expert"), 0))  # the figure repeats on every expert's row
    frac = [v for v in rows.column("cross_node_fraction").to_pylist() if v is not None]
    sent = [v for v in rows.column("cross_node_rows").to_pylist() if v is not None]
    if not frac or not any(frac):
        return ""
    return f", cross-node {np.mean(frac):.1%} of assignments, {np.mean(sent):.0f} rows/step across"


def _expert_lines(experts: pa.Table) -> list[str]:
    """Per MoE layer: how uneven the last step's load was, and what was dropped."""
    lines = []
    last = pc.max(experts.column("step")).as_py()
    at_last = experts.filter(pc.equal(experts.column("step"), last))
    for li, (steps, load) in _expert_load(experts).items():
        share = load[-1]
        mine = at_last.filter(pc.equal(at_last.column("layer"), li))
        dropped = mine.column("dropped_fraction")[0].as_py() if mine.num_rows else float("nan")
        bias = mine.column("bias").to_numpy() if mine.num_rows else np.zeros(1)
        lines.append(
            f"experts layer {li}: step {last} load max/mean {share.max() * share.size:.2f}x, min/mean "
            f"{share.min() * share.size:.2f}x, dropped {dropped:.1%}, bias {bias.min():+.3g}..{bias.max():+.3g}"
            + _cross_node(experts, li)
        )
    return lines


def _plot_expert_load(experts: pa.Table, url: str) -> None:
    """Heatmap per MoE layer: expert (rows) x step (columns), colour = share of the layer's tokens."""
    from matplotlib.figure import Figure

    loads = _expert_load(experts)
    fig = Figure(figsize=(9, 2.2 + 2.0 * len(loads)), dpi=100)
    axes = fig.subplots(len(loads), 1, squeeze=False)[:, 0]
    for ax, (li, (steps, load)) in zip(axes, loads.items()):
        image = ax.imshow(load.T * load.shape[1], aspect="auto", origin="lower", cmap="viridis",
                          extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, load.shape[1] - 0.5))
        ax.set_title(f"MoE layer {li}: tokens per expert / mean (1 = balanced){_cross_node(experts, li)}",
                     fontsize="medium")
        ax.set_ylabel("expert")
        fig.colorbar(image, ax=ax)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    with fsspec.open(url, "wb") as f:
        fig.savefig(f, format="png")


def eval_lines(held_out: pa.Table) -> list[str]:
    """The held-out loss's first and last evaluation (train.eval_every), or nothing without any."""
    if not held_out.num_rows:
        return []
    rows = held_out.sort_by([("run", "ascending"), ("step", "ascending")]).to_pylist()
    first, last = rows[0], rows[-1]
    return [f"eval loss: first {first['loss']:.4f} (step {first['step']}) -> last {last['loss']:.4f} "
            f"(step {last['step']}), {len(rows)} evaluation(s)"]


def _plot_loss(steps: pa.Table, loss_rank: Optional[int], url: str, held_out: Optional[pa.Table] = None) -> None:
    """Training loss per step, and the held-out loss per evaluation beside it (marked, from `eval`)."""
    rows = steps.filter(pc.equal(steps.column("rank"), loss_rank)) if loss_rank is not None else steps
    rows = rows.filter(pc.is_valid(rows.column("loss")))
    series = _series(rows, "loss")
    if held_out is not None and held_out.num_rows:
        series.update({f"eval {label}": (x, y, "o") for label, (x, y) in _series(held_out, "loss").items()})
    _save_plot(series, f"loss (rank {loss_rank})", "loss", url)


def _plot_throughput(steps: pa.Table, url: str) -> None:
    totals = steps.group_by(["run", "attempt", "step"]).aggregate([("tokens_per_s", "sum")])
    totals = totals.filter(pc.is_valid(totals.column("tokens_per_s_sum")))
    _save_plot(_series(totals, "tokens_per_s_sum"), "throughput (sum over ranks)", "tokens/s", url)


def _series(table: pa.Table, column: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One (step, value) line per (run, attempt), so a restart shows as a new line over replayed steps."""
    out = {}
    keys = sorted(set(zip(table.column("run").to_pylist(), table.column("attempt").to_pylist())))
    one_run = len({run for run, _ in keys}) == 1
    for run, attempt in keys:
        part = table.filter(pc.and_(pc.equal(table.column("run"), run), pc.equal(table.column("attempt"), attempt)))
        part = part.sort_by("step")
        label = f"attempt {attempt}" if one_run else f"{run} attempt {attempt}"
        out[label] = (part.column("step").to_numpy(), part.column(column).to_numpy(zero_copy_only=False))
    return out


def _save_plot(series: dict, title: str, ylabel: str, url: str) -> None:
    # Figure without pyplot: no global backend switch, no GUI, safe in any thread.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.subplots()
    for label, (x, y, *marker) in series.items():  # a third item: a marked, dashed series (held-out loss)
        ax.plot(x, y, label=label, linewidth=1.2, marker=marker[0] if marker else None,
                linestyle="--" if marker else "-")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    with fsspec.open(url, "wb") as f:
        fig.savefig(f, format="png")


def _arrow_fs(fs: Any) -> Any:
    from fsspec.implementations.local import LocalFileSystem
    from pyarrow import fs as pafs

    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))
