"""`tierzero`: the one console script. main(argv) -> exit code (0 ok, 2 user error, 1 failure)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from tierzero.launcher.config import ConfigError, check_world, describe_keys, load_config, to_yaml
from tierzero.launcher.exitcodes import Exit, killed_by

log = logging.getLogger("tierzero")


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{self.prog}: {message}\n{self.format_usage().strip()}")


def _split_args(items: Sequence[str]) -> Tuple[List[str], List[str]]:
    files, overrides = [], []
    for item in items:
        if item.startswith("-"):
            raise UsageError(
                f"unknown option {item!r}. Config values are set as trailing key=value without dashes, "
                f"e.g. `tierzero run train.steps=100 launcher.nproc=2`; see `tierzero config --describe`."
            )
        (overrides if "=" in item else files).append(item)
    return files, overrides


def _setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = f"[rank {rank}] %(levelname)s %(name)s: %(message)s" if rank >= 0 else "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)


# ---- subcommands ---------------------------------------------------------------------

def _launch(args, program: str) -> int:
    from tierzero.launcher.modes import detect_launch
    from tierzero.launcher.program import PROGRAMS, launch_program

    files, overrides = _split_args(args.items)
    launch = detect_launch(os.environ)
    _setup_logging(launch.rank)
    cfg = load_config(files, overrides)
    return launch_program(PROGRAMS[program], cfg, launch, os.environ)


def cmd_run(args) -> int:
    return _launch(args, "run")


def cmd_bench(args) -> int:
    return _launch(args, "probe" if args.probe else "bench")


def cmd_ckpt(args) -> int:
    try:
        return _ckpt(args)
    except (UsageError, BrokenPipeError):
        raise
    except Exception as e:  # credentials, network, permissions: say what and where, no traceback
        print(f"tierzero ckpt {args.action}: cannot read {args.path}: {type(e).__name__}: {e}", file=sys.stderr)
        return Exit.FAILURE


def _ckpt(args) -> int:
    from tierzero.checkpoint.inspect import inspect_lines, list_lines
    from tierzero.checkpoint.store import CheckpointError, CheckpointStore, open_step
    from tierzero.launcher.locations import CHECKPOINTS, STEP, folder_problem, location_problem

    if args.action == "convert":
        return _convert(args)
    if args.to is not None:
        raise UsageError(f"tierzero ckpt {args.action}: --to is for convert, e.g. `tierzero ckpt convert SRC DST --to dcp`")
    # the URL before any I/O (ftp://host/... would look the host up), then what is there
    problem = location_problem(args.path) or folder_problem(args.path, CHECKPOINTS if args.action == "list" else STEP)
    if problem:
        print(f"tierzero ckpt {args.action}: {problem}", file=sys.stderr)
        return Exit.USAGE
    if args.action == "list":
        store = CheckpointStore(args.path)
        steps = store.steps()
        sizes = {s: store.fs.du(store.step_path(s)) for s, _ in steps}
        print("\n".join(list_lines(args.path, steps, sizes)))
        return Exit.OK
    store, path = open_step(args.path)
    if args.action == "verify":
        manifest, problems = store.verify(path, resumable=True)  # what a resume needs, too
        if problems:
            for p in problems:
                print(f"FAILED: {p}")
            print(f"tierzero ckpt verify: {len(problems)} problem(s) in {args.path}", file=sys.stderr)
            return Exit.FAILURE
        pieces = sum(len(t.pieces) for t in manifest.tensors.values())
        nbytes = sum(t.nbytes for t in manifest.tensors.values())
        print(f"OK: {args.path}: step {manifest.step}, {len(manifest.tensors)} tensors, {pieces} pieces, "
              f"{nbytes / 1e6:.2f} MB, every checksum matches, and a resume has the state and tensors it needs")
        return Exit.OK
    try:
        manifest = store.manifest(path)
    except CheckpointError as e:
        print(f"tierzero ckpt {args.action}: {e}", file=sys.stderr)
        return Exit.FAILURE
    if args.action == "inspect":
        print("\n".join(inspect_lines(args.path, manifest)))
        return Exit.OK
    return _export(args, store, path, manifest)


def _export(args, store, path: str, manifest) -> int:
    """tierzero ckpt export STEP_DIR OUT_DIR|OUT.safetensors: the output or a checkpoint without its
    run config is the user's to fix (exit 2); an unreadable checkpoint is a failure (exit 1)."""
    from tierzero.checkpoint.export import ExportError, export_step
    from tierzero.checkpoint.store import CheckpointError

    if not args.out:
        raise UsageError("tierzero ckpt export STEP_DIR OUT_DIR [--dtype bf16|fp32]: give the folder to write "
                         "(config.json + model.safetensors), or a file ending in .safetensors for the weights alone")
    try:
        done = export_step(manifest, store.reader(path, manifest), args.out, dtype=args.dtype,
                           max_shard_bytes=int(args.max_shard_gb * 1e9))
    except CheckpointError as e:
        print(f"tierzero ckpt export: {e}", file=sys.stderr)
        return Exit.FAILURE
    except ExportError as e:  # the input or the output the user named cannot be used safely: theirs to fix
        print(f"tierzero ckpt export: {e}", file=sys.stderr)
        return Exit.USAGE
    target = done.target
    if not target.hf_class:
        what = "tierzero's documented names, no transformers class"
    elif args.out.endswith(".safetensors"):
        what = (f"{target.hf_class} names, no config.json: `tierzero ckpt export STEP_DIR OUT_DIR` writes the "
                "folder transformers loads")
    else:
        what = f"{target.hf_class}"
    files = f" {', '.join(done.files)};" if len(done.files) > 2 else ""  # sharded: name the files
    print(f"wrote {args.out}:{files} {done.num_tensors} tensors, {done.nbytes / 1e6:.2f} MB, {args.dtype} ({what})")
    for note in target.notes:
        print(f"note: {note}")
    if target.unrepresented:
        print("tierzero ckpt export: no transformers class computes this model exactly, so config.json names no "
              "class (model_type tierzero_moe) and the tensors keep tierzero's documented names (docs/checkpoint.md, "
              "\"Hugging Face\"); what no class represents: " + "; ".join(target.unrepresented), file=sys.stderr)
    return Exit.OK


