"""The figures benchmarks/gpu_validate.py derives from its runs (MFU, medians, ratios, the issue-25
targets) and the markdown table it writes beside its JSON summary (<out>.md) and prints."""

from __future__ import annotations

import statistics
from typing import List, Optional

from gpu_phases import executed_flops_per_token

MARK = "<!-- tierzero gpu_validate: written by benchmarks/gpu_validate.py -->"
"""First line of the markdown file: the script rewrites only a file that starts with it."""
PHASES = ("step", "fwd", "bwd", "grad", "optim", "gather")
ENGINES = ("native", "fsdp2")
MICROS = (2, 4)


# ---- derived figures -----------------------------------------------------------------------------

def _mfu(run: dict, meta: dict, backend: Optional[str]) -> None:
    if "tokens_per_s" not in run or not meta.get("peak_tflops"):
        return
    palm = meta["flops_per_token"]
    executed = executed_flops_per_token(palm, meta["n_layers"], meta["d_model"], meta["seq_len"], backend)
    run["mfu"] = run["tokens_per_s"] * palm / (meta["peak_tflops"] * 1e12)
    run["mfu_executed"] = run["tokens_per_s"] * executed / (meta["peak_tflops"] * 1e12)


def _median_of(runs: List[dict], keys=("tokens_per_s", "mfu", "mfu_executed", "peak_gib")) -> dict:
    done = [r for r in runs if "tokens_per_s" in r]
    out = {k: statistics.median(r[k] for r in done) for k in keys if done and all(k in r for r in done)}
    if done:
        out["phases_ms"] = {k: statistics.median(r["phases_ms"][k] for r in done) for k in done[0]["phases_ms"]}
    out["runs"] = len(done)
    return out


def derive(out: dict) -> None:
    """Section d's derived figures, in place: MFU of every run (attention counted as the engine's
    profiled step ran it), each baseline's median over its two runs, native / FSDP2, and each
    toggle's median."""
    backends = {e: (p.get("sdpa") or {}).get("backend") for e, p in out["profile"].items()}
    meta = out["meta"]
    toggles = {k: t for k, t in (out.get("toggles") or {}).items() if isinstance(t, dict) and "runs" in t}
    for r in [*out["runs"], *out["accum8"].values(), *[r for t in toggles.values() for r in t["runs"]]]:
        e = r.get("engine", "native")
        if isinstance(meta.get(e), dict) and "error" not in meta[e]:
            _mfu(r, meta[e], backends.get(e))
    out["attention_flops"] = {e: "7 L d T (causal, fused kernel; backend " + (
        f"{b} as profiled)" if b not in (None, "unknown", "math") else "not identified: assumed)") if b != "math"
        else "12 L d T (math backend: the whole square)" for e, b in backends.items()}
    summary = {}
    for micro in MICROS:
        row = {e: _median_of([r for r in out["runs"] if r["engine"] == e and r["micro"] == micro]) for e in ENGINES}
        if row["native"].get("tokens_per_s") and row["fsdp2"].get("tokens_per_s"):
            row["native / fsdp2 tokens/s"] = row["native"]["tokens_per_s"] / row["fsdp2"]["tokens_per_s"]
        summary[f"micro {micro}"] = row
    out["summary"] = summary
    for t in toggles.values():
        t["median"] = _median_of(t["runs"])


