"""Chaos drill: kill -9 a random rank at a random step, many times, and check recovery.

For each seed one `tierzero run` (local supervisor, checkpoints every few steps, async
saves) has a random rank SIGKILLed when it reaches a random step. The run must finish, its
final lineage must hold every step 1..N, and every loss must equal the uninterrupted run's
bit for bit (same layout, same reductions). Prints one row per seed -- victim, step, where
the restart resumed, steps recomputed, time lost (from `tierzero report`'s accounting) --
and a footer with the pass count and the median time lost. Never fails on machine speed;
exits 1 only when a recovery was wrong.

    python benchmarks/chaos.py --seeds 20
    python benchmarks/chaos.py --seeds 10 --nproc 4 --steps 40 --every 5
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SMALL = ["train.global_batch_size=16", "train.micro_batch_size=2", "train.warmup_steps=2", "model.d_model=32",
         "model.n_heads=2", "data.seq_len=16", "telemetry.peak_tflops=1.0", "telemetry.flush_every_s=1"]


def _lineage(run_dir: Path) -> dict:
    import pyarrow.dataset as ds

    rows = ds.dataset(run_dir / "telemetry" / "steps", format="parquet", partitioning="hive").to_table().to_pylist()
    rows = sorted((r for r in rows if r["rank"] == 0), key=lambda r: (r["attempt"], r["time"]))
    return {r["step"]: r["loss"] for r in rows}


def _cmd(args) -> list:
    return [sys.executable, "-m", "tierzero.launcher.cli", "run", *SMALL, f"launcher.nproc={args.nproc}",
            f"train.steps={args.steps}"]


def drill(args, seed: int, clean: dict, base: Path) -> dict:
    from tierzero.telemetry.report import load_table, resolve_telemetry_root, restart_lines

    rng = random.Random(seed)
    victim, at_step = rng.randrange(args.nproc), rng.randint(2, args.steps - 2)
    run_dir = base / f"seed-{seed}"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    sup = subprocess.Popen(_cmd(args) + [f"checkpoint.every_steps={args.every}", "checkpoint.async_save=true",
                                         f"run.dir={run_dir}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, env=env)
    beat_path = run_dir / ".heartbeat" / f"rank-{victim}.json"
    try:
        while True:
            if sup.poll() is not None:
                return dict(seed=seed, victim=victim, step=at_step, ok=False, why="ended before the kill")
            try:
                beat = json.loads(beat_path.read_text())
            except (OSError, ValueError):
                beat = {}
            if beat.get("step", 0) >= at_step:
                break
            time.sleep(0.02)
        os.kill(beat["pid"], signal.SIGKILL)
        _, err = sup.communicate(timeout=600)
    finally:
        if sup.poll() is None:
            sup.kill()
    row = dict(seed=seed, victim=victim, step=at_step, ok=sup.returncode == 0, why="")
    if sup.returncode != 0:
        row["why"] = f"exit {sup.returncode}: {err.strip().splitlines()[-1] if err.strip() else ''}"
        return row
    lineage = _lineage(run_dir)
    if sorted(lineage) != list(range(1, args.steps + 1)):
        row.update(ok=False, why=f"lineage misses steps {sorted(set(range(1, args.steps + 1)) - set(lineage))}")
    elif any(lineage[s] != clean[s] for s in lineage):
        first = min(s for s in lineage if lineage[s] != clean[s])
        row.update(ok=False, why=f"loss differs from the clean run at step {first}")
    root = resolve_telemetry_root(str(run_dir))
    text = " ".join(restart_lines(load_table(root, "steps"), load_table(root, "events")))
    row["resumed"] = _between(text, "resumed from step ", ";")
    row["recomputed"] = _between(text, "; ", " step(s) recomputed")
    row["lost_s"] = _between(text, "recomputed; ", " s lost")
    return row


def _between(text: str, left: str, right: str):
    try:
        return float(text.split(left, 1)[1].split(right, 1)[0].rsplit(" ", 1)[-1])
    except (IndexError, ValueError):
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--every", type=int, default=4, help="checkpoint.every_steps")
    args = p.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="tierzero-chaos-"))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run(_cmd(args) + [f"run.dir={base / 'clean'}"], check=True, capture_output=True, env=env)
    clean = _lineage(base / "clean")
    print(f"# tierzero chaos drill | {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | {os.uname().nodename}")
    print(f"# {args.nproc} local ranks | {args.steps} steps | checkpoint every {args.every} (async) | "
          f"kill -9 of a random rank at a random step | runs in {base}")
    print(f"{'seed':>5} {'rank':>5} {'killed@':>8} {'resumed':>8} {'recomp':>7} {'lost s':>7}  result")
    rows = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        r = drill(args, seed, clean, base)
        rows.append(r)

        def fmt(v, spec):  # "-": not in the report (e.g. resumed from scratch: killed before the first commit)
            return format(v, spec) if isinstance(v, (int, float)) else "-".rjust(int(spec.lstrip(">").split(".")[0]))
        print(f"{seed:>5} {r['victim']:>5} {r['step']:>8} {fmt(r.get('resumed'), '>8.0f')} "
              f"{fmt(r.get('recomputed'), '>7.0f')} {fmt(r.get('lost_s'), '>7.1f')}  "
              f"{'OK' if r['ok'] else 'FAILED: ' + r['why']}", flush=True)
    ok = sum(r["ok"] for r in rows)
    lost = [r["lost_s"] for r in rows if r.get("lost_s") is not None]
    print(f"# {ok}/{len(rows)} recoveries exact (every step present, losses equal to the clean run)"
          + (f" | time lost per failure: median {statistics.median(lost):.1f} s, max {max(lost):.1f} s" if lost else ""))
    return 0 if ok == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