def _convert(args) -> int:
    """tierzero ckpt convert SRC DST --to dcp|tierzero: DcpError/CheckpointError -> exit 2 (the
    source or destination is the user's to fix), the message naming path and entry."""
    from tierzero.checkpoint.dcp import DcpError, check_destination, source_kind, write_dcp, write_tierzero
    from tierzero.checkpoint.store import CheckpointError
    from tierzero.launcher.locations import DCP, STEP_OR_CHECKPOINTS, folder_problem, location_problem

    if args.to is None or not args.out:
        raise UsageError("tierzero ckpt convert SRC DST --to dcp|tierzero: give the source, the destination (a new "
                         "or empty folder) and the format to write")
    try:
        # SRC's URL and DST (local only; checked again where it is written) before any I/O on SRC
        problem = location_problem(args.path)
        if problem:
            raise DcpError(problem)
        check_destination(args.out)
        problem = folder_problem(args.path, STEP_OR_CHECKPOINTS if args.to == "dcp" else DCP)
        if problem:
            raise DcpError(problem)
        if args.to == "dcp":
            src, manifest, nbytes = write_dcp(args.path, args.out)
            print(f"wrote {args.out}: DCP checkpoint of {src}: step {manifest.step}, {len(manifest.tensors)} tensors, "
                  f"{nbytes / 1e6:.2f} MB (model.*, optimizer.state.*, train_state.*)")
            return Exit.OK
        kind = source_kind(args.path)
        if kind in ("step", "steps"):
            raise DcpError(f"{args.path} is already a tierzero checkpoint; `--to dcp` converts it to DCP")
        if kind != "dcp":
            raise DcpError(f"{args.path} is not a DCP checkpoint folder (no .metadata in it)")
        loaded, step, written = write_tierzero(args.path, args.out)
    except (DcpError, CheckpointError) as e:
        print(f"tierzero ckpt convert: {e}", file=sys.stderr)
        return Exit.USAGE
    except OSError as e:  # disk full, permissions: nothing was left at DST
        print(f"tierzero ckpt convert: {args.path} -> {args.out} failed, nothing written there: "
              f"{type(e).__name__}: {e}", file=sys.stderr)
        return Exit.FAILURE
    nbytes = sum(t.numel() * t.element_size() for t in loaded.tensors.values())
    skipped = f"; not read: {', '.join(loaded.ignored[:4])}{' ...' if len(loaded.ignored) > 4 else ''}" \
        if loaded.ignored else ""
    print(f"wrote {written}: tierzero checkpoint of {args.path}: step {step}, next sample "
          f"{loaded.state['next_sample']}, {len(loaded.tensors)} tensors, {nbytes / 1e6:.2f} MB{skipped}\n"
          f"resume with checkpoint.resume={args.out}")
    return Exit.OK


def cmd_config(args) -> int:
    if args.describe and args.markdown:
        from tierzero.launcher.config import describe_markdown

        print(describe_markdown(), end="")
        return Exit.OK
    if args.describe:
        rows = describe_keys()
        width = max(len(r[0]) for r in rows)
        for key, tname, default, doc in rows:
            print(f"{key:<{width}}  {tname:<14} default {default!r:<12} {doc}")
        return Exit.OK
    files, overrides = _split_args(args.items)
    cfg = load_config(files, overrides)
    print(to_yaml(cfg), end="")
    return Exit.OK


def _config_and_topology(args):
    """The composed config, the launch this process is in, and the topology it describes
    (not checked against the launch: `topo` and `plan` also show presets of other machines)."""
    from tierzero.launcher.discover import build_topology, launch_shape
    from tierzero.launcher.modes import detect_launch

    files, overrides = _split_args(args.items)
    cfg = load_config(files, overrides)
    launch = detect_launch(os.environ)
    world, per_node, nodes = launch_shape(launch, cfg.launcher.nproc)
    topo = build_topology(cfg.topology, world_size=world, ranks_per_node=per_node, num_nodes=nodes, strict=False,
                          inter_node_gbit=cfg.launcher.inter_node_gbit)
    if cfg.topology.measure:
        topo = _measured_topology(cfg, launch)
    return cfg, launch, topo


