"""train.compile=true (recipes/compiling.py: compile_model) through the real CLI on 2 gloo ranks, with
inductor's C++ backend: a compiled run is the eager run within 1e-5 in fp32 on the native engine
(zero3: its blocks' parameters are views into buffers freed between uses) and on the FSDP2
reference (with activation checkpointing), a checkpoint a compiled run wrote resumes in an eager
run under the same tensor names, an MoE model compiles with its one graph break at the MoE layer,
no graph recompiles from step to step, and the kernels go to the run folder (or the user's
TORCHINDUCTOR_CACHE_DIR), never to inductor's default under /tmp.

Compiling is the slow part (20-60 s a run on 2 shared cores): three compiled runs, each shared by
several tests; the second and third read the first one's cache, as a user's cache would be read."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from tierzero.parallel.engines import engine_errors
from tierzero.recipes.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-5
SMALL = ["launcher.nproc=2", "train.global_batch_size=8", "train.micro_batch_size=2", "train.warmup_steps=1",
         "model.d_model=32", "model.n_heads=2", "data.seq_len=16", "telemetry.peak_tflops=1.0",
         "telemetry.flush_every_s=1"]
DENSE = ["dense_tiny_cpu", *SMALL, "parallel.plan=zero3"]
MOE = [*SMALL, "train.steps=3"]
"""The default recipe is an MoE (8 experts, top 2) with parallel.ep=2: the all-to-all dispatch."""
CACHE_VARS = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


def _cli(args, cwd, *, cache=None, logs=None, timeout=600):
    """`tierzero ...` in a subprocess; `cache`: the user's TORCHINDUCTOR_CACHE_DIR (None: unset),
    `logs`: TORCH_LOGS for the ranks."""
    env = {k: v for k, v in os.environ.items() if k not in CACHE_VARS + ("TORCH_LOGS",)}
    env["PYTHONPATH"] = str(ROOT)
    if cache is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    if logs is not None:
        env["TORCH_LOGS"] = logs
    r = subprocess.run([sys.executable, "-m", "tierzero.launcher.cli", *args], cwd=cwd, capture_output=True, text=True,
                       env=env, timeout=timeout)
    assert r.returncode == 0, f"{args} -> {r.returncode}:\n{r.stdout[-2500:]}\n{r.stderr[-4000:]}"
    return r


def _losses(run_dir: Path) -> dict:
    rows = ds.dataset(run_dir / "telemetry" / "steps", format="parquet", partitioning="hive").to_table().to_pylist()
    return {r["step"]: r["loss"] for r in rows if r["rank"] == 0}


def _tensor_names(step_dir: Path) -> set:
    return set(json.loads((step_dir / "manifest.json").read_text())["tensors"])


def _graph_breaks(stderr: str) -> list:
    """The reason of every graph break the ranks logged (TORCH_LOGS=graph_breaks)."""
    return re.findall(r"\[__graph_breaks\]\s+Explanation: (.*)", stderr)


def _assert_close(got: dict, want: dict, steps) -> None:
    for step in steps:
        assert abs(got[step] - want[step]) <= TOLERANCE, (step, got[step], want[step])


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """Six steps on the native engine (zero3), checkpointing at 3 and 6: compiled (inductor's cache
    left to tierzero: the run folder), eager, and eager resumed from the compiled run's step 3."""
    base = tmp_path_factory.mktemp("native")
    common = [*DENSE, "train.steps=6", "checkpoint.every_steps=3", "checkpoint.async_save=false"]
    compiled = _cli(["run", *common, "train.compile=true", f"run.dir={base / 'compiled'}"], base,
                    logs="recompiles,graph_breaks")
    _cli(["run", *common, f"run.dir={base / 'eager'}"], base)
    _cli(["run", *common, f"checkpoint.resume={base / 'compiled' / 'checkpoints' / 'step-00000003'}",
          f"run.dir={base / 'resumed'}"], base)
    return {"dir": base, "stderr": compiled.stderr, "cache": base / "compiled" / "compile-cache"}


@pytest.mark.multiprocess
def test_compiled_native_run_is_the_eager_run(native):
    base = native["dir"]
    want, got = _losses(base / "eager"), _losses(base / "compiled")
    assert sorted(got) == list(range(1, 7))
    assert want[6] < want[1] - 0.1, "the run did not train; the comparison would prove nothing"
    _assert_close(got, want, range(1, 7))
    # a dense block is one graph, and no step recompiles it (its parameters' storage is freed and
    # gathered again between calls: the guards do not look at it)
    assert _graph_breaks(native["stderr"]) == []
    assert "[__recompiles]" not in native["stderr"], native["stderr"][-3000:]


@pytest.mark.multiprocess
def test_compile_cache_lives_in_the_run_folder(native):
    cache = native["cache"]
    assert any((cache / "fxgraph").iterdir()), "no compiled graph in <run.dir>/compile-cache"
    # inductor keeps the C++ backend's precompiled headers in its /tmp default whatever the
    # variable says; tierzero puts them beside the kernels
    assert list((cache / "precompiled_headers").glob("*.gch"))
    assert not (native["dir"] / "eager" / "compile-cache").exists(), "an eager run compiles nothing"


