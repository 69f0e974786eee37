"""Sections d and e of benchmarks/gpu_validate.sh: an A/B instrument for one GPU (issue 25, item 7).

d  the native engine against FSDP2 with per-block compile (the fair reference: float32 masters,
   fused AdamW, one gradient sync per optimizer step), both train.compile=true, at the ~1B dense /
   bf16 / seq 4096 shape, world size 1:
     baselines  native and FSDP2 at micro-batch 2 and 4, each run twice, interleaved (native 2,
                FSDP2 2, native 4, FSDP2 4, then the same again)
     profile    one step of each at micro-batch 2 under torch.profiler: the top 20 kernels and
                the SDPA backend the step actually ran
     accum 8    one optimizer step of 8 micro-batches of 2, each engine
     toggles    in the native process, on its one model, interleaved over two rounds: all on;
                fused step off (the step before issue 25, `step_before`); chunked loss off (the
                eager head + the compiled loss over full logits: FSDP2's path); compile off; all
                three off. Lazy gradients + freed logits have no engine knob: listed, skipped.
e  checkpoint stall on the native process's model: async saves 1, 2 and 3 (each written before
   the next is asked for), against one synchronous save.

Each engine lives in a spawned worker process of its own (two CUDA contexts on one GPU), driven
by the coordinator one command at a time over a pipe: the two never run at once, each peak
memory is its process's own, and an engine that fails or runs out of memory loses only its
rows. A worker empties its allocator cache after each command, so the idle one holds only its
model states. Every command carries the section's deadline: a worker stops before a step that
would pass it ("skipped: time"), and one that does not answer 20 s after it is stopped.

Per run: tokens/s over the timed steps (host wall clock, the trainer's definition), peak
allocated memory, the warm-up's seconds (compile included) and per-phase times from CUDA events
recorded around the engines' own calls (benchmarks/gpu_phases.py says which); MFU, medians and
ratios are derived afterwards (benchmarks/gpu_report.py). On CPU (the dry run) perf_counter
stands in for the events and the compile backend is aot_eager (inductor's C++ build of every
graph would not fit the dry run's three minutes on two cores).
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from gpu_phases import (LAZY_GRADS_SKIP, TOGGLES, Clock, dynamo_counts, instrument_fsdp2, instrument_native,
                        sdpa_backend, top_kernels)
from gpu_report import derive

SHAPE = ["train.dtype=bfloat16", "model.d_model=2048", "model.n_heads=16", "model.n_layers=18",
         "data.vocab_size=50304", "data.seq_len=4096", "data.successors=8"]
"""~1.0B parameters (18 blocks of 12 x 2048^2, one tied 50,304 x 2048 embedding): section d's shape."""
DRY_SHAPE = ["model.d_model=64", "model.n_heads=4", "model.n_layers=2", "data.vocab_size=512", "data.seq_len=64",
             "data.successors=4"]
PLANS = {"native": "ddp", "fsdp2": "zero3"}
"""At world size 1 every native plan keeps its parameters whole; FSDP2 shards (over one rank)."""
LR = 1e-4
GRACE_S = 20.0
STEPS = {"gpu": dict(timed=6, first_warmup=2, warmup=1, toggle=4, accum=2),
         "dry": dict(timed=2, first_warmup=1, warmup=1, toggle=1, accum=1)}


class Rows:
    """Telemetry stand-in: keeps the rows the loop records."""

    def __init__(self):
        self.rows = {}

    def record(self, table: str, /, **row) -> None:
        self.rows.setdefault(table, []).append(row)

    def event(self, kind, detail="", step=None, **_):
        self.record("events", kind=kind, detail=detail, step=step)

    def flush(self) -> None:
        pass


# ---- the worker's side: one engine, one model ----------------------------------------------------