def _measured_topology(cfg, launch):
    """topology.measure=true outside a run: spawn the local ranks and measure each level."""
    from tierzero.launcher.program import measure_locally

    problems = []
    if cfg.topology.preset:
        problems.append(
            f"topology.measure=true measures the links of this machine, but topology.preset={cfg.topology.preset} "
            "describes another one; drop one of them (topology.preset=null or topology.measure=false)"
        )
    if launch.mode != "local":
        problems.append(
            f"topology.measure=true in `tierzero plan` spawns local ranks, but this process is a {launch.mode} rank; "
            "run the plan outside the job, or measure inside it with `tierzero bench --probe` / "
            "`tierzero run topology.measure=true`"
        )
    if problems:
        raise ConfigError(problems)
    return measure_locally(cfg)


def cmd_topo(args) -> int:
    from tierzero.launcher.discover import probe_machine

    cfg, launch, topo = _config_and_topology(args)
    machine = probe_machine()
    print(f"mode      {launch.mode}" + (" (would spawn launcher.nproc local ranks)" if launch.mode == "local" else ""))
    print(f"ranks     {topo.world_size}  ({topo.num_nodes} node(s) x {topo.ranks_per_node} ranks)")
    print(f"host      {machine.host}: {machine.cpus} CPUs, {machine.numa_nodes} NUMA node(s)")
    if machine.gpus:
        for g in machine.gpus:
            links = f"NVLink to {list(g.nvlink_peers)}" if g.nvlink_peers else "PCIe only"
            numa = f"NUMA {g.numa_node}" if g.numa_node is not None else "NUMA ?"
            print(f"gpu {g.index:<5} {g.name}, {g.memory_bytes / 2**30:.0f} GiB, {links}, {numa}")
    else:
        print("devices   CPU only")
    for note in machine.notes:
        print(f"note      {note}")
    print(f"topology  {topo.describe()}  (source: {topo.source})")
    print(f"{'level':<10} {'fan-out':>7} {'span':>6} {'GB/s':>8}  groups")
    for lv in topo.levels:
        groups = topo.groups_within(lv.name)
        shown = ", ".join(str(g) if len(g) <= 8 else f"[{g[0]}..{g[-1]}]" for g in groups[:4])
        more = f" ... ({len(groups)} groups)" if len(groups) > 4 else ""
        bw = f"{lv.bandwidth_gbps:g}" if lv.bandwidth_gbps else "?"
        print(f"{lv.name:<10} {lv.size:>7} {topo.span(lv.name):>6} {bw:>8}  {shown}{more}")
    return Exit.OK


def cmd_plan(args) -> int:
    import time

    from tierzero.launcher.discover import memory_budget_bytes
    from tierzero.parallel.choose import resolve_plan
    from tierzero.parallel.engines import ENGINES
    from tierzero.parallel.plans import PlanError
    from tierzero.recipes.planning import planning_inputs

    t0, cpu0 = time.perf_counter(), time.process_time()
    cfg, _, topo = _config_and_topology(args)
    problems = check_world(cfg, topo.world_size, batch=False)
    if problems:
        raise ConfigError(problems)
    inputs = planning_inputs(train_cfg=cfg.train, model_cfg=cfg.model, data_cfg=cfg.data, moe_cfg=cfg.moe,
                             ep=cfg.parallel.ep, world_size=topo.world_size, reduce_dtype=cfg.parallel.reduce_dtype)
    budget = memory_budget_bytes(cfg.parallel, topo, device="cpu", local_world_size=topo.ranks_per_node)
    try:  # the plan `tierzero run` would use: auto narrowed to what the engine runs
        chosen = ENGINES[cfg.parallel.engine].restrict(
            resolve_plan(cfg.parallel, topo, inputs, memory_budget_bytes=budget), topo)
    except PlanError as e:
        raise ConfigError([str(e)]) from e
    for line in _plan_table(cfg, topo, inputs, budget, chosen):
        print(line)
    print(f"# planned in {time.perf_counter() - t0:.3f} s ({time.process_time() - cpu0:.3f} s CPU)")
    return Exit.OK