def targets(summary: dict) -> List[dict]:
    """Issue 25's acceptance on one GPU, as measured: met or not (None: not measured)."""
    d, e = summary.get("d a/b") or {}, summary.get("e checkpoint stall") or {}
    rows = []
    by = (d.get("summary") or {})

    def per_micro(fn):
        vals = [fn(by.get(f"micro {m}") or {}) for m in MICROS]
        return vals, (None if None in vals else all(v[1] for v in vals))

    def get(row, engine, key):
        return (row.get(engine) or {}).get(key)

    def mfu(row):
        v = get(row, "native", "mfu")
        return None if v is None else (f"{v:.3f}", v >= 0.45)

    def ratio(row):
        v = row.get("native / fsdp2 tokens/s")
        return None if v is None else (f"{v:.2f}x", v >= 1.05)

    def memory(row):
        a, b = get(row, "native", "peak_gib"), get(row, "fsdp2", "peak_gib")
        return None if a is None or b is None else (f"{a:.1f} vs {b:.1f} GiB", a <= b)

    for what, fn in (("native (train.compile=true) MFU >= 0.45", mfu),
                     ("native tokens/s >= 1.05x FSDP2 with per-block compile", ratio),
                     ("native peak memory <= FSDP2's", memory)):
        vals, met = per_micro(fn)
        rows.append({"target": f"{what} (micro 2 / 4)", "measured": " / ".join(v[0] if v else "-" for v in vals),
                     "met": met})
    share = e.get("first_stall / sync_save")
    rows.append({"target": "first save's stall <= 10 % of a synchronous save",
                 "measured": "-" if share is None else f"{100 * share:.1f} %", "met": None if share is None else share <= 0.10})
    return rows


# ---- markdown ------------------------------------------------------------------------------------

def _f(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: List[str], rows: List[List]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def _status(r: dict) -> Optional[str]:
    if "error" in r:
        return "error: " + r["error"].splitlines()[0][:100]
    if "tokens_per_s" not in r:
        return r.get("skipped", "not run")
    return None


def _phase_cells(r: dict, engine: str) -> List[str]:
    p = r.get("phases_ms") or {}
    cells = [_f(p.get(k)) for k in PHASES]
    if engine == "fsdp2" and p:  # FSDP2's gathers: its streams, and the copy-out on the compute stream
        cells[-1] = f"{_f(p.get('gather'))} / {_f(p.get('gather_copy_out'))}"
    return cells


def _run_row(label: List, r: dict, engine: str) -> List:
    status = _status(r)
    if status is not None:
        return [*label, status] + [""] * 10
    return [*label, f"{r['tokens_per_s']:,.0f}", _f(r.get("mfu"), ".3f"), _f(r.get("mfu_executed"), ".3f"),
            _f(r.get("peak_gib")), *_phase_cells(r, engine), _f(r.get("warmup_s"))]


def _ab(d: dict) -> List[str]:
    meta = d.get("meta") or {}
    m = next((v for v in meta.values() if isinstance(v, dict) and "params" in v), {})
    params = m.get("params", 0)
    size = f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.2f}M"
    lines = ["", f"## d: native vs FSDP2 (per-block compile), {size} params, "
                 f"{m.get('dtype')}, seq {m.get('seq_len')}, one device, world size 1", "",
             f"MFU: PaLM/torchtitan convention, 6N + 12 L d T per token; MFU exec: the FLOPs the kernels run "
             f"(attention {', '.join(f'{e}: {v}' for e, v in (d.get('attention_flops') or {}).items())}); "
             f"peak {_f(m.get('peak_tflops'), '.4g')} TFLOP/s. Phases in ms per optimizer step (CUDA events, median "
             "of the timed steps): FSDP2's grad (reduce) and gather (all-gather / copy-out) run on its own "
             "streams beside fwd/bwd, overlapped; native's grad is on the compute stream, out of bwd.", ""]
    head = ["run", "engine", "micro", "tokens/s", "MFU", "MFU exec", "peak GiB", *PHASES, "warm-up s"]
    rows = [_run_row([r.get("run"), r["engine"], r["micro"]], r, r["engine"]) for r in d.get("runs", [])]
    lines += _table(head, rows)
    rows = []
    for key, row in (d.get("summary") or {}).items():
        n, f = row.get("native", {}), row.get("fsdp2", {})
        rows.append([key, _f(n.get("tokens_per_s"), ",.0f"), _f(f.get("tokens_per_s"), ",.0f"),
                     _f(row.get("native / fsdp2 tokens/s"), ".3f"), _f(n.get("mfu"), ".3f"), _f(f.get("mfu"), ".3f"),
                     _f(n.get("peak_gib")), _f(f.get("peak_gib")), f"{n.get('runs', 0)} / {f.get('runs', 0)}"])
    lines += ["", "Median of the runs:", ""]
    lines += _table(["", "native tokens/s", "FSDP2 tokens/s", "native / FSDP2", "native MFU", "FSDP2 MFU",
                     "native peak GiB", "FSDP2 peak GiB", "runs"], rows)
    lines += _toggles(d.get("toggles") or {})
    lines += ["", "One optimizer step at accumulation 8 (micro-batch 2):", ""]
    lines += _table(["engine", "tokens/s", "MFU", "MFU exec", "peak GiB", *PHASES, "warm-up s"],
                    [_run_row([e], r, e) for e, r in (d.get("accum8") or {}).items()])
    for e, p in (d.get("profile") or {}).items():
        lines += _profile(e, p)
    return lines