class Bench:
    """One engine's trainer in a worker process, and the runs the coordinator asks of it."""

    def __init__(self, engine: str, *, dry: bool, cache_dir: str, compile_on: bool = True, deadline=None):
        from tierzero.launcher.config import load_config
        from tierzero.parallel.context import DistContext
        from tierzero.parallel.topology import emulated_topology
        from tierzero.recipes.trainer import Recipe, Trainer

        t0 = time.perf_counter()
        self.name, self.dry, self.cuda = engine, dry, not dry
        device = "cuda:0" if self.cuda else "cpu"
        overrides = [*(DRY_SHAPE if dry else SHAPE), f"parallel.engine={engine}", f"parallel.plan={PLANS[engine]}",
                     f"train.compile={'true' if compile_on else 'false'}", "train.micro_batch_size=2",
                     "train.global_batch_size=2", "launcher.nproc=1", "train.steps=1000000", "train.warmup_steps=1"]
        cfg = load_config(["dense_tiny_cpu"], overrides)
        ctx = DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device=device, backend="none",
                          topology=emulated_topology([1]), host=platform.node())
        self.trainer = Trainer(Recipe.of(cfg), ctx, Rows(), show_progress=False, compile_cache_dir=cache_dir)
        self.trainer.feed.close()  # the runs feed fixed device batches
        self.engine, self.model, self.clock = self.trainer.engine, self.trainer.model, Clock(self.cuda)
        self.marks: list = []
        self.notes: List[str] = []
        self.step_impl = self.engine.step
        (instrument_native if engine == "native" else instrument_fsdp2)(self)
        self.batches: Dict[int, tuple] = {}
        self.step_s: Dict[int, float] = {}
        """micro-batch size -> the last timed step's seconds per micro-step (the deadline's estimate)."""
        m, d = cfg.model, cfg.data
        self.meta = {"engine": engine, "plan": self.trainer.plan_line, "params": self.trainer.num_params,
                     "flops_per_token": self.trainer.flops_per_token, "peak_tflops": self.trainer.peak_tflops,
                     "n_layers": m.n_layers, "d_model": m.d_model, "seq_len": d.seq_len, "vocab": d.vocab_size,
                     "dtype": cfg.train.dtype, "compile": compile_on, "device": device,
                     "torch": torch.__version__, "build_s": 0.0, "notes": self.notes}
        self.meta["build_s"] = round(time.perf_counter() - t0, 2)

    # -- steps --
    def _batch(self, micro: int):
        if micro not in self.batches:
            g = torch.Generator().manual_seed(micro)
            tokens = torch.randint(0, self.meta["vocab"], (micro, self.meta["seq_len"] + 1), generator=g)
            tokens = tokens.to(self.meta["device"])
            self.batches[micro] = (tokens[:, :-1], tokens[:, 1:])
        return self.batches[micro]

    def _step(self, micro: int, accum: int):
        inputs, targets = self._batch(micro)
        self.engine.grad_accum = accum  # both engines read it per micro-step
        if hasattr(self.engine, "micro"):  # FSDP2Engine syncs gradients when its count of micro-steps
            self.engine.micro = 0          # reaches a multiple of grad_accum: on this step's last one
        start = self.clock.mark()
        loss = sum(self.engine.micro_step(inputs, targets, scale=1.0 / accum) for _ in range(accum)) / accum
        start_opt = self.clock.mark()
        self.step_impl(LR)
        self.marks += [("optim", start_opt, self.clock.mark()), ("step", start, self.clock.mark())]
        rows = self.engine.take_comm()
        return loss, rows

    def _phases(self, marks, rows) -> dict:
        out = {"step": 0.0, "fwd": 0.0, "bwd": 0.0, "grad": 0.0, "optim": 0.0, "gather": 0.0}
        if self.name == "fsdp2":
            out["gather_copy_out"] = 0.0
        micro = 0.0
        for kind, a, b in marks:
            t = self.clock.ms(a, b)
            if kind == "micro":
                micro += t
            else:
                out[kind] = out.get(kind, 0.0) + t
        grad_inside = self.name == "native"  # FSDP2's runs on its reduce stream, beside the backward
        out["bwd"] = micro - out["fwd"] - (out["grad"] if grad_inside else 0.0)
        out["gather"] += sum(1e3 * r["time_s"] for r in rows if r["op"] == "all_gather")
        out["other"] = out["step"] - micro - out["optim"]
        return out

    def run(self, name: str, micro: int, steps: int, warmup: int, accum: int = 1, deadline=None) -> dict:
        """`warmup` untimed steps (the first compiles), then up to `steps` timed ones."""
        out = {"name": name, "engine": self.name, "micro": micro, "accum": accum}
        tokens = micro * accum * self.meta["seq_len"]
        seen = self.step_s.get(micro)
        if _late(deadline, 0 if seen is None else (warmup + 1) * accum * seen):
            return {**out, "skipped": "time: not started"}
        t0 = time.perf_counter()
        self.marks = []
        for _ in range(warmup):
            self._step(micro, accum)
        self.clock.sync()
        out["warmup_s"] = round(time.perf_counter() - t0, 2)
        warm_step_s = (time.perf_counter() - t0) / max(warmup, 1)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        per_step, walls, loss = [], [], None
        t0 = time.perf_counter()
        for _ in range(steps):
            if deadline and time.time() + (max(walls) if walls else warm_step_s) > deadline:
                out["skipped"] = f"time: {len(walls)} of {steps} timed steps"
                break
            ts = time.perf_counter()
            self.marks = []
            loss, rows = self._step(micro, accum)
            per_step.append((self.marks, rows))
            walls.append(time.perf_counter() - ts)
            self.step_s[micro] = walls[-1] / accum
        self.clock.sync()
        wall = time.perf_counter() - t0
        if walls:
            phases = [self._phases(m, r) for m, r in per_step]
            out.update(steps=len(walls), tokens_per_step=tokens, tokens_per_s=len(walls) * tokens / wall,
                       step_wall_ms=[round(1e3 * w, 2) for w in walls], loss=float(loss),
                       phases_ms={k: statistics.median(p[k] for p in phases) for k in phases[0]},
                       phases_per_step_ms=[{k: round(v, 3) for k, v in p.items()} for p in phases])
        if self.cuda:
            out.update(peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                       reserved_gib=torch.cuda.max_memory_reserved() / 2**30)
        out["dynamo"] = dynamo_counts()
        self._release()
        return out

    def _release(self) -> None:
        self.marks = []
        if self.cuda:  # the other worker's turn: give back what this one's allocator keeps cached
            torch.cuda.empty_cache()

    def toggles(self, micro: int, steps: int, warmup: int, rounds: int, deadline=None) -> dict:
        """Each toggle once a round, rounds one after another (a drifting GPU clock hits them
        alike); each run made and undone on the one model."""
        out = {t.name: {"what": t.what, "runs": []} for t in TOGGLES}
        out["lazy grads + freed logits off"] = {"what": "gradient accumulators allocated at build, logits kept",
                                                "skipped": LAZY_GRADS_SKIP}
        for r in range(rounds):
            for t in TOGGLES:
                if deadline and time.time() > deadline:
                    out[t.name].setdefault("skipped", f"time: round {r + 1} not run")
                    continue
                undo = t.apply(self) if t.apply else (lambda: None)
                try:
                    out[t.name]["runs"].append(self.run(t.name, micro, steps, warmup, deadline=deadline))
                finally:
                    undo()
                    self._release()
        return out

    def profile(self, micro: int, deadline=None) -> dict:
        """One warm step, then one under torch.profiler: the top 20 kernels (CPU: ops) by their
        own time, and which scaled_dot_product_attention backend ran."""
        from torch.profiler import ProfilerActivity, profile

        if deadline and time.time() > deadline:
            return {"skipped": "time"}
        self._step(micro, 1)
        self.clock.sync()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        with profile(activities=activities) as prof:
            self._step(micro, 1)
            self.clock.sync()
        events = prof.key_averages()
        self._release()
        return {"micro": micro, **top_kernels(events, self.cuda), "sdpa": sdpa_backend(events)}

    def checkpoint_stall(self, root: str, micro: int, saves: int, deadline=None) -> dict:
        """Async saves 1..`saves` of this engine, each after the previous one's background write
        ended (stepping meanwhile), then one synchronous save. A save's stall: the loop's time in
        save() plus what the next step took beyond a plain one (it waits on the device for the
        copies, or for the staging's handoff: `guard_wait_s`)."""
        from tierzero.checkpoint.config import CheckpointConfig
        from tierzero.checkpoint.saver import Checkpointer
        from tierzero.recipes.trainer import TrainState

        def checkpointer(async_save: bool, folder: str) -> Checkpointer:
            cfg = CheckpointConfig(every_steps=1, async_save=async_save, fsync=False, keep=1, resume="none")
            return Checkpointer(cfg, os.path.join(root, folder), rank=0, world_size=1, event=lambda *a, **k: None)

        count = {"step": 0}

        def step() -> float:
            t0 = time.perf_counter()
            self._step(micro, 1)
            self.clock.sync()
            self.marks = []
            count["step"] += 1
            return time.perf_counter() - t0

        def state():
            return self.trainer.checkpoint_state(TrainState(count["step"], 0, count["step"] * micro), loss=0.0, lr=LR)

        payload = sum(3 * 4 * u.master.numel() for u in self.engine.units)  # fp32 masters and two moments
        ck = checkpointer(True, "async")
        ck.resume(self.engine)  # checkpoint.resume=none: learns the engine's staging hook, run after a step
        out = {"micro": micro, "payload_gb": payload / 1e9, "saves": []}
        t_stage, plain = time.perf_counter(), []
        for _ in range(3 if self.cuda else 2):
            plain.append(step())
            ck.due(count["step"], 10 ** 9)
        staging = getattr(self.engine, "_staging", None)
        while staging is not None and not staging.ready and not _late(deadline, 30) and len(plain) < 200:
            plain.append(step())  # a run's first save comes after many steps: the staging had its time
        out["plain_step_s"] = plain_s = statistics.median(plain[1:])
        if staging is not None:
            out["staging"] = {"ready_after_s": round(time.perf_counter() - t_stage, 2), "build_s": staging.build_s,
                              "pinned": staging.pinned, "ready": staging.ready}
        for k in range(1, saves + 1):
            write_s = max([s["write_s"] for s in out["saves"] if "write_s" in s], default=10.0)
            if _late(deadline, 2 * write_s) or shutil.disk_usage(root).free < 1.3 * payload:
                out["saves"].append({"save": k, "skipped": "time" if _late(deadline, 2 * write_s) else "disk"})
                continue
            t0 = time.perf_counter()
            ck.save(count["step"], self.engine, state())
            save_s = ck.last_save_s
            next_s = step()
            guard = ck.snapshot.waited_s if ck.snapshot is not None else 0.0
            during = []
            writer = getattr(ck, "_thread", None)  # the background write (Checkpointer's own thread)
            while writer is not None and writer.is_alive() and len(during) < 40 and not _late(deadline, 5):
                during.append(step())  # the background write beside training
            ck.wait()
            out["saves"].append({"save": k, "save_call_s": save_s, "next_step_s": next_s, "guard_wait_s": guard,
                                 "stall_s": save_s + max(0.0, next_s - plain_s), "write_s": time.perf_counter() - t0,
                                 "steps_during_write": len(during),
                                 "step_during_write_s": statistics.median(during) if during else None})
        shutil.rmtree(os.path.join(root, "async"), ignore_errors=True)  # its disk space for the synchronous save
        write_s = max([s["write_s"] for s in out["saves"] if "write_s" in s], default=10.0)
        if _late(deadline, 2 * write_s) or shutil.disk_usage(root).free < 1.3 * payload:
            out["sync"] = {"skipped": "time" if _late(deadline, 2 * write_s) else "disk"}
        else:
            sync = checkpointer(False, "sync")
            sync.save(count["step"], self.engine, state())
            out["sync"] = {"save_s": sync.last_save_s}
        first = next((s for s in out["saves"] if "stall_s" in s), None)
        if first is not None and "save_s" in out["sync"]:
            out["first_stall / sync_save"] = first["stall_s"] / out["sync"]["save_s"]
        self._release()
        return out

    def close(self) -> None:
        self._release()