def _plan_table(cfg, topo, inputs, budget: float, chosen) -> List[str]:
    """`tierzero plan`'s lines: a header, one row per named plan (and auto's pick), the choice."""
    from tierzero.parallel.choose import named_costs
    from tierzero.parallel.cost import DEFAULT_BANDWIDTH_GBPS

    # each named plan as configured (parallel.grad_sync=auto: its pick, ",sync=step" in its label)
    rows = named_costs(cfg.parallel, topo, inputs, memory_budget_bytes=budget)
    if all(r.plan != chosen.plan for r in rows):
        rows.append(chosen.cost)
    moe, with_update = inputs.moe is not None, bool(topo.update_gelems_per_s)
    with_codec = any(r.codec_s for r in rows)
    out = [f"# {note}" for note in inputs.notes]
    out.append(f"# tierzero plan | {topo.world_size} ranks | topology {topo.describe()} ({topo.source})")
    if with_update:
        out.append(f"# optimizer update measured at {topo.update_gelems_per_s:.3g}e9 params/s per rank (every rank "
                   "at once): 'update s' is this rank's optimizer shard at that rate; auto minimises comm s + update s")
    out.append(f"# model {inputs.model_summary} | {cfg.train.dtype} | grad accum {inputs.grad_accum} | "
               f"memory budget {budget / 1e9:.3g} GB/rank | bytes are sent per rank per optimizer step")
    out.append(f"# mem/rank = model states + the engine's buffers in flight + {inputs.activation_bytes / 1e9:.3g} GB "
               f"of activations (one micro-batch of {cfg.train.micro_batch_size} x {cfg.data.seq_len} tokens, "
               "no activation checkpointing)")
    label_w = max(len(r.plan.describe(topo)) for r in rows) + 2
    head = f"{'plan':<{label_w}}{'mem/rank GB':>12}" + "".join(f"{lv.name + ' GB':>13}" for lv in topo.levels)
    head += f"{'experts GB':>11}{'a2a GB':>9}" if moe else ""
    if not with_codec and any(r.plan.quant.active for r in rows):
        out.append("# the quantized plans' encoding and decoding is not charged: its rate is unmeasured "
                   "(topology.measure=true measures it; on a GPU it is small, on CPU ranks it can outweigh the bytes)")
    if with_codec:
        out.append(f"# block quantization measured at {topo.codec_gelems_per_s:.3g}e9 elements/s per rank: 'codec s' "
                   "is the encoding and decoding a quantized plan adds; auto minimises it too")
    out.append(head + f"{'comm s':>10}" + (f"{'update s':>10}" if with_update else "")
               + (f"{'codec s':>10}" if with_codec else "") + "  fits")
    for r in rows:
        by_level = r.bytes_by_level()
        cells = "".join(f"{by_level.get(lv.name, 0.0) / 1e9:>13.4g}" for lv in topo.levels)
        if moe:
            a2a = sum(b for (_, _, op), b in r.bytes.items() if op == "all_to_all")
            cells += f"{r.expert_memory / 1e9:>11.4g}{a2a / 1e9:>9.4g}"
        update = (f"{r.update_s:>10.4g}" if with_update else "") + (f"{r.codec_s:>10.4g}" if with_codec else "")
        out.append(f"{r.plan.describe(topo):<{label_w}}{r.memory_total / 1e9:>12.4g}{cells}{r.comm_time_s:>10.4g}"
                   f"{update}  {'yes' if r.fits else 'NO'}{' <- auto' if r.plan == chosen.plan else ''}")
    if moe:
        out.append("# experts GB = the routed experts' share of mem/rank; a2a GB = the experts' all-to-all per step "
                   f"(uniform routing, moe.dispatch={cfg.moe.dispatch}), included in the level columns at the "
                   "level each row crosses")
    unknown = [lv.name for lv in topo.levels if not lv.bandwidth_gbps]
    if unknown:
        out.append(f"# bandwidth of {', '.join(unknown)} unknown: {DEFAULT_BANDWIDTH_GBPS:g} GB/s assumed "
                   "(set topology.bandwidths_gbps or use a preset)")
    out.append(f"{'auto' if cfg.parallel.plan == 'auto' else 'chosen'}: {chosen.plan.describe(topo)} -- {chosen.reason}")
    return out


def cmd_report(args) -> int:
    from tierzero.launcher.locations import location_problem
    from tierzero.telemetry.report import write_report

    problem = location_problem(args.run_dir)  # before any I/O: ftp://host/... would look the host up
    if problem:
        print(f"tierzero report: {problem}", file=sys.stderr)
        return Exit.USAGE
    try:  # the argument as typed: Path() would fold a URL's // (s3://b/run -> s3:/b/run, a local name)
        text = write_report(args.run_dir, check_location=location_problem)
    except ValueError as e:  # not a run folder, or no telemetry: the user's to fix
        print(f"tierzero report: {e}", file=sys.stderr)
        return Exit.USAGE
    print(text, end="" if text.endswith("\n") else "\n")
    return Exit.OK


def cmd_sbatch(args) -> int:
    from tierzero.launcher.rundir import RunPaths, claim_run_dir, resolved, write_atomic
    from tierzero.slurm.sbatch import ScriptSpec, SbatchError, render_sbatch
    from tierzero.slurm.submit import SubmitError, script_syntax_problems, submit

    files, overrides = _split_args(args.items)
    cfg = load_config(files, overrides)
    slurm = cfg.slurm
    problems = []
    if slurm.command == "run":
        problems += [p + f" (the job has slurm.nodes={slurm.nodes} x {slurm.ranks_per_node()} ranks)"
                     for p in check_world(cfg, slurm.nodes * slurm.ranks_per_node())]
    paths = RunPaths.of(cfg)
    config_path = paths.config if slurm.command == "run" else paths.bench_config
    spec = ScriptSpec(run_name=cfg.run.name, run_dir=str(paths.run_dir), config_path=str(config_path),
                      exit_requeue=int(Exit.REQUEUE), requeue_signal=cfg.launcher.requeue_signal)
    try:
        text = render_sbatch(slurm, spec)
    except SbatchError as e:
        problems += e.problems
    else:  # a script bash cannot parse (a slurm.setup line) would fail only once the job starts
        problems += script_syntax_problems(text, slurm.setup)
    if problems:  # all of them at once, before anything is written (or submitted)
        raise ConfigError(problems)
    # this run's folder (not another run's, not one in use), not held: the job takes the lock when it runs
    claim_run_dir(cfg, paths, program=slurm.command, hold_lock=False)
    write_atomic(config_path, to_yaml(resolved(cfg, paths)))
    script = write_atomic(paths.sbatch(slurm.command), text)
    if not args.quiet:
        print(text, end="")
    print(f"tierzero sbatch: wrote {script}", file=sys.stderr)
    if not args.submit:
        print(f"tierzero sbatch: submit with `sbatch {script}` or `tierzero sbatch --submit ...`", file=sys.stderr)
        return Exit.OK
    try:
        job_id = submit(script)
    except SubmitError as e:
        print(f"tierzero sbatch: {e}", file=sys.stderr)
        return Exit.FAILURE
    print(f"submitted job {job_id}", flush=True)
    return Exit.OK