def _toggles(toggles: dict) -> List[str]:
    if not toggles:
        return []
    if "error" in toggles or "skipped" in toggles:
        return ["", f"Native toggles: {_status(toggles) or 'not run'}"]
    base = (toggles.get("all on") or {}).get("median") or {}
    rows = []
    for name, t in toggles.items():
        if not isinstance(t, dict) or name in ("call_s",):
            continue
        med = t.get("median") or {}
        if not med.get("runs"):
            why = t.get("skipped", "not run")
            rows.append([name, t.get("what", ""), why.split(" -- ")[0] + (" (the JSON says why)" if " -- " in why else "")]
                        + [""] * 11)
            continue
        vs = med["tokens_per_s"] / base["tokens_per_s"] if base.get("tokens_per_s") else None
        dpeak = med["peak_gib"] - base["peak_gib"] if "peak_gib" in med and "peak_gib" in base else None
        rows.append([name, t.get("what", ""), f"{med['tokens_per_s']:,.0f}", _f(vs, ".3f"), _f(med.get("mfu"), ".3f"),
                     _f(med.get("mfu_executed"), ".3f"), _f(med.get("peak_gib")), _f(dpeak, "+.1f"),
                     *[_f(med["phases_ms"].get(k)) for k in PHASES[:-1]], med["runs"]])
    return ["", "Native toggles (micro-batch 2, one process, one model; each toggle once a round, two rounds):", ""] + \
        _table(["toggle", "what", "tokens/s", "vs all on", "MFU", "MFU exec", "peak GiB", "peak vs all on",
                *PHASES[:-1], "runs"], rows)


def _profile(engine: str, p: dict) -> List[str]:
    if _status_profile(p):
        return ["", f"Profiled step, {engine}: {_status_profile(p)}"]
    sdpa = p.get("sdpa") or {}
    lines = ["", f"Profiled step, {engine} (micro-batch {p.get('micro')}): SDPA backend **{sdpa.get('backend')}** "
                 f"(ops: {', '.join(sdpa.get('ops') or []) or 'none'}; kernels: "
                 f"{', '.join(k[:60] for k in sdpa.get('kernels') or []) or 'none'}); top {len(p.get('top', []))} "
                 f"{p.get('kind')} of {_f(p.get('total_ms'))} ms:", ""]
    rows = [[i + 1, k["name"][:90], k["calls"], _f(k["ms"], ".2f"), _f(100 * k["share"], ".1f")]
            for i, k in enumerate(p.get("top", []))]
    return lines + _table(["#", "name", "calls", "ms", "%"], rows)


def _status_profile(p: dict) -> Optional[str]:
    if "error" in p:
        return "error: " + p["error"].splitlines()[0][:100]
    return p.get("skipped") if "top" not in p else None


