"""The training program: model -> engine (parallel.engines registry) -> resume -> loop -> telemetry.

The loop (Trainer.fit) is a screen long: per optimizer step, the micro-steps, the optimizer
step, one all-reduce that agrees on the loss and on whether to stop, the records, the save and
the stop. Everything outside the loop reaches it through Hooks (heartbeats, stop requests,
fault injection), which default to doing nothing. Which samples a step reads and its learning
rate are recipes/schedule.py's pure rules.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np
import psutil
import torch
import torch.distributed as dist

from tierzero.checkpoint.config import CheckpointConfig
from tierzero.parallel.choose import resolve_plan
from tierzero.parallel.config import ParallelConfig
from tierzero.parallel.context import DistContext
from tierzero.parallel.engines import ENGINES, EngineSetup, Optim
from tierzero.parallel.engines.base import checkpoint_blocks
from tierzero.parallel.host import to_host
from tierzero.parallel.moe import MoEConfig, moe_layers
from tierzero.recipes.config import DataConfig, ModelConfig, TrainConfig
from tierzero.recipes.data import Prefetcher, build_datasets
from tierzero.recipes.model import build_model, count_params, flops_per_token, loss_fn
from tierzero.recipes.planning import planning_inputs
from tierzero.recipes.progress import Progress
from tierzero.recipes.schedule import grad_accum_steps, lr_at, micro_batch_indices

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """The config sections a training run reads."""
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    moe: Optional[MoEConfig] = None
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: Optional[CheckpointConfig] = None

    @classmethod
    def of(cls, cfg) -> "Recipe":
        """The sections of a composed config (launcher.config.RunConfig or anything with them)."""
        return cls(cfg.train, cfg.model, cfg.data, cfg.moe, cfg.parallel, cfg.checkpoint)


class Hooks:
    """The world outside the loop, at fixed points of it. Every method does nothing here; the
    launcher's ranks override them (launcher/rank.py: heartbeats, stop signals, launcher/faults.py)."""

    def heartbeat(self, step: int, phase: str) -> None:
        """The rank reached `phase` (step, micro <k>, optimizer, checkpoint) of `step`."""

    def stop_requested(self) -> Optional[str]:
        """The name of a stop signal that reached this rank, if any."""
        return None

    def before_step(self, step: int) -> None:
        """About to start `step`."""

    def loss_scale(self, step: int, micro: int, scale: float) -> float:
        """The factor a micro-step's loss is scaled by before backward (1 / accumulation)."""
        return scale

    def checkpoint_written(self, step: int) -> None:
        """This rank wrote its data of a checkpoint and is about to report it."""


@dataclass(frozen=True)
class TrainState:
    step: int
    """The last optimizer step done (0 before the first)."""
    start_step: int
    """The step this stretch of training started after (a resume's or a rollback's)."""
    next_sample: int
    """Global index of the first sample step `step + 1` reads: where the token stream goes on."""


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
    eval_losses: List[Tuple[int, float]] = field(default_factory=list)
    """(step, global mean held-out loss) per evaluation (train.eval_every)."""
    cross_node: List[List[List[int]]] = field(default_factory=list)
    """MoE: per step and layer, [kept assignments to experts on other nodes, rows sent across for them], every rank."""
    saves: Optional[object] = None
    """How the run's checkpoint saves ended (checkpoint.saver.SaveOutcome); None when it saves none."""

    @property
    def final_loss(self) -> float:
        """Mean of the last (up to) 10 steps: one step's batch is too noisy to judge by."""
        tail = self.losses[-10:]
        return sum(tail) / len(tail) if tail else float("nan")

    def truncate(self, last_step: int) -> None:
        """Forget the steps after `last_step` (a rollback replays them)."""
        keep = max(0, last_step - self.first_step + 1)
        for series in (self.losses, self.grad_norms, self.step_times_s, self.expert_tokens, self.dropped_fraction,
                       self.cross_node):
            del series[keep:]
        self.eval_losses[:] = [(step, loss) for step, loss in self.eval_losses if step <= last_step]