def cmd_slurm(args) -> int:
    from tierzero.slurm.cluster import BaseFolderError, ClusterError, cluster_status, create_cluster, destroy_cluster

    try:
        if args.action == "up":
            lines = create_cluster(args.dir, args.nodes, args.cpus_per_node, install=args.install, port=args.port)
        elif args.action == "down":
            lines = destroy_cluster(args.dir, purge=args.purge)
        else:
            lines = cluster_status(args.dir)
    except ClusterError as e:
        print(f"tierzero slurm {args.action}: {e}", file=sys.stderr)
        return Exit.USAGE if isinstance(e, BaseFolderError) else Exit.FAILURE
    print("\n".join(lines))
    if args.action != "down" and (Path(args.dir) / "slurm.conf").is_file():
        print(f"export SLURM_CONF={(Path(args.dir) / 'slurm.conf').resolve()}")
    return Exit.OK


class _PathsParser(_Parser):
    """`tierzero data prepare IN... --tokenizer T OUT`: argparse fills a positional list only up to
    the first option, so the paths after it come back as extras; put them back, in order."""

    def parse_known_args(self, args=None, namespace=None):
        ns, extras = super().parse_known_args(args, namespace)
        unknown = [e for e in extras if e.startswith("-")]
        if unknown:
            self.error(f"unknown option {unknown[0]!r}; the options are listed by `{self.prog} --help`")
        ns.paths = list(ns.paths or []) + extras
        return ns, []


def cmd_data(args) -> int:
    """tierzero data prepare: a bad input, tokenizer or OUT_DIR -> exit 2 naming it; a disk or
    worker failure -> exit 1. Either way OUT_DIR is not created (docs/data.md)."""
    from tierzero.recipes.prepare import PrepareError, write_prepared

    usage = "tierzero data prepare INPUT... --tokenizer PATH OUT_DIR"
    if getattr(args, "data_action", None) != "prepare":
        raise UsageError(f"tierzero data: give the action, e.g. `{usage}`; see `tierzero data prepare --help`")
    if len(args.paths) < 2:
        raise UsageError(f"{usage}: give the input files (or folders) and, last, the folder to write")
    *inputs, out_dir = args.paths
    # no ranks here: progress (INFO) and warnings as plain lines on stderr
    logging.basicConfig(level=logging.INFO, format="tierzero data prepare: %(message)s", stream=sys.stderr,
                        force=True)

    def _terminated(signum, frame):  # SIGTERM unwinds like Ctrl-C, so the temp folder is removed
        raise SystemExit(killed_by(signum))

    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        done = write_prepared(inputs, args.tokenizer, out_dir, field=args.field, column=args.column,
                              num_workers=args.workers, eos_token=args.eos_token)
    except PrepareError as e:
        lines = e.problems if len(e.problems) == 1 else ["cannot prepare:"] + [f"  - {p}" for p in e.problems]
        print("tierzero data prepare: " + "\n".join(lines), file=sys.stderr)
        return Exit.USAGE
    except OSError as e:  # disk full, permissions: the temp folder is gone, OUT_DIR never appeared
        print(f"tierzero data prepare: writing {out_dir} failed, nothing was written there: {type(e).__name__}: {e}",
              file=sys.stderr)
        return Exit.FAILURE
    finally:
        signal.signal(signal.SIGTERM, previous)
    tok = done.tokenizer
    empty = f", {done.num_empty:,} empty skipped" if done.num_empty else ""
    print(f"wrote {out_dir}: tokens.bin ({done.num_tokens:,} tokens, {tok.dtype}) + tokens.json; "
          f"{done.num_documents:,} documents{empty} from {done.num_sources} input(s), {done.input_bytes / 1e6:.2f} MB, "
          f"in {done.elapsed_s:.1f} s ({done.input_bytes / 1e6 / max(done.elapsed_s, 1e-9):.2f} MB/s, "
          f"{done.num_tokens / max(done.elapsed_s, 1e-9):,.0f} tokens/s, {done.num_workers} worker(s)); "
          f"EOS {tok.eos_token!r} (id {tok.eos_id}) after each document")
    print(f"train on it: tierzero run dense_tiny_cpu data.kind=tokens data.path={done.tokens_path} "
          f"data.token_dtype={tok.dtype} data.vocab_size={tok.num_ids}")
    return Exit.OK


