"""The training program: model -> engine -> loop -> telemetry.

Batch layout: optimizer step s reads global samples [s*G, (s+1)*G) (G = global batch).
Micro-step m on data-parallel rank r reads the slice starting at s*G + (m*dp + r)*mb.
Every sample is a pure function of (data.seed, index), so any world size reads the same
global token stream and, with equal-sized micro-batches, computes the same mean loss.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import numpy as np
import psutil
import torch
import torch.distributed as dist

from tierzero.checkpoint.config import CheckpointConfig
from tierzero.parallel.context import DistContext
from tierzero.parallel.engine import DataParallelEngine
from tierzero.parallel.moe import MoEConfig, moe_layers
from tierzero.parallel.plan import MoETraffic, ParallelConfig, resolve_plan
from tierzero.parallel.zero import ShardedEngine, model_units
from tierzero.recipes.config import DataConfig, ModelConfig, TrainConfig
from tierzero.recipes.data import build_dataset
from tierzero.recipes.model import build_model, count_params, flops_per_token, loss_fn
from tierzero.recipes.progress import Progress

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    losses: List[float] = field(default_factory=list)
    """Global mean loss per optimizer step (identical on every rank)."""
    grad_norms: List[float] = field(default_factory=list)
    step_times_s: List[float] = field(default_factory=list)
    entropy_floor_nats: Optional[float] = None
    wall_s: float = 0.0
    num_params: int = 0
    first_step: int = 1
    """The step `losses[0]` belongs to (> 1 after a resume)."""
    expert_tokens: List[torch.Tensor] = field(default_factory=list)
    """MoE: per step, tokens routed to each expert [layer, expert], over every rank."""
    dropped_fraction: List[List[float]] = field(default_factory=list)
    """MoE: per step and layer, the share of assignments dropped for capacity."""

    @property
    def final_loss(self) -> float:
        """Mean of the last (up to) 10 steps: one step's batch is too noisy to judge by."""
        tail = self.losses[-10:]
        return sum(tail) / len(tail) if tail else float("nan")


class NonFiniteError(RuntimeError):
    """Training cannot go on: non-finite gradients beyond what train.on_nonfinite allows."""


class StopRequested(Exception):
    """A stop signal (SIGTERM, SIGINT, launcher.requeue_signal) reached a rank: every rank
    finished step `step` and committed a checkpoint of it; the run is to be started again."""

    def __init__(self, signame: str, step: int, checkpoint: Optional[str]):
        self.signame, self.step, self.checkpoint = signame, step, checkpoint
        saved = f"checkpoint of step {step} committed ({checkpoint})" if checkpoint else \
            "no checkpoint (this engine does not save them): a new run starts over"
        super().__init__(f"{signame}: stopped after step {step}; {saved}")


FAULT_NAN_ENV = "TIERZERO_FAULT_NAN_STEPS"
"""Fault injection for tests (docs/fault-tolerance.md): `5,9` makes rank 0's first micro-step
of steps 5 and 9 produce NaN gradients, once each."""


def fault_nan_steps() -> set:
    import os

    text = os.environ.get(FAULT_NAN_ENV, "")
    return {int(s) for s in text.split(",") if s.strip()}


FAULT_HANG_ENV = "TIERZERO_FAULT_HANG"
"""Fault injection for tests: `<rank>:<step>` makes that rank sleep forever at that step."""


def fault_hang_step(rank: int) -> Optional[int]:
    import os

    text = os.environ.get(FAULT_HANG_ENV, "")
    if ":" in text:
        r, s = text.split(":", 1)
        if int(r) == rank:
            return int(s)
    return None


FAULT_SLOW_STEP_ENV = "TIERZERO_FAULT_SLOW_STEP_S"
"""Fault injection for tests: every step sleeps this long (seconds), so a drill that must catch
a run mid-way (a requeue, a time limit) does not depend on how fast the machine trains."""


def fault_slow_step_s() -> float:
    import os

    return float(os.environ.get(FAULT_SLOW_STEP_ENV, "0") or 0)