def _stall(e: dict) -> List[str]:
    lines = ["", "## e: checkpoint stall (native, its own model: fp32 masters and moments)", ""]
    if "error" in e or "saves" not in e:
        return lines + [f"{_status(e) or e.get('skipped', 'not run')}"]
    st = e.get("staging") or {}
    lines += [f"{_f(e.get('payload_gb'), '.2f')} GB a save; plain step {_f(e.get('plain_step_s'), '.3f')} s; host "
              f"staging ready {_f(st.get('ready_after_s'))} s after the first step (built in {_f(st.get('build_s'))} s, "
              f"pinned: {st.get('pinned')}). Stall = save() + what the next step took beyond a plain one.", ""]
    rows = []
    for s in e["saves"]:
        if "stall_s" not in s:
            rows.append([s["save"], s.get("skipped", "")] + [""] * 6)
            continue
        rows.append([s["save"], _f(s["stall_s"], ".3f"), _f(s["save_call_s"], ".3f"), _f(s["next_step_s"], ".3f"),
                     _f(s["guard_wait_s"], ".3f"), _f(s["write_s"], ".2f"), s["steps_during_write"],
                     _f(s.get("step_during_write_s"), ".3f")])
    sync = e.get("sync") or {}
    rows.append(["sync", _f(sync.get("save_s"), ".3f") if "save_s" in sync else sync.get("skipped", "-")] + [""] * 6)
    lines += _table(["save", "stall s", "save() s", "next step s", "guard wait s", "write s (background)",
                     "steps during write", "step during write s"], rows)
    share = e.get("first_stall / sync_save")
    lines += ["", f"First save's stall / a synchronous save: {_f(None if share is None else 100 * share)} %"]
    return lines


def markdown(summary: dict) -> str:
    a = summary.get("a inventory") or {}
    lines = [MARK, "", f"# GPU validation: {a.get('device', '?')}, torch {a.get('torch')}, {summary.get('started')}"]
    if summary.get("dry_run"):
        lines += ["", f"**Dry run on CPU**: tiny sizes, perf_counter for CUDA events, compile backend "
                      f"{summary.get('dry_backend', 'aot_eager')}; the figures say only that every path runs."]
    if summary.get("interrupted"):
        lines += ["", f"**Interrupted** ({summary['interrupted']}): the sections below are what finished."]
    lines += ["", "| section | result | seconds |", "|---|---|---|"]
    for key, v in summary.items():
        if isinstance(v, dict) and "seconds" in v:
            lines.append(f"| {key} | {_cell(_section_line(key, v))} | {v['seconds']} |")
    if isinstance(summary.get("d a/b"), dict) and "runs" in summary["d a/b"]:
        lines += _ab(summary["d a/b"])
    if isinstance(summary.get("e checkpoint stall"), dict):
        lines += _stall(summary["e checkpoint stall"])
    lines += ["", "## Issue 25's targets on one GPU", ""]
    lines += _table(["target", "measured", "met"],
                    [[t["target"], t["measured"], {True: "yes", False: "no", None: "-"}[t["met"]]] for t in targets(summary)])
    return "\n".join(lines) + "\n"


def _section_line(key: str, v: dict) -> str:
    if not v.get("ok", True):
        return "FAILED: " + str(v.get("error", "see the JSON"))[:160]
    if v.get("skipped"):
        return f"skipped: {v['skipped']}"
    if key.startswith("a"):
        return (f"{v.get('device')}; datasheet bf16 {_f(v.get('datasheet_bf16_tflops'))} TFLOP/s; 8192^3 bf16 matmul "
                f"{_f(v.get('matmul_bf16_tflops'))} TFLOP/s" if "matmul_bf16_tflops" in v else
                f"{v.get('device')}; fp32 matmul {_f(v.get('matmul_fp32_tflops'), '.3f')} TFLOP/s")
    if key.startswith("b"):
        plans = v.get("plans") or {}
        ran = [k for k, p in plans.items() if "max_rel_loss_diff" in p]
        skipped = [k for k, p in plans.items() if "skipped" in p]
        return (f"worst rel loss diff {_f(v.get('worst_rel'), '.1e')} over {len(ran)} plans + resume"
                + (f"; skipped for time: {', '.join(skipped)}" if skipped else ""))
    if key.startswith("c"):
        return "; ".join(f"{k} {_f(x.get('event_ms'), '.3f')} ms" for k, x in v.items() if isinstance(x, dict))
    if key.startswith("d"):
        s = v.get("summary") or {}
        return "; ".join(f"{k}: native / FSDP2 {_f(r.get('native / fsdp2 tokens/s'), '.3f')}x" for k, r in s.items())
    if key.startswith("e"):
        share = v.get("first_stall / sync_save")
        return f"first save's stall {_f(None if share is None else 100 * share)} % of a synchronous save"
    return "ok"