# ---- parser --------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:  # long: a declarative table, one block per subcommand
    fmt = argparse.RawDescriptionHelpFormatter
    p = _Parser(
        prog="tierzero",
        description="Launch, partition and observe distributed training on HPC clusters.",
        epilog="examples:\n  tierzero run                      # default MoE recipe on 4 local CPU ranks\n"
               "  tierzero run train.steps=50 launcher.nproc=2\n  tierzero report runs/moe-tiny-cpu",
        formatter_class=fmt,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser(
        "run", help="train: spawn local ranks, or join torchrun / srun / mpirun",
        description="Run the training recipe. With no scheduler around it spawns launcher.nproc local "
                    "ranks; under torchrun, srun or mpirun each process joins as one rank.",
        epilog="examples:\n  tierzero run\n  tierzero run recipes/configs/dense_tiny_cpu.yaml train.steps=100\n"
               "  tierzero run topology.emulate=[2,2] run.name=two-nodes\n"
               "  tierzero run dense_tiny_cpu                 # the dense recipe instead of the MoE default\n"
               "  tierzero run topology.emulate=[2,2] parallel.plan=zeropp   # ZeRO++: hpZ + int8 weights + int4 grads\n"
               "  torchrun --nproc-per-node 4 -m tierzero.launcher.cli run\n  mpirun -n 4 tierzero run",
        formatter_class=fmt)
    run.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value",
                     help="YAML files (merged in order) then key=value overrides; default: the moe_tiny_cpu recipe")
    run.set_defaults(func=cmd_run)

    config = sub.add_parser(
        "config", help="print the resolved config (defaults < YAML files < key=value)",
        description="Print the config a run would use, after composing defaults, YAML files and overrides.",
        epilog="examples:\n  tierzero config\n  tierzero config my.yaml train.lr=1e-3\n  tierzero config --describe",
        formatter_class=fmt)
    config.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value")
    config.add_argument("--describe", action="store_true", help="list every key with its type, default and meaning")
    config.add_argument("--markdown", action="store_true", help="with --describe: the table of docs/config.md")
    config.set_defaults(func=cmd_config)

    topo = sub.add_parser(
        "topo", help="print the launch mode, ranks, nodes, devices and topology levels",
        description="Show what tierzero sees: launch mode, ranks, nodes, CPUs/GPUs and links, and the "
                    "topology levels (detected, emulated or a preset).",
        epilog="examples:\n  tierzero topo\n  tierzero topo topology.emulate=[2,2]\n"
               "  tierzero topo topology.preset=frontier topology.nodes=48",
        formatter_class=fmt)
    topo.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value")
    topo.set_defaults(func=cmd_topo)

    plan = sub.add_parser(
        "plan", help="memory and traffic per level for every partition plan, and auto's choice",
        description="For the detected, emulated or preset topology and the model (the recipe's, or "
                    "model.params=N), print one row per plan: memory per rank, bytes each rank sends per "
                    "level per optimizer step, predicted communication time, whether it fits; then the "
                    "plan auto picks and why.",
        epilog="examples:\n  tierzero plan topology.emulate=[2,2]\n"
               "  tierzero plan topology.emulate=[2,2] parallel.quant_weights=auto parallel.quant_grads=auto\n"
               "  tierzero plan topology.preset=frontier topology.nodes=48 model.params=20e9 model.n_layers=44 train.dtype=bfloat16 "
               "train.global_batch_size=384 train.micro_batch_size=1\n"
               "  tierzero plan parallel.plan=tiered parallel.levels=[package,node,cluster] topology.emulate=[2,2,2] "
               "launcher.nproc=8",
        formatter_class=fmt)
    plan.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value")
    plan.set_defaults(func=cmd_plan)

    bench = sub.add_parser(
        "bench", help="time every collective across sizes and scopes (nccl-tests units)",
        description="Time all_reduce, reduce_scatter, all_gather, broadcast, all_to_all, reduce and sendrecv "
                    "over a range of message sizes, on the whole world and inside / across each topology "
                    "level, with nccl-tests' algbw and busbw, min/avg/max across ranks and a correctness "
                    "check. Rows go to <run.dir>/telemetry/collectives (Parquet), the plot to "
                    "<run.dir>/bench/busbw.png. Exit 3 when any result is wrong. With no scheduler it "
                    "spawns launcher.nproc local ranks; under torchrun, srun or mpirun each process joins.",
        epilog="examples:\n  tierzero bench\n  tierzero bench bench.ops=[all_reduce,all_gather] bench.sizes=1M:64M\n"
               "  tierzero bench topology.emulate=[2,2] launcher.isolate_network=true launcher.inter_node_gbit=1\n"
               "  mpirun -n 4 tierzero bench bench.backend=mpi\n"
               "  tierzero bench --probe topology.emulate=[2,2]   # measure each level's bandwidth only",
        formatter_class=fmt)
    bench.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value",
                       help="YAML files then key=value overrides; bench.* keys choose ops, sizes, dtypes, scopes")
    bench.add_argument("--probe", action="store_true",
                       help="only measure each topology level's bandwidth (what topology.measure=true does) "
                            "and write <run.dir>/bench/topology.json")
    bench.set_defaults(func=cmd_bench)

    ckpt = sub.add_parser(
        "ckpt", help="list, inspect, verify, export or convert checkpoints",
        description="Work with tierzero checkpoints (global tensors + shard files + commit marker). "
                    "list DIR: every step folder, committed or torn. inspect PATH: tensors, shapes, layout, bytes, "
                    "and the saved state. verify PATH: read every piece back and check its crc32 (exit 1 naming "
                    "file and tensor on a mismatch). export PATH OUT_DIR: a folder "
                    "transformers' AutoModelForCausalLM.from_pretrained loads, config.json included (dense -> Llama, "
                    "softmax top-k MoE -> Mixtral, sigmoid MoE with shared experts -> GLM-4.5); start a run from it "
                    "with checkpoint.init_from=OUT_DIR, or from a published Llama/Mixtral with model.from_hf=DIR. "
                    "convert SRC DST --to dcp|tierzero: a torch.distributed.checkpoint (DCP) folder of the same "
                    "global tensors, training state and optimizer state, and back, bit-exact (DST: a new or empty "
                    "folder; docs/checkpoint.md has the DCP key layout).",
        epilog="examples:\n  tierzero ckpt list runs/moe-tiny-cpu/checkpoints\n"
               "  tierzero ckpt inspect runs/moe-tiny-cpu/checkpoints/step-00000100\n"
               "  tierzero ckpt verify s3://bucket/run/checkpoints/step-00000100\n"
               "  tierzero ckpt export runs/moe-tiny-cpu/checkpoints/step-00000100 hf/moe-tiny   # a Mixtral folder\n"
               "  tierzero ckpt export runs/dense-tiny-cpu/checkpoints/step-00000200 hf/dense --dtype bf16\n"
               "  tierzero ckpt export runs/moe-tiny-cpu/checkpoints/step-00000100 weights.safetensors  # one file\n"
               "  tierzero ckpt convert runs/moe-tiny-cpu/checkpoints/step-00000100 dcp-100 --to dcp\n"
               "  tierzero ckpt convert dcp-100 converted --to tierzero   # then checkpoint.resume=converted",
        formatter_class=fmt)
    ckpt.add_argument("action", choices=("list", "inspect", "verify", "export", "convert"))
    ckpt.add_argument("path", metavar="PATH", help="a checkpoint folder (step-...) or, for list, the folder above")
    ckpt.add_argument("out", nargs="?", metavar="OUT",
                      help="export: the folder to write (config.json + model.safetensors, or shards and "
                           "model.safetensors.index.json); a path ending in .safetensors writes that one file, "
                           "the weights alone (what earlier versions wrote). convert: DST")
    ckpt.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                      help="export: fp32 (the saved masters, exact; default) or bf16 (rounded to nearest even)")
    ckpt.add_argument("--max-shard-gb", type=float, default=5.0, metavar="GB",
                      help="export: the largest weights file before the folder is sharded with an index "
                           "(default 5, transformers' own)")
    ckpt.add_argument("--to", choices=("dcp", "tierzero"), default=None,
                      help="convert: the format to write (dcp: torch.distributed.checkpoint; tierzero: back)")
    ckpt.set_defaults(func=cmd_ckpt)

    report = sub.add_parser(
        "report", help="summarise a run's telemetry and plot loss and throughput",
        description="Read RUN_DIR's Parquet telemetry; print steps, median tokens/s, first/last loss and "
                    "events; write PNG plots into RUN_DIR/report/.",
        epilog="example:\n  tierzero report runs/moe-tiny-cpu", formatter_class=fmt)
    report.add_argument("run_dir", metavar="RUN_DIR")
    report.set_defaults(func=cmd_report)
    sbatch = sub.add_parser(
        "sbatch", help="render (and --submit) a Slurm batch script for this run",
        description="Render an sbatch script from the slurm.* keys: one rank per Slurm task (srun), rendezvous "
                    "at the first node, Slurm's output in the run dir, and before the time limit "
                    "(slurm.signal_margin_s) launcher.requeue_signal: the ranks checkpoint and exit 75 and the job "
                    "requeues itself and resumes. The resolved config and the script (<run.dir>/sbatch.sh) are "
                    "written into the run dir and the script is printed. slurm.command=bench with "
                    "slurm.sweep_nodes=[1,2,4] renders a job array of collective sweeps into one run dir.",
        epilog="examples:\n  tierzero sbatch slurm.nodes=2 slurm.ntasks_per_node=4 slurm.time=02:00:00\n"
               "  tierzero sbatch dense_tiny_cpu slurm.nodes=2 slurm.ntasks_per_node=2 run.name=d2 --submit\n"
               "  tierzero sbatch slurm.partition=gpu slurm.gpus_per_node=8 slurm.account=proj "
               "'slurm.setup=[module load cuda, source ~/venv/bin/activate]'\n"
               "  tierzero sbatch slurm.command=bench slurm.sweep_nodes=[1,2] run.name=sweep --submit",
        formatter_class=fmt)
    sbatch.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value")
    sbatch.add_argument("--submit", action="store_true", help="submit with sbatch and print the job id")
    sbatch.add_argument("--quiet", action="store_true", help="do not print the script (it is still written)")
    sbatch.set_defaults(func=cmd_sbatch)

    slurm = sub.add_parser(
        "slurm", help="a real local Slurm with emulated nodes: up, down, status",
        description="Start (up), stop (down) or show (status) a real Slurm on this host: munged, slurmctld and "
                    "one slurmd per emulated node (Debian's slurmctld, slurmd, slurm-client and munge packages), "
                    "everything under --dir. up is idempotent and starts with an empty queue; down stops only "
                    "the daemons up started. Client commands need the printed `export SLURM_CONF=...`.",
        epilog="examples:\n  tierzero slurm up --nodes 2\n  export SLURM_CONF=/tmp/tierzero-slurm/slurm.conf\n"
               "  tierzero sbatch dense_tiny_cpu slurm.nodes=2 slurm.ntasks_per_node=2 --submit\n"
               "  tierzero slurm status\n  tierzero slurm down",
        formatter_class=fmt)
    slurm.add_argument("action", choices=("up", "down", "status"))
    slurm.add_argument("--nodes", type=int, default=2, help="emulated nodes (up; default 2)")
    slurm.add_argument("--cpus-per-node", type=int, default=None,
                       help="CPUs each emulated node offers (up; default: this host's CPU count)")
    slurm.add_argument("--dir", default="/tmp/tierzero-slurm",
                       help="base folder for config, keys, state, logs (default /tmp/tierzero-slurm)")
    slurm.add_argument("--install", action="store_true",
                       help="up: apt-get install the Slurm and munge packages when missing (root)")
    slurm.add_argument("--port", type=int, default=16817,
                       help="up: slurmctld's port; node i's slurmd listens on PORT + i (default 16817)")
    slurm.add_argument("--purge", action="store_true", help="down: also delete the base folder")
    slurm.set_defaults(func=cmd_slurm)

    data = sub.add_parser(
        "data", help="prepare your own text as a token file (tierzero data prepare)",
        description="Work with training data. prepare: tokenize text, JSONL or Parquet into the token file "
                    "data.kind=tokens reads (see `tierzero data prepare --help`).",
        epilog="example:\n  tierzero data prepare corpus/*.jsonl --tokenizer tokenizer.json data/corpus",
        formatter_class=fmt)
    data.set_defaults(func=cmd_data)
    data_sub = data.add_subparsers(dest="data_action", metavar="ACTION", parser_class=_PathsParser)
    prepare = data_sub.add_parser(
        "prepare", help="tokenize text, JSONL or Parquet into a token file + JSON sidecar",
        description="Tokenize INPUT... with a Hugging Face tokenizer.json (the `tokenizers` library) in --workers "
                    "processes and write OUT_DIR/tokens.bin (uint16 when the ids fit, else uint32; what "
                    "data.kind=tokens reads) and OUT_DIR/tokens.json (tokenizer sha256, vocab size, dtype, documents, "
                    "tokens, every input with its size, mtime and sha256). A .txt file is one document; a JSONL line "
                    "(--field) or a Parquet row (--column) is one; a folder stands for its .txt/.jsonl/.parquet "
                    "files, sorted. The tokenizer's EOS follows every document; the bytes are the same whatever "
                    "--workers. OUT_DIR must be new or empty; it appears only when complete (written in a hidden "
                    "temp folder beside it, then renamed), so a killed or failed prepare leaves no OUT_DIR and a "
                    "rerun starts over. Bad input (a line without --field, a file without --column, an empty file, "
                    "no EOS token) -> exit 2 naming it. docs/data.md, \"Preparing your own text\".",
        epilog="examples:\n  tierzero data prepare books/*.txt --tokenizer hf/llama/tokenizer.json data/books\n"
               "  tierzero data prepare crawl.jsonl --field content --tokenizer hf/llama data/crawl --workers 16\n"
               "  tierzero data prepare shards/ --column text --tokenizer tokenizer.json data/shards\n"
               "  tierzero run dense_tiny_cpu data.kind=tokens data.path=data/books/tokens.bin "
               "data.token_dtype=uint16 data.vocab_size=32000   # the line prepare prints",
        formatter_class=fmt)
    prepare.add_argument("paths", nargs="*", metavar="INPUT... OUT_DIR",
                         help="input files or folders (.txt, .jsonl, .parquet), then the folder to write (new or empty)")
    prepare.add_argument("--tokenizer", required=True, metavar="PATH",
                         help="a Hugging Face tokenizer.json, or the folder holding it")
    prepare.add_argument("--field", default="text", help="JSONL: the field holding each document (default text)")
    prepare.add_argument("--column", default="text", help="Parquet: the column holding each document (default text)")
    prepare.add_argument("--workers", type=int, default=None, metavar="N",
                         help="tokenizing processes (default: the CPUs this process may use)")
    prepare.add_argument("--eos-token", default=None, metavar="TOKEN",
                         help="the token written after each document (default: tokenizer_config.json's eos_token, "
                              "else <|endoftext|>, <|end_of_text|>, </s>, <eos>, ... whichever the vocabulary has)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            _split_args(unknown)  # raises the usage error that shows the key=value form
        if not getattr(args, "command", None):
            parser.print_help()
            return Exit.USAGE
        return args.func(args)
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return Exit.USAGE
    except ConfigError as e:
        print("tierzero: config error:", file=sys.stderr)
        for problem in e.problems:
            print(f"  - {problem}", file=sys.stderr)
        return Exit.USAGE
    except KeyboardInterrupt:
        print("tierzero: interrupted", file=sys.stderr)
        return killed_by(signal.SIGINT)
    except BrokenPipeError:
        # output piped into `head` and the like: stop quietly (Python docs, "Note on SIGPIPE")
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return Exit.FAILURE


if __name__ == "__main__":
    sys.exit(main())