def _late(deadline: Optional[float], need_s: float) -> bool:
    return deadline is not None and time.time() + need_s > deadline


# ---- the worker process and the coordinator's handle on it ---------------------------------------

def worker_main(conn, engine: str, opts: dict) -> None:
    # both workers' kernels in one folder (the second engine finds the graphs the first compiled),
    # set before torch._dynamo is imported; a folder the user set stays theirs
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", opts["cache_dir"])
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(os.environ["TORCHINDUCTOR_CACHE_DIR"], "triton"))
    import torch._dynamo

    if opts["dry"]:
        torch.set_num_threads(1)  # two workers on a shared 2-core machine
    # one static graph per micro-batch size, as a run at a fixed size compiles; not a dynamic
    # graph after the second size
    torch._dynamo.config.automatic_dynamic_shapes = False
    if opts.get("compile_backend"):
        torch.compile = functools.partial(torch.compile, backend=opts["compile_backend"])
    bench = None
    while True:
        msg = conn.recv()
        if msg is None:
            break
        cmd, kwargs = msg
        try:
            if cmd == "build":
                bench = Bench(engine, dry=opts["dry"], cache_dir=opts["cache_dir"], **kwargs)
                out = bench.meta
            else:
                out = getattr(bench, cmd)(**kwargs)
        except Exception as e:  # the run's result: the coordinator records it and goes on
            out = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-3000:]}
            if bench is not None:
                bench._release()
        conn.send(out)
    if bench is not None:
        bench.close()