class NonFiniteError(RuntimeError):
    """Training cannot go on: non-finite gradients beyond what train.on_nonfinite allows."""


class StopRequested(Exception):
    """A stop signal (SIGTERM, SIGINT, launcher.requeue_signal) reached a rank: every rank
    finished step `step` and committed a checkpoint of it; the run is to be started again."""

    def __init__(self, signame: str, step: int, checkpoint: Optional[str], failed: Optional[str] = None):
        self.signame, self.step, self.checkpoint = signame, step, checkpoint
        if failed:  # checkpoint.on_error=continue: the stop's own save failed
            saved = f"but {failed}"
        elif checkpoint:
            saved = f"checkpoint of step {step} committed ({checkpoint})"
        else:
            saved = "no checkpoint (this run saves none: its engine cannot): a new run starts over"
        super().__init__(f"{signame}: stopped after step {step}; {saved}")


def peak_tflops_of(train_cfg: TrainConfig, device: str) -> float:
    """The MFU denominator: the device's datasheet peak for train.dtype (PaLM's definition: a
    measured matmul already loses part of what MFU shows), or a measured matmul where the
    device is not in telemetry/peak.py's table (CPU ranks)."""
    if device.startswith("cuda"):
        from tierzero.telemetry.peak import datasheet_peak_tflops

        peak = datasheet_peak_tflops(torch.cuda.get_device_name(device), train_cfg.dtype)
        if peak:
            return peak
        log.warning("%s is not in telemetry/peak.py: MFU is against a measured matmul (set telemetry.peak_tflops)",
                    torch.cuda.get_device_name(device))
    return measure_matmul_tflops(dtype_of(train_cfg), device)


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


def dtype_of(train_cfg: TrainConfig) -> torch.dtype:
    return torch.bfloat16 if train_cfg.dtype == "bfloat16" else torch.float32