def lr_at(step: int, *, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up to `lr`, then cosine decay to lr*min_lr_ratio at the last step (1-based step)."""
    if warmup_steps and step <= warmup_steps:
        return lr * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def micro_batch_indices(step: int, micro: int, *, dp_rank: int, dp_size: int, micro_batch: int, global_batch: int,
                        first_sample: Optional[int] = None) -> np.ndarray:
    """Global sample indices of one micro-batch. `step` is 0-based; the step's global batch
    starts at `first_sample` (default step x global_batch; a resumed run passes where the
    checkpoint left the token stream, so a changed world size or batch continues it)."""
    base = step * global_batch if first_sample is None else first_sample
    start = base + (micro * dp_size + dp_rank) * micro_batch
    return np.arange(start, start + micro_batch, dtype=np.int64)


def measure_matmul_tflops(dtype: torch.dtype, device: str, seconds: float = 0.3) -> float:
    """Peak the ranks really get here: a square matmul timed for a fraction of a second."""
    n = 512 if device == "cpu" else 8192
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


def grad_accum_steps(train_cfg: TrainConfig, dp_size: int) -> int:
    mb, gb = train_cfg.micro_batch_size, train_cfg.global_batch_size
    assert gb % (mb * dp_size) == 0, "checked by the launcher (launcher.config.check_world)"
    return gb // (mb * dp_size)


def dtype_of(train_cfg: TrainConfig) -> torch.dtype:
    return torch.bfloat16 if train_cfg.dtype == "bfloat16" else torch.float32


def moe_traffic(train_cfg: TrainConfig, model_cfg: ModelConfig, moe_cfg: Optional[MoEConfig],
                seq_len: int) -> Optional[MoETraffic]:
    if moe_cfg is None or not moe_cfg.num_experts:
        return None
    return MoETraffic(tokens_per_micro_step=train_cfg.micro_batch_size * seq_len, d_model=model_cfg.d_model,
                      top_k=moe_cfg.top_k, num_layers=model_cfg.n_layers)


def expert_step(model, *, world_size: int, step: int, telemetry, is_rank0: bool) -> Optional[dict]:
    """After an optimizer step: every rank's routing statistics summed over the world, the
    auxiliary-loss-free bias moved from that global load, one `experts` row per (layer,
    expert) from rank 0. Returns the step's summary (tokens per expert, dropped fraction)."""
    layers = moe_layers(model)
    if not layers:
        return None
    stats = [layer.take_stats() for layer in layers]
    E = layers[0].num_experts
    # [layer, E + 5]: tokens per expert, dropped, assignments, aux sum, z sum, micro-batches
    packed = torch.stack([torch.cat([s["tokens"].double().cpu(), torch.tensor(
        [s["dropped"], s["assignments"], s["aux"], s["z"], s["calls"]], dtype=torch.float64)]) for s in stats])
    if world_size > 1:
        device = layers[0].router.weight.device
        packed = packed.to(device)
        dist.all_reduce(packed)
        packed = packed.cpu()
    summary = {"tokens": packed[:, :E].long(), "dropped_fraction": (packed[:, E] / packed[:, E + 1]).tolist()}
    for li, layer in enumerate(layers):
        row = packed[li]
        if layer.cfg.bias_update_rate:
            layer.update_bias(row[:E].to(layer.expert_bias.device))
        if is_rank0:
            calls = float(row[E + 4])
            for e in range(E):
                telemetry.expert(step=step, layer=li, expert=e, tokens=int(row[e]),
                                 dropped_fraction=float(row[E] / row[E + 1]), aux_loss=float(row[E + 2]) / calls,
                                 z_loss=float(row[E + 3]) / calls, bias=float(layer.expert_bias[e]))
    return summary


def train(
    *,
    train_cfg: TrainConfig,
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    ctx: DistContext,
    telemetry,
    parallel_cfg: Optional[ParallelConfig] = None,
    memory_budget_bytes: Optional[float] = None,
    peak_tflops: Optional[float] = None,
    show_progress: bool = True,
    reference_engine: bool = False,
    moe_cfg: Optional[MoEConfig] = None,
    checkpoint_cfg: Optional[CheckpointConfig] = None,
    checkpoint_root: Optional[str] = None,
    run_state: Optional[dict] = None,
    heartbeat=None,
    stop_requested: Optional[Callable[[], Optional[str]]] = None,
) -> TrainResult:
    """Train; `reference_engine` runs plain data parallelism with torch.optim.AdamW instead of
    the plan (the tests' single-process reference). `stop_requested()` names a stop signal
    that reached this rank (launcher/signals.py): when any rank has one, all finish the step,
    commit a checkpoint and raise StopRequested."""
    t_start = time.perf_counter()
    dp_size, dp_rank = ctx.world_size, ctx.rank
    mb, gb = train_cfg.micro_batch_size, train_cfg.global_batch_size
    accum = grad_accum_steps(train_cfg, dp_size)

    dataset = build_dataset(data_cfg)
    torch.manual_seed(train_cfg.seed)
    model = build_model(model_cfg, vocab_size=dataset.vocab_size, seq_len=dataset.seq_len, moe=moe_cfg)
    if checkpoint_cfg is not None and checkpoint_cfg.init_from:
        from tierzero.checkpoint.export import load_into

        loaded = load_into(model, checkpoint_cfg.init_from)
        telemetry.event("init", detail=f"{loaded} tensors from {checkpoint_cfg.init_from}", step=0)
    dtype = dtype_of(train_cfg)
    model = model.to(device=ctx.device, dtype=dtype)
    n_params = count_params(model_cfg, dataset.vocab_size, moe_cfg)  # all experts, before EP splits them
    flops_tok = flops_per_token(model_cfg, dataset.vocab_size, dataset.seq_len, n_params, moe=moe_cfg)
    optim = dict(lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2),
                 weight_decay=train_cfg.weight_decay, grad_clip=train_cfg.grad_clip, loss_fn=loss_fn)
    if reference_engine:
        engine = DataParallelEngine(model, **optim)
        plan_line = "reference data parallel (torch.optim.AdamW)"
    else:
        parallel_cfg = parallel_cfg or ParallelConfig()
        choice = resolve_plan(
            parallel_cfg, ctx.topology, model_units(model),
            dtype_bytes=torch.finfo(dtype).bits // 8, grad_accum=accum, memory_budget_bytes=memory_budget_bytes,
            moe=moe_traffic(train_cfg, model_cfg, moe_cfg, dataset.seq_len),
        )
        if parallel_cfg.engine == "deepspeed":
            from tierzero.parallel.deepspeed_adapter import DeepSpeedEngine, restrict_auto_choice

            choice = restrict_auto_choice(choice, ctx.topology)
            # raises PlanError (a plan DeepSpeed cannot run) before deepspeed is even imported
            engine = DeepSpeedEngine(model, plan=choice.plan, topology=ctx.topology, rank=ctx.rank,
                                     device=ctx.device, local_rank=ctx.local_rank, micro_batch_size=mb, grad_accum=accum,
                                     dtype=train_cfg.dtype, **optim)
        elif parallel_cfg.engine == "fsdp2":
            from tierzero.parallel.fsdp2_adapter import FSDP2Engine, restrict_auto_choice

            choice = restrict_auto_choice(choice, ctx.topology)
            engine = FSDP2Engine(model, plan=choice.plan, topology=ctx.topology, rank=ctx.rank,
                                 device=ctx.device, **optim)
        else:
            engine = ShardedEngine(model, plan=choice.plan, topology=ctx.topology, rank=ctx.rank,
                                   device=ctx.device, ep=parallel_cfg.ep, **optim)
        plan_line = f"{choice.plan.describe(ctx.topology)} on {parallel_cfg.engine}: {choice.reason}"
    if peak_tflops is None:
        peak_tflops = measure_matmul_tflops(dtype, ctx.device)

    result = TrainResult(entropy_floor_nats=dataset.entropy_floor_nats, num_params=n_params)
    ckpt = None
    start_step, next_sample = 0, 0
    if checkpoint_cfg is not None and checkpoint_root and not reference_engine:
        wanted = checkpoint_cfg.every_steps > 0 or checkpoint_cfg.resume not in ("auto", "none")
        if not hasattr(engine, "checkpoint_slices"):
            if wanted:
                raise ValueError(f"checkpoints are not implemented for parallel.engine={parallel_cfg.engine}; use "
                                 "parallel.engine=native, or checkpoint.every_steps=0 checkpoint.resume=auto")
            checkpoint_cfg = None
    if checkpoint_cfg is not None and checkpoint_root and not reference_engine:
        from tierzero.checkpoint.saver import Checkpointer

        ckpt = Checkpointer(checkpoint_cfg, checkpoint_root, rank=ctx.rank, world_size=dp_size, attempt=ctx.attempt,
                            event=lambda kind, detail, step: telemetry.event(kind, detail=detail, step=step))
        resumed = ckpt.resume(engine)
        if resumed is not None:
            start_step = result.first_step = resumed.step
            result.first_step += 1
            next_sample = int(resumed.state["next_sample"])
            telemetry.event("resume", detail=f"from {resumed.path} (step {resumed.step}, sample {next_sample}, "
                                             f"saved by {resumed.state.get('world_size')} ranks, "
                                             f"{resumed.state.get('plan')})", step=start_step)
            if ctx.rank == 0:
                log.info("resumed from %s: step %d, next sample %d", resumed.path, start_step, next_sample)

    if ctx.rank == 0:
        floor = f"{dataset.entropy_floor_nats:.4f} nats" if dataset.entropy_floor_nats is not None else "unknown"
        log.info(
            "model %.2fM params | %d ranks x micro %d x accum %d = global %d seqs of %d tokens | "
            "entropy floor %s",
            n_params / 1e6, dp_size, mb, accum, gb, dataset.seq_len, floor,
        )
        log.info("plan %s", plan_line)
    telemetry.event("start", detail=f"params={n_params} world={dp_size} accum={accum}", step=0)
    progress = Progress(total=train_cfg.steps, enabled=show_progress and ctx.rank == 0, log_every=train_cfg.log_every)
    proc = psutil.Process()
    tokens_per_step = accum * mb * dataset.seq_len
    # [loss, stop]: a stop request rides on the step's loss all-reduce, so all ranks stop at the
    # same step without a collective of its own (nccl reduces device tensors only)
    loss_buf = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    saved_step = None

    def checkpoint_state(step: int) -> dict:  # read at save time: the loss and lr of `step`
        return {
            **(run_state or {}), "step": step, "optimizer_steps": engine.step_count,
            "next_sample": next_sample + (step - start_step) * gb, "global_batch_size": gb,
            "world_size": dp_size, "plan": plan_line, "topology": ctx.topology.describe(),
            "loss": global_loss, "lr": lr, "seeds": {"train": train_cfg.seed, "data": data_cfg.seed},
            "versions": {"torch": torch.__version__}}

    nan_steps = fault_nan_steps()
    slow_step_s = fault_slow_step_s()
    nonfinite_run = 0
    step = start_step
    with progress:
        while step < train_cfg.steps:
            step += 1
            if heartbeat is not None:
                heartbeat(step, "step")
            if fault_hang_step(ctx.rank) == step:
                time.sleep(10**9)  # fault injection: this rank stops making progress
            if slow_step_s:
                time.sleep(slow_step_s)
            t0 = time.perf_counter()
            lr = lr_at(step, lr=train_cfg.lr, warmup_steps=train_cfg.warmup_steps,
                       total_steps=train_cfg.steps, min_lr_ratio=train_cfg.min_lr_ratio)
            loss_sum = 0.0
            for micro in range(accum):
                idx = micro_batch_indices(step - 1, micro, dp_rank=dp_rank, dp_size=dp_size,
                                          micro_batch=mb, global_batch=gb,
                                          first_sample=next_sample + (step - 1 - start_step) * gb)
                batch = dataset.samples(idx).to(ctx.device)  # [mb, seq_len + 1]
                if heartbeat is not None:
                    heartbeat(step, f"micro {micro}")
                scale = 1.0 / accum
                if step in nan_steps and ctx.rank == 0 and micro == 0:
                    nan_steps.discard(step)  # once: a rollback replays this step cleanly
                    scale = float("nan")
                loss_sum += engine.micro_step(batch[:, :-1], batch[:, 1:], scale=scale)
            if heartbeat is not None:
                heartbeat(step, "optimizer")
            stats = engine.step(lr)
            if getattr(stats, "skipped", False):
                nonfinite_run += 1
                action = train_cfg.on_nonfinite
                telemetry.event("nonfinite", detail=f"gradient norm {stats.grad_norm} at step {step}: {action} "
                                f"({nonfinite_run} in a row, train.max_nonfinite={train_cfg.max_nonfinite})",
                                step=step, flush=True)
                if action == "stop" or nonfinite_run > train_cfg.max_nonfinite:
                    raise NonFiniteError(
                        f"non-finite gradient norm ({stats.grad_norm}) at step {step}, {nonfinite_run} step(s) in a "
                        f"row; train.on_nonfinite={action}, train.max_nonfinite={train_cfg.max_nonfinite}. Lower "
                        "train.lr, check the data, or use train.on_nonfinite=rollback with checkpoint.every_steps")
                if action == "rollback":
                    if ckpt is None:
                        raise NonFiniteError("train.on_nonfinite=rollback needs checkpoints: set checkpoint.every_steps")
                    ckpt.wait()
                    back = ckpt.resume(engine, mode="auto")
                    if back is None:
                        raise NonFiniteError(f"train.on_nonfinite=rollback at step {step}: no committed checkpoint "
                                             "to roll back to yet")
                    telemetry.event("rollback", detail=f"to {back.path} (step {back.step})", step=step, flush=True)
                    engine.take_comm()  # the abandoned steps' traffic and routing are not the run's
                    for layer in moe_layers(model):
                        layer.take_stats()
                    start_step, step, next_sample = back.step, back.step, int(back.state["next_sample"])
                    keep = max(0, back.step - result.first_step + 1)
                    del result.losses[keep:], result.grad_norms[keep:], result.step_times_s[keep:]
                    continue
            else:
                nonfinite_run = 0
            for row in engine.take_comm():
                telemetry.comm(step=step, **row)
            routing = expert_step(model, world_size=dp_size, step=step, telemetry=telemetry, is_rank0=ctx.rank == 0)
            if routing is not None:
                result.expert_tokens.append(routing["tokens"])
                result.dropped_fraction.append(routing["dropped_fraction"])
            loss_buf[0] = loss_sum / accum
            signame = stop_requested() if stop_requested is not None else None
            loss_buf[1] = 1.0 if signame else 0.0
            if dp_size > 1:
                dist.all_reduce(loss_buf, op=dist.ReduceOp.SUM)
            global_loss = loss_buf[0].item() / dp_size
            stop = loss_buf[1].item() > 0 and step < train_cfg.steps
            step_time_s = time.perf_counter() - t0

            result.losses.append(global_loss)
            result.grad_norms.append(stats.grad_norm)
            result.step_times_s.append(step_time_s)
            tflops = flops_tok * tokens_per_step / step_time_s / 1e12
            telemetry.step(
                step=step,
                loss=global_loss,
                lr=lr,
                grad_norm=stats.grad_norm,
                tokens=tokens_per_step,
                step_time_s=step_time_s,
                tokens_per_s=tokens_per_step / step_time_s,
                tflops=tflops,
                mfu=tflops / peak_tflops if peak_tflops else None,
                mem_rss_bytes=proc.memory_info().rss,
                gpu_mem_bytes=torch.cuda.max_memory_allocated() if ctx.device.startswith("cuda") else None,
            )
            progress.update(step, loss=global_loss, tokens_per_s=tokens_per_step * dp_size / step_time_s)

            if ckpt is not None and ckpt.due(step, train_cfg.steps):
                if heartbeat is not None:
                    heartbeat(step, "checkpoint")
                # A step a checkpoint covers is never recomputed, so its row must outlive a kill -9
                telemetry.flush()
                ckpt.save(step, engine, checkpoint_state(step))
                saved_step = step
            if stop:
                path = None
                if ckpt is not None:
                    if heartbeat is not None:
                        heartbeat(step, "checkpoint")
                    if saved_step != step:
                        telemetry.flush()
                        ckpt.save(step, engine, checkpoint_state(step))
                    ckpt.wait()
                    path = ckpt.store.step_path(step)
                if dp_size > 1:
                    # rank 0 commits inside its wait: no rank may exit before that (under srun
                    # --kill-on-bad-exit the first rank out makes Slurm stop the others at once)
                    dist.barrier()
                raise StopRequested(signame or "a stop signal on another rank", step, path)
    if ckpt is not None:
        ckpt.wait()

    result.wall_s = time.perf_counter() - t_start
    telemetry.event("end", detail=f"final_loss={result.final_loss:.6f}", step=train_cfg.steps)
    return result