class Worker:
    """The coordinator's handle on one engine's worker process."""

    def __init__(self, engine: str, opts: dict):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(child, engine, opts), name=f"gpu-ab-{engine}")
        self.proc.start()
        child.close()
        self.engine, self.gone = engine, None

    def send(self, cmd: str, **kwargs) -> bool:
        if self.gone is None:
            self.conn.send((cmd, kwargs))
        return self.gone is None

    def recv(self, deadline: float) -> dict:
        if self.gone is not None:
            return {"skipped": f"the {self.engine} worker is gone ({self.gone})"}
        if not self.conn.poll(max(0.0, deadline - time.time()) + GRACE_S):
            self.kill(f"no answer {GRACE_S:.0f} s past the deadline")
            return {"skipped": f"time: the {self.engine} worker was stopped {GRACE_S:.0f} s past the deadline"}
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(5)
            self.gone = f"exited with {self.proc.exitcode}"
            return {"error": f"the {self.engine} worker died ({self.gone}): out of host memory, or a crash"}

    def call(self, cmd: str, deadline: float, **kwargs) -> dict:
        t0 = time.time()
        if not self.send(cmd, deadline=deadline, **kwargs):
            return self.recv(deadline)
        out = self.recv(deadline)
        out["call_s"] = round(time.time() - t0, 2)
        if cmd != "run":  # the runs print their own line (_say)
            what = out.get("skipped") or out.get("error", "done").splitlines()[0][:120]
            print(f"#   {self.engine} {cmd}: {what} ({out['call_s']} s)", flush=True)
        return out

    def kill(self, why: str) -> None:
        self.gone = why
        self.proc.terminate()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)

    def close(self) -> None:
        if self.gone is None and self.proc.is_alive():
            try:
                self.conn.send(None)
                self.proc.join(15)
            except OSError:  # the worker is gone already (a SIGINT reaches its process group too)
                pass
        if self.proc.is_alive():
            self.kill("closed")
        self.gone = self.gone or "closed"