class Trainer:
    """One rank's training run. Build it (model, engine, checkpointer), then `fit()`."""

    def __init__(self, recipe: Recipe, ctx: DistContext, telemetry, *, hooks: Optional[Hooks] = None,
                 checkpoint_root: Optional[str] = None, memory_budget_bytes: Optional[float] = None,
                 peak_tflops: Optional[float] = None, run_state: Optional[dict] = None, show_progress: bool = True,
                 compile_cache_dir: Optional[str] = None):
        t = recipe.train
        self.recipe, self.ctx, self.telemetry, self.hooks = recipe, ctx, telemetry, hooks or Hooks()
        if t.compile:  # first: torch._dynamo, imported while the model is built, settles inductor's folder
            from tierzero.recipes.compiling import use_compile_cache

            use_compile_cache(compile_cache_dir)
        self.run_state = run_state or {}
        self.accum = grad_accum_steps(t, ctx.world_size)
        self.dataset, self.eval_data = build_datasets(recipe.data)
        self.feed = Prefetcher(self.dataset, pin=ctx.device.startswith("cuda"))
        self.model = self.build_model()
        self.engine, self.plan_line = self.build_engine(self.model, memory_budget_bytes)
        self.ckpt = self.build_checkpointer(checkpoint_root)
        if t.on_nonfinite == "rollback" and self.ckpt is None:
            raise ValueError("train.on_nonfinite=rollback needs checkpoints (checked before launch)")
        self.num_params = count_params(recipe.model, self.dataset.vocab_size, recipe.moe)  # every expert
        self.flops_per_token = flops_per_token(recipe.model, self.dataset.vocab_size, self.dataset.seq_len,
                                               self.num_params, moe=recipe.moe)
        self.peak_tflops = peak_tflops or peak_tflops_of(t, ctx.device)
        self.tokens_per_step = self.accum * t.micro_batch_size * self.dataset.seq_len
        self.result = TrainResult(entropy_floor_nats=self.dataset.entropy_floor_nats, num_params=self.num_params)
        self.progress = Progress(total=t.steps, enabled=show_progress and ctx.rank == 0, log_every=t.log_every)
        self._nonfinite_in_a_row = 0
        self._process = psutil.Process()
        # [loss, stop]: a stop request rides on the step's loss all-reduce, so all ranks stop at the
        # same step without a collective of its own (nccl reduces device tensors only)
        self._agree_buf = torch.zeros(4, dtype=torch.float64, device=ctx.device)

    # ---- building ----------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        """The model, its values keyed by train.seed and each parameter's name. For an engine
        that materialises shards (the native one) it is built on the meta device -- no rank ever
        holds the whole model -- and the engine generates only its shards (EngineSetup.init)."""
        r = self.recipe
        torch.manual_seed(r.train.seed)  # anything else random (dropout-free today) starts the same
        shape = dict(vocab_size=self.dataset.vocab_size, seq_len=self.dataset.seq_len, moe=r.moe, seed=r.train.seed)
        init_from = r.checkpoint is not None and r.checkpoint.init_from
        if ENGINES[r.parallel.engine].shards_from_meta and not init_from:
            with torch.device("meta"):
                model = build_model(r.model, **shape)
            model.materialize_buffers(self.ctx.device)
            return model
        model = build_model(r.model, **shape)
        if init_from:
            from tierzero.checkpoint.export import load_into

            key = "model.from_hf" if r.model.from_hf else "checkpoint.init_from"
            loaded = load_into(model, r.checkpoint.init_from, key=key)
            self.telemetry.event("init", detail=f"{loaded} tensors from {r.checkpoint.init_from}", step=0)
        # float32 on the device: each engine casts the parameters to train.dtype itself and keeps
        # float32 masters from these exact values; buffers (rotary tables, expert bias) stay float32
        return model.to(device=self.ctx.device)

    def build_engine(self, model: torch.nn.Module, memory_budget_bytes: Optional[float]) -> Tuple[object, str]:
        """The plan (named, or auto's choice among the plans the engine runs) and the engine
        that executes it; returns (engine, the line that says which and why)."""
        r, ctx = self.recipe, self.ctx
        spec = ENGINES[r.parallel.engine]
        inputs = planning_inputs(train_cfg=r.train, model_cfg=r.model, data_cfg=r.data, moe_cfg=r.moe,
                                 ep=r.parallel.ep, world_size=ctx.world_size, model=model,
                                 reduce_dtype=r.parallel.reduce_dtype)
        choice = resolve_plan(r.parallel, ctx.topology, inputs, memory_budget_bytes=memory_budget_bytes)
        choice = spec.restrict(choice, ctx.topology)  # PlanError for a named plan it cannot run
        t = r.train
        if t.activation_checkpointing == "blocks":
            checkpoint_blocks(model)
        # after checkpoint_blocks, so each block's recompute is traced with it
        if t.compile:
            from tierzero.recipes.compiling import compile_model

            loss = compile_model(model)
        else:
            loss = loss_fn
        on_meta = next(model.parameters()).is_meta
        setup = EngineSetup(plan=choice.plan, topology=ctx.topology, rank=ctx.rank, local_rank=ctx.local_rank,
                            init=model.init_slice if on_meta else None,
                            device=ctx.device, ep=r.parallel.ep, micro_batch_size=t.micro_batch_size,
                            grad_accum=self.accum, dtype=t.dtype, reduce_dtype=r.parallel.reduce_dtype,
                            comm_timing=r.parallel.comm_timing, loss_fn=loss,
                            optim=Optim(lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay,
                                        grad_clip=t.grad_clip))
        engine = spec.load()(model, setup)
        return engine, f"{choice.plan.describe(ctx.topology)} on {spec.name}: {choice.reason}"

    def build_checkpointer(self, root: Optional[str]):
        cfg = self.recipe.checkpoint
        if cfg is None or not root or not ENGINES[self.recipe.parallel.engine].checkpoints:
            return None  # an engine without checkpoints was refused before launch if any were asked for
        from tierzero.checkpoint.saver import Checkpointer

        return Checkpointer(cfg, root, rank=self.ctx.rank, world_size=self.ctx.world_size, attempt=self.ctx.attempt,
                            event=lambda kind, detail, step: self.telemetry.event(kind, detail=detail, step=step),
                            before_report=self.hooks.checkpoint_written)

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train from the resumed step to train.steps."""
        try:
            return self.loop()
        finally:
            self.feed.close()

    def loop(self) -> TrainResult:
        t_start, steps = time.perf_counter(), self.recipe.train.steps
        state = self.resume()
        self.announce()
        with self.progress:
            while state.step < steps:
                step = state.step + 1
                self.hooks.heartbeat(step, "step")
                self.hooks.before_step(step)
                t0 = time.perf_counter()
                lr = lr_at(step, lr=self.recipe.train.lr, warmup_steps=self.recipe.train.warmup_steps,
                           total_steps=steps, min_lr_ratio=self.recipe.train.min_lr_ratio)
                loss = self.micro_steps(step, state.next_sample)
                self.hooks.heartbeat(step, "optimizer")
                stats = self.engine.step(lr)
                if self.check_finite(step, stats) == "rollback":
                    state = self.roll_back(step)
                    continue
                routing = self.after_step(step)
                loss, signame = self.agree(loss, last=step == steps)
                state = TrainState(step, state.start_step, state.next_sample + self.recipe.train.global_batch_size)
                self.record(step, loss, lr, stats.grad_norm, time.perf_counter() - t0, routing)
                self.evaluate(step)
                if self.ckpt is not None and (self.ckpt.due(step, steps) or signame):
                    self.save(state, loss=loss, lr=lr)
                if signame:
                    self.stop(state, signame)
        if self.ckpt is not None:
            self.ckpt.wait()
            self.result.saves = self.ckpt.outcome()  # every rank the same: which saves failed, what is usable
        self.result.wall_s = time.perf_counter() - t_start
        self.telemetry.event("end", detail=f"final_loss={self.result.final_loss:.6f}", step=steps)
        return self.result

    # ---- the loop's parts ----------------------------------------------------------------------
    def micro_steps(self, step: int, first_sample: int):
        """Forward and backward of this rank's micro-batches of `step`; their mean loss (on the device). The next
        micro-batch is read on the data thread while this one trains."""
        loss_sum = 0.0
        for micro in range(self.accum):
            batch = self.feed.get(self.batch_indices(step, micro, first_sample))
            following = (step, micro + 1, first_sample) if micro + 1 < self.accum else \
                (step + 1, 0, first_sample + self.recipe.train.global_batch_size)
            if following[0] <= self.recipe.train.steps:
                self.feed.ahead(self.batch_indices(*following))
            batch = batch.to(self.ctx.device, non_blocking=True)  # [mb, seq_len + 1]
            self.hooks.heartbeat(step, f"micro {micro}")
            scale = self.hooks.loss_scale(step, micro, 1.0 / self.accum)
            loss_sum += self.engine.micro_step(batch[:, :-1], batch[:, 1:], scale=scale)
        return loss_sum / self.accum

    def batch_indices(self, step: int, micro: int, first_sample: int) -> np.ndarray:
        """The sample indices of this rank's micro-batch `micro` of `step` (1-based)."""
        t, ctx = self.recipe.train, self.ctx
        return micro_batch_indices(step - 1, micro, dp_rank=ctx.rank, dp_size=ctx.world_size,
                                   micro_batch=t.micro_batch_size, global_batch=t.global_batch_size,
                                   first_sample=first_sample)

    def check_finite(self, step: int, stats) -> Optional[str]:
        """None for a finite step; for a non-finite gradient norm (the update was skipped) what
        train.on_nonfinite says: "skip" (go on), "rollback", or NonFiniteError (stop)."""
        if not stats.skipped:
            self._nonfinite_in_a_row = 0
            return None
        self._nonfinite_in_a_row += 1
        t = self.recipe.train
        self.telemetry.event("nonfinite", detail=f"gradient norm {stats.grad_norm} at step {step}: {t.on_nonfinite} "
                             f"({self._nonfinite_in_a_row} in a row, train.max_nonfinite={t.max_nonfinite})",
                             step=step, flush=True)
        if t.on_nonfinite == "stop" or self._nonfinite_in_a_row > t.max_nonfinite:
            raise NonFiniteError(
                f"non-finite gradient norm ({stats.grad_norm}) at step {step}, {self._nonfinite_in_a_row} step(s) in "
                f"a row; train.on_nonfinite={t.on_nonfinite}, train.max_nonfinite={t.max_nonfinite}. Lower "
                "train.lr, check the data, or use train.on_nonfinite=rollback with checkpoint.every_steps")
        return t.on_nonfinite

    def roll_back(self, step: int) -> TrainState:
        """Reload the newest committed checkpoint; the steps after it are replayed."""
        self.ckpt.wait()
        back = self.ckpt.resume(self.engine, mode="auto")
        if back is None:
            raise NonFiniteError("train.on_nonfinite=rollback: no committed checkpoint to roll back to yet")
        self.telemetry.event("rollback", detail=f"to {back.path} (step {back.step})", step=step, flush=True)
        self.engine.take_comm()  # the abandoned steps' traffic and routing are not the run's
        for layer in moe_layers(self.model):
            layer.take_stats()
        self.result.truncate(back.step)
        return TrainState(back.step, back.step, int(back.state["next_sample"]))

    def after_step(self, step: int) -> Optional[dict]:
        """The step's byte-ledger rows, and the MoE routing summed over every rank."""
        for row in self.engine.take_comm():
            self.telemetry.record("comm", step=step, **row)
        return expert_step(self.model, world_size=self.ctx.world_size, step=step, telemetry=self.telemetry,
                           is_rank0=self.ctx.rank == 0)

    def agree(self, loss: float, *, last: bool) -> Tuple[float, Optional[str]]:
        """The global mean loss, and whether any rank was asked to stop (one all-reduce). A
        request at the last step is just the end."""
        buf, world = self._agree_buf, self.ctx.world_size
        signame = self.hooks.stop_requested()
        # [loss, ranks asked to stop, sum of their signal numbers, sum of squares]: a rank the
        # signal reaches a moment later stops at the same step and still names the signal
        num = _signum(signame)
        buf[0], buf[1], buf[2], buf[3] = loss, 1.0 if signame else 0.0, num, num * num
        if world > 1:
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        total, stops, nums, squares = to_host(buf, "step loss")  # the loop's one read per optimizer step
        stop = stops > 0 and not last
        if stop and not signame:
            same = nums and squares * stops == nums * nums  # every asking rank got the same signal
            signame = (_signame(nums / stops) if same else None) or "a stop signal on another rank"
        return total / world, (signame if stop else None)

    def record(self, step: int, loss: float, lr: float, grad_norm: float, step_time_s: float,
               routing: Optional[dict]) -> None:
        res, tokens = self.result, self.tokens_per_step
        res.losses.append(loss)
        res.grad_norms.append(grad_norm)
        res.step_times_s.append(step_time_s)
        if routing is not None:
            res.expert_tokens.append(routing["tokens"])
            res.dropped_fraction.append(routing["dropped_fraction"])
            res.cross_node.append(routing["cross_node"])
        tflops = self.flops_per_token * tokens / step_time_s / 1e12
        cuda = self.ctx.device.startswith("cuda")
        self.telemetry.record(
            "steps", step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens=tokens, step_time_s=step_time_s,
            tokens_per_s=tokens / step_time_s, tflops=tflops, mfu=tflops / self.peak_tflops,
            mem_rss_bytes=self._process.memory_info().rss,
            gpu_mem_bytes=torch.cuda.max_memory_allocated() if cuda else None)
        self.progress.update(step, loss=loss, tokens_per_s=tokens * self.ctx.world_size / step_time_s)

    def evaluate(self, step: int) -> None:
        """train.eval_every: the held-out loss after `step`, the global mean over train.eval_steps
        batches of train.global_batch_size (the same held-out samples every time, split across the
        ranks as a training step's are): forward only (engine.eval_loss), the sum kept on the
        device, one all-reduce and one read per evaluation. Rank 0 records the `eval` row."""
        t, ctx = self.recipe.train, self.ctx
        if self.eval_data is None or not t.eval_every or step % t.eval_every:
            return
        t0 = time.perf_counter()
        total = torch.zeros((), dtype=torch.float64, device=ctx.device)
        for batch in range(t.eval_steps):
            self.hooks.heartbeat(step, f"eval {batch}")
            for micro in range(self.accum):
                indices = micro_batch_indices(batch, micro, dp_rank=ctx.rank, dp_size=ctx.world_size,
                                              micro_batch=t.micro_batch_size, global_batch=t.global_batch_size)
                tokens = self.eval_data.samples(indices).to(ctx.device, non_blocking=True)  # [mb, seq_len + 1]
                total += self.engine.eval_loss(tokens[:, :-1], tokens[:, 1:])
        if ctx.world_size > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        loss = to_host(total, "eval loss") / (ctx.world_size * self.accum * t.eval_steps)
        for layer in moe_layers(self.model):
            layer.take_stats()  # held-out routing is not training's: no bias update, no `experts` rows
        for row in self.engine.take_comm():
            self.telemetry.record("comm", step=step, **row)  # the held-out forward's gathers (phase eval)
        self.result.eval_losses.append((step, loss))
        if ctx.rank == 0:
            self.telemetry.record("eval", step=step, loss=loss, tokens=t.eval_steps * t.global_batch_size *
                                  self.dataset.seq_len, eval_time_s=time.perf_counter() - t0)
            log.info("step %d: eval loss %.4f", step, loss)

    def save(self, state: TrainState, *, loss: float, lr: float) -> None:
        self.hooks.heartbeat(state.step, "checkpoint")
        self.telemetry.flush()  # a step a checkpoint covers is never recomputed: its row must outlive a kill -9
        self.ckpt.save(state.step, self.engine, self.checkpoint_state(state, loss=loss, lr=lr))
        self.telemetry.record("events", step=state.step, kind="save", detail="the loop's seconds in save()",
                              host=self.ctx.host, stall_s=getattr(self.ckpt, "last_save_s", None))

    def stop(self, state: TrainState, signame: str) -> None:
        """Every rank stops after `state.step`, once its checkpoint is committed."""
        path = failed = None
        if self.ckpt is not None:
            self.ckpt.wait()
            # rank 0 commits inside its wait, and this is a collective: no rank exits before the
            # commit (under srun --kill-on-bad-exit the first rank out makes Slurm stop the others)
            saves = self.ckpt.outcome()
            path = self.ckpt.store.step_path(state.step)
            failed = saves.words() if state.step in saves.failed else None
        elif self.ctx.world_size > 1:
            dist.barrier()
        raise StopRequested(signame, state.step, path, failed)

    # ---- resume, state, words ------------------------------------------------------------------
    def resume(self) -> TrainState:
        """The newest committed checkpoint (checkpoint.resume), or a fresh start."""
        resumed = self.ckpt.resume(self.engine) if self.ckpt is not None else None
        if resumed is None:
            return TrainState(0, 0, 0)
        next_sample = int(resumed.state["next_sample"])
        self.result.first_step = resumed.step + 1
        self.telemetry.event("resume", detail=f"from {resumed.path} (step {resumed.step}, sample {next_sample}, "
                                              f"saved by {resumed.state.get('world_size')} ranks, "
                                              f"{resumed.state.get('plan')})", step=resumed.step)
        if self.ctx.rank == 0:
            log.info("resumed from %s: step %d, next sample %d", resumed.path, resumed.step, next_sample)
        return TrainState(resumed.step, resumed.step, next_sample)

    def checkpoint_state(self, state: TrainState, *, loss: float, lr: float) -> dict:
        """What a checkpoint records beside the tensors (the resume reads next_sample)."""
        t, ctx = self.recipe.train, self.ctx
        return {**self.run_state, "step": state.step, "optimizer_steps": self.engine.step_count,
                "next_sample": state.next_sample, "global_batch_size": t.global_batch_size,
                "world_size": ctx.world_size, "plan": self.plan_line, "topology": ctx.topology.describe(),
                "loss": loss, "lr": lr, "seeds": {"train": t.seed, "data": self.recipe.data.seed},
                "versions": {"torch": torch.__version__}}

    def announce(self) -> None:
        t, ctx = self.recipe.train, self.ctx
        if ctx.rank == 0:
            floor = self.dataset.entropy_floor_nats
            log.info("model %.2fM params | %d ranks x micro %d x accum %d = global %d seqs of %d tokens | "
                     "entropy floor %s", self.num_params / 1e6, ctx.world_size, t.micro_batch_size, self.accum,
                     t.global_batch_size, self.dataset.seq_len, f"{floor:.4f} nats" if floor is not None else "unknown")
            log.info("plan %s", self.plan_line)
        self.telemetry.event("start", detail=f"params={self.num_params} world={ctx.world_size} accum={self.accum}",
                             step=0)


def _signum(signame: Optional[str]) -> float:
    import signal

    try:
        return float(signal.Signals[signame].value) if signame else 0.0
    except KeyError:
        return 0.0


def _signame(signum: float) -> Optional[str]:
    import signal

    try:
        return signal.Signals(int(signum)).name
    except ValueError:
        return None


def train(recipe: Recipe, ctx: DistContext, telemetry, **kwargs) -> TrainResult:
    """Build a Trainer and run it (the keyword arguments are Trainer's)."""
    return Trainer(recipe, ctx, telemetry, **kwargs).fit()


def expert_step(model, *, world_size: int, step: int, telemetry, is_rank0: bool) -> Optional[dict]:
    """After an optimizer step: every rank's routing statistics summed over the world, the
    auxiliary-loss-free bias moved from that global load, one `experts` row per (layer,
    expert) from rank 0. Returns the step's summary (tokens per expert, dropped fraction)."""
    layers = moe_layers(model)
    if not layers:
        return None
    stats = [layer.take_stats() for layer in layers]
    E = layers[0].num_experts
    # [layer, E + 7]: tokens per expert, dropped, assignments, aux sum, z sum, micro-batches, and
    # the kept assignments to other nodes and the rows sent across for them
    packed = torch.stack([torch.cat([s["tokens"].double().cpu(), torch.tensor(
        [s["dropped"], s["assignments"], s["aux"], s["z"], s["calls"]], dtype=torch.float64),
        s["cross"].double().cpu()]) for s in stats])
    if world_size > 1:
        packed = packed.to(layers[0].router.weight.device)
        dist.all_reduce(packed)
        packed = packed.cpu()
    summary = {"tokens": packed[:, :E].long(), "dropped_fraction": (packed[:, E] / packed[:, E + 1]).tolist(),
               "cross_node": packed[:, E + 5:E + 7].long().tolist()}
    for li, layer in enumerate(layers):
        row = packed[li]
        if layer.cfg.bias_update_rate:
            layer.update_bias(row[:E].to(layer.expert_bias.device))
        if is_rank0:
            calls, kept = float(row[E + 4]), float(row[E + 1] - row[E])
            for e in range(E):
                telemetry.record("experts", step=step, layer=li, expert=e, tokens=int(row[e]),
                                 dropped_fraction=float(row[E] / row[E + 1]), aux_loss=float(row[E + 2]) / calls,
                                 z_loss=float(row[E + 3]) / calls, bias=float(layer.expert_bias[e]),
                                 cross_node_fraction=float(row[E + 5]) / kept if kept else 0.0,
                                 cross_node_rows=int(row[E + 6]))
    return summary