@pytest.mark.multiprocess
def test_a_compiled_runs_checkpoint_resumes_eagerly_under_the_same_names(native):
    base = native["dir"]
    compiled, resumed = _losses(base / "compiled"), _losses(base / "resumed")
    assert sorted(resumed) == [4, 5, 6]
    _assert_close(resumed, compiled, [4, 5, 6])
    names = _tensor_names(base / "compiled" / "checkpoints" / "step-00000003")
    assert names == _tensor_names(base / "eager" / "checkpoints" / "step-00000003")
    assert "model/blocks.0.attn.wqkv.weight" in names and not [n for n in names if "_orig_mod" in n]


@pytest.mark.multiprocess
def test_fsdp2_reference_compiles_per_block_with_activation_checkpointing(native, tmp_path):
    """FSDP2 as its experts run it with compile: each block compiled (here recomputed in its
    compiled backward), fully_shard's hooks outside the graphs, the loss compiled alone. Reads
    the native run's cache as a user's TORCHINDUCTOR_CACHE_DIR: its own run folder gets none."""
    common = [*DENSE, "train.steps=4", "parallel.engine=fsdp2", "train.activation_checkpointing=blocks"]
    r = _cli(["run", *common, "train.compile=true", f"run.dir={tmp_path / 'compiled'}"], tmp_path,
             cache=native["cache"], logs="recompiles,graph_breaks")
    _cli(["run", *common, f"run.dir={tmp_path / 'eager'}"], tmp_path)
    want, got = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert sorted(got) == [1, 2, 3, 4]
    _assert_close(got, want, range(1, 5))
    assert _graph_breaks(r.stderr) == [] and "[__recompiles]" not in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "compiled" / "compile-cache").exists(), "the user's TORCHINDUCTOR_CACHE_DIR was not used"


@pytest.mark.multiprocess
def test_moe_compiles_with_one_graph_break_at_the_moe_layer(native, tmp_path):
    """An MoE block: attention, norms and residuals compiled; the MoE layer (routing, the
    all-to-all dispatch over parallel.ep=2, experts) eager between its two graphs."""
    r = _cli(["run", *MOE, "train.compile=true", f"run.dir={tmp_path / 'compiled'}"], tmp_path,
             cache=native["cache"], logs="recompiles,graph_breaks")
    _cli(["run", *MOE, f"run.dir={tmp_path / 'eager'}"], tmp_path)
    _assert_close(_losses(tmp_path / "compiled"), _losses(tmp_path / "eager"), [1, 2, 3])
    breaks = _graph_breaks(r.stderr)
    assert breaks and all("MoEFeedForward.forward" in b for b in breaks), breaks
    assert "[__recompiles]" not in r.stderr, r.stderr[-3000:]


# ---- pure: the config rule and the cache folder ------------------------------------------------

def test_deepspeed_refuses_compile_before_launch():
    from tierzero.checkpoint.config import CheckpointConfig
    from tierzero.parallel.config import ParallelConfig
    from tierzero.parallel.moe import MoEConfig

    def errors(engine, **train):
        return engine_errors(parallel=ParallelConfig(engine=engine), moe=MoEConfig(), checkpoint=CheckpointConfig(),
                             train=TrainConfig(**train))

    (err,) = errors("deepspeed", compile=True)
    assert err.startswith("train.compile=true") and "parallel.engine=deepspeed cannot run" in err
    assert "parallel.engine=native, parallel.engine=fsdp2, parallel.engine=reference, or train.compile=false" in err
    assert errors("deepspeed") == []
    assert all(errors(engine, compile=True) == [] for engine in ("native", "fsdp2", "reference"))
    assert TrainConfig().compile is False


def test_compile_cache_is_the_users_the_runs_or_the_user_cache(monkeypatch, tmp_path):
    # importing inductor imports torch._dynamo, which creates its cache folder: not /tmp's here
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "import"))
    from torch._inductor import codecache
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from tierzero.recipes.compiling import use_compile_cache

    monkeypatch.setattr(codecache, "_HEADER_DIR", codecache._HEADER_DIR)
    monkeypatch.setattr(codecache, "_HEADER_LOCK_DIR", codecache._HEADER_LOCK_DIR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    run = str(tmp_path / "run" / "compile-cache")
    for value, run_cache, want in ((str(tmp_path / "mine"), run, str(tmp_path / "mine")),  # the user's
                                   (None, run, run),
                                   (default_cache_dir(), run, run),  # written by importing torch._dynamo
                                   (None, None, str(tmp_path / "xdg" / "tierzero" / "inductor"))):
        for key in CACHE_VARS:
            monkeypatch.delenv(key, raising=False)
        if value is not None:
            monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", value)
        assert use_compile_cache(run_cache) == want
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == want
        assert os.environ["TRITON_CACHE_DIR"] == os.path.join(want, "triton")
        assert codecache._HEADER_DIR == os.path.join(want, "precompiled_headers")