def _say(r: dict) -> None:
    """One progress line per baseline run (the device's log)."""
    what = (f"{r['tokens_per_s']:,.0f} tokens/s, warm-up {r.get('warmup_s')} s" if "tokens_per_s" in r
            else r.get("skipped") or r.get("error", "?").splitlines()[0][:120])
    print(f"#   {r['name']}: {what} ({r.get('call_s')} s)", flush=True)


@dataclass
class Session:
    """Sections d and e over the same two workers (e reuses the native process's model)."""
    dry: bool
    work_dir: str
    dry_backend: str = "aot_eager"
    """The dry run's torch.compile backend (inductor: real C++ kernels, minutes on two cores)."""
    workers: Optional[Dict[str, Worker]] = None

    @property
    def opts(self) -> dict:
        backend = self.dry_backend if self.dry and self.dry_backend != "inductor" else None
        return {"dry": self.dry, "cache_dir": os.path.join(self.work_dir, "compile-cache"), "compile_backend": backend}

    def ab(self, deadline: float) -> dict:
        n = STEPS["dry" if self.dry else "gpu"]
        self.workers = w = {e: Worker(e, self.opts) for e in PLANS}
        for worker in w.values():  # both build at once (CPU work: the model's initial values)
            worker.send("build", deadline=deadline)
        out = {"meta": {e: worker.recv(deadline) for e, worker in w.items()}, "runs": [], "profile": {}, "accum8": {}}
        for e, worker in w.items():
            if "error" in out["meta"][e] or "skipped" in out["meta"][e]:
                worker.kill(f"its build failed: {out['meta'][e].get('error', out['meta'][e].get('skipped'))}"[:300])
        for rnd in (1, 2):
            for micro in (2, 4):
                for e, worker in w.items():
                    name = f"{e} micro {micro} run {rnd}"
                    r = worker.call("run", deadline, name=name, micro=micro, steps=n["timed"],
                                    warmup=n["first_warmup"] if rnd == 1 else n["warmup"])
                    out["runs"].append({"name": name, **r, "engine": e, "micro": micro, "run": rnd})
                    _say(out["runs"][-1])
        for e in ("native", "fsdp2"):
            out["profile"][e] = w[e].call("profile", deadline, micro=2)
        out["toggles"] = w["native"].call("toggles", deadline, micro=2, steps=n["toggle"], warmup=n["warmup"],
                                          rounds=2)
        for e in ("native", "fsdp2"):
            out["accum8"][e] = w[e].call("run", deadline, name=f"{e} micro 2 x accum 8", micro=2, steps=n["accum"],
                                         warmup=1, accum=8)
        w["fsdp2"].close()  # e needs only the native process
        try:
            derive(out)
        except Exception as e:  # the runs are the result: keep them whatever the arithmetic does
            out["derive_error"] = f"{type(e).__name__}: {e}: {traceback.format_exc()[-1500:]}"
        failed = [r["name"] for r in out["runs"] if "error" in r] + [f"{e} build" for e, m in out["meta"].items()
                                                                       if "error" in m]
        out["ok"] = not failed
        if failed:
            out["error"] = f"failed: {', '.join(failed)} (the rows say why)"
        return out

    def stall(self, deadline: float) -> dict:
        native = (self.workers or {}).get("native")
        out = {}
        if native is None or native.gone is not None:  # d lost it: a fresh, eager one (the stall needs no compile)
            native = Worker("native", self.opts)
            self.workers = {**(self.workers or {}), "native": native}
            native.send("build", deadline=deadline, compile_on=False)
            out["rebuilt"] = native.recv(deadline)
        root = tempfile.mkdtemp(prefix="ckpt-", dir=self.work_dir)
        try:
            out.update(native.call("checkpoint_stall", deadline, root=root, micro=2, saves=3))
        finally:
            shutil.rmtree(root, ignore_errors=True)
        out["ok"] = "error" not in out
        return out

    def close(self) -> None:
        for worker in (self.workers or {}).values():
            worker.close()
