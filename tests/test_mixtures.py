"""Mixtures of token files (data.paths, data.weights) and held-out evaluation (data.eval_path,
data.eval_fraction, train.eval_every): pure tests of which window sample i reads, the config
errors through the CLI, and one 2-rank run whose `eval` rows equal a single-process reference.

Each source file here holds its own token range (file k: k x 1000 + position), so a window's
first token says which file and which sample position it came from."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
from reference import single_process_run
from test_hostile_config import _refused
from test_training import run_cli

from tierzero.launcher.config import ConfigError, load_config
from tierzero.recipes.config import DataConfig
from tierzero.recipes.data import (MixtureDataset, TokenFileDataset, build_dataset, build_datasets,
                                   mixture_sources)
from tierzero.recipes.schedule import micro_batch_indices

SEQ = 4


def write_tokens(path: Path, source: int, num_samples: int) -> str:
    """A file of num_samples windows of SEQ tokens (+1): token t is source x 1000 + t."""
    np.arange(source * 1000, source * 1000 + num_samples * SEQ + 1, dtype=np.uint16).tofile(path)
    return str(path)


def where(batch: torch.Tensor):
    """(source, sample position) of each window, from its first token."""
    first = batch[:, 0].numpy()
    return first // 1000, (first % 1000) // SEQ


@pytest.fixture
def files(tmp_path):
    return [write_tokens(tmp_path / f"s{k}.bin", k, n) for k, n in enumerate((50, 30, 20))]


def test_source_frequencies_match_the_weights(files):
    weights, n = [5.0, 3.0, 2.0], 20_000
    data = build_dataset(DataConfig(kind="tokens", paths=files, weights=weights, seq_len=SEQ, vocab_size=4000))
    src, _ = where(data.samples(np.arange(n)))
    p = np.asarray(weights) / sum(weights)
    counts = np.bincount(src, minlength=3)
    sigma = np.sqrt(n * p * (1 - p))  # binomial standard deviation of each count
    assert np.all(np.abs(counts - n * p) < 5 * sigma), (counts, n * p, sigma)
    # a source of negligible weight is still drawn now and then, and the hash is not the identity
    rare = mixture_sources(np.arange(n), seed=1, weights=[1.0, 1e-3])
    assert 0 < rare.sum() < 5 * n * 1e-3


def test_sample_i_is_a_pure_function_of_seed_and_index(files):
    cfg = DataConfig(kind="tokens", paths=files, weights=[1, 2, 3], seq_len=SEQ, vocab_size=4000, seed=7)
    one, another = build_dataset(cfg), build_dataset(cfg)
    global_batch, steps = 16, 3
    want = one.samples(np.arange(global_batch * steps))
    for world, micro in ((1, 16), (1, 4), (2, 2), (4, 4), (4, 1)):
        for rank in range(world):
            for step in range(steps):
                for m in range(global_batch // (micro * world)):
                    idx = micro_batch_indices(step, m, dp_rank=rank, dp_size=world, micro_batch=micro,
                                              global_batch=global_batch)
                    assert torch.equal(another.samples(idx), want[idx]), (world, rank, step, m)
    # read in any order, alone or in a batch: the same windows
    shuffled = np.random.default_rng(0).permutation(global_batch * steps)
    assert torch.equal(one.samples(shuffled), want[shuffled])
    assert not torch.equal(build_dataset(DataConfig(**{**cfg.__dict__, "seed": 8})).samples(np.arange(48)), want)


def test_one_path_is_the_single_file_as_before(files):
    single = build_dataset(DataConfig(kind="tokens", path=files[0], seq_len=SEQ, vocab_size=0))
    mixture = build_dataset(DataConfig(kind="tokens", paths=files[:1], seq_len=SEQ, vocab_size=0))
    before = TokenFileDataset(files[0], SEQ)  # the reader data.path had before mixtures
    idx = np.arange(0, 400, 3)
    assert torch.equal(single.samples(idx), before.samples(idx))
    assert torch.equal(mixture.samples(idx), before.samples(idx))
    assert single.vocab_size == before.vocab_size == 50 * SEQ + 1


@pytest.mark.parametrize("fraction", [0.1, 0.25])
def test_held_out_positions_are_never_trained(files, fraction):
    cfg = DataConfig(kind="tokens", paths=files, weights=[2, 1, 1], eval_fraction=fraction, seq_len=SEQ,
                     vocab_size=4000)
    data = build_datasets(cfg)
    n = [50, 30, 20]
    held = [math.ceil(k * fraction) for k in n]
    src, pos = where(data.train.samples(np.arange(5000)))
    esrc, epos = where(data.eval.samples(np.arange(2000)))
    for s in range(3):
        trained, evaluated = set(pos[src == s]), set(epos[esrc == s])
        assert trained == set(range(n[s] - held[s]))  # all of the rest is trained, over enough samples
        assert evaluated == set(range(n[s] - held[s], n[s]))
    # the windows' targets (tokens 1..SEQ) never meet: a held-out token is never a training target
    train_targets = set(data.train.samples(np.arange(5000))[:, 1:].flatten().tolist())
    eval_targets = set(data.eval.samples(np.arange(2000))[:, 1:].flatten().tolist())
    assert not train_targets & eval_targets
    assert isinstance(data.eval, MixtureDataset) and data.eval.num_samples == sum(held)


def test_an_eval_file_is_read_whole(files, tmp_path):
    held = write_tokens(tmp_path / "held.bin", 7, 9)
    data = build_datasets(DataConfig(kind="tokens", path=files[0], eval_path=held, seq_len=SEQ, vocab_size=0))
    src, pos = where(data.eval.samples(np.arange(27)))
    assert set(src) == {7} and list(pos) == list(range(9)) * 3
    assert data.train.vocab_size == data.eval.vocab_size == 7000 + 9 * SEQ + 1  # the held-out file counts


BAD = [
    (["data.weights=[1,2]"], ["data.weights=[1.0, 2.0]", "3 file(s) of data.paths", "one weight per file"]),
    (["data.weights=[1,0,2]"], ["data.weights=[1.0, 0.0, 2.0]", "[0.0]", "positive and finite"]),
    (["data.weights=[1,-1,2]"], ["data.weights=", "[-1.0]", "positive and finite"]),
    (["data.weights=[1,.inf,2]"], ["data.weights="]),
    (["data.path=PATH0"], ["data.path=", "data.paths=", "are both set"]),
    (["data.paths=[PATH0,missing.bin]"], ["data.paths[1]='missing.bin' is not a file"]),
    (["data.eval_fraction=1.5"], ["data.eval_fraction=1.5", "[0, 1)"]),
    (["train.eval_every=5"], ["train.eval_every=5", "data.eval_path", "data.eval_fraction"]),
    (["train.eval_every=-1"], ["train.eval_every=-1", ">= 0"]),
    (["train.eval_steps=0"], ["train.eval_steps=0"]),
    (["data.eval_fraction=0.1", "data.eval_path=PATH0"], ["data.eval_path=", "data.eval_fraction=0.1", "not both"]),
]


@pytest.mark.parametrize("extra,named", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_mixtures_and_eval_keys_exit_2_and_write_nothing(extra, named, files, tmp_path, monkeypatch, capfd):
    extra = [e.replace("PATH0", files[0]) for e in extra]
    base = ["run", "dense_tiny_cpu", "launcher.nproc=1", "train.steps=1", "checkpoint.every_steps=0",
            "data.kind=tokens", f"data.paths=[{','.join(files)}]", f"data.seq_len={SEQ}"]
    _refused(tmp_path, monkeypatch, capfd, [*base, *extra], *named)


def test_mixture_keys_on_synthetic_data_and_an_emptied_file_are_refused(files):
    with pytest.raises(ConfigError, match=r"data.paths=.*data.kind=tokens"):
        load_config([], [f"data.paths=[{files[0]}]"])
    cfg = DataConfig(kind="tokens", paths=files, eval_fraction=0.99, seq_len=SEQ)
    with pytest.raises(ValueError, match=r"data.eval_fraction=0.99 leaves no training sample in data.paths\[0\]"):
        build_datasets(cfg)


# ---- a 2-rank run: eval rows equal a single-process reference's held-out losses -------------

@pytest.mark.multiprocess
def test_two_ranks_record_the_global_held_out_loss_of_a_reference(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for k, n in enumerate((4000, 2000)):  # two "languages": repeated short patterns, different per file
        pattern = rng.integers(0, 64, size=7 + k)
        path = tmp_path / f"lang{k}.bin"
        np.resize(pattern, n).astype(np.uint16).tofile(path)
        paths.append(str(path))
    args = ["train.steps=4", "train.global_batch_size=8", "train.micro_batch_size=2", "train.warmup_steps=1",
            "train.eval_every=2", "train.eval_steps=2", "model.d_model=32", "model.n_heads=2",
            "model.n_layers=1", "data.kind=tokens", "data.vocab_size=64", "data.seq_len=16",
            f"data.paths=[{','.join(paths)}]", "data.weights=[0.7,0.3]", "data.eval_fraction=0.1",
            "telemetry.peak_tflops=1.0", "telemetry.flush_every_s=1", "checkpoint.every_steps=0"]
    run = [*args, "launcher.nproc=2", "run.name=mix", "topology.emulate=[2]", "parallel.plan=zero3"]
    run_cli([sys.executable, "-m", "tierzero.launcher.cli", "run", *run], tmp_path)
    telemetry = tmp_path / "runs" / "mix" / "telemetry"
    rows = ds.dataset(telemetry / "eval", format="parquet", partitioning="hive").to_table().to_pylist()
    rows.sort(key=lambda r: r["step"])
    assert [r["step"] for r in rows] == [2, 4] and {r["rank"] for r in rows} == {0}
    assert all(r["tokens"] == 2 * 8 * 16 and r["eval_time_s"] > 0 for r in rows)
    want = single_process_run(args)  # one replica, the reference engine, all 8 x 2 held-out samples
    assert [step for step, _ in want.eval_losses] == [2, 4]
    for row, (_, loss) in zip(rows, want.eval_losses):
        assert abs(row["loss"] - loss) <= 1e-5 * loss, (row, want.eval_losses)
    assert rows[1]["loss"] < rows[0]["loss"]  # it learns the patterns: a broken eval would also "match"
    comm = ds.dataset(telemetry / "comm", format="parquet", partitioning="hive").to_table().to_pylist()
    assert {(r["step"], r["op"]) for r in comm if r["phase"] == "eval"} == {(2, "all_gather"), (4, "all_gather")}
    steps = ds.dataset(telemetry / "steps", format="parquet", partitioning="hive").to_table().to_pylist()
    for row in steps:  # training around the evaluations is the reference's too
        assert abs(row["loss"] - want.losses[row["step"] - 1]) <= 1e-5 * want.losses[row["step"] - 1], row

    from tierzero.telemetry.report import write_report

    text = write_report(tmp_path / "runs" / "mix")
    assert f"eval loss: first {rows[0]['loss']:.4f} (step 2) -> last {rows[1]['loss']:.4f} (step 4)" in text
    assert (tmp_path / "runs" / "mix" / "report" / "loss.png").stat().st_size > 0


def test_evaluation_leaves_training_and_routing_untouched_on_the_native_engine(tmp_path):
    """MoE on the native engine (zero3, aux-loss-free bias on): the held-out forward gathers and
    routes like a training forward, but the run's losses, routing rows and held-out losses are
    those of a run without evaluation, and the held-out losses are the reference engine's."""
    from reference import Recorder

    from tierzero.parallel.context import DistContext
    from tierzero.parallel.topology import emulated_topology
    from tierzero.recipes.trainer import Recipe, Trainer

    path = tmp_path / "t.bin"
    np.random.default_rng(1).integers(0, 32, size=3000).astype(np.uint16).tofile(path)
    args = ["train.steps=3", "train.global_batch_size=4", "train.micro_batch_size=2", "train.warmup_steps=1",
            "model.d_model=16", "model.n_heads=2", "model.n_layers=2", "moe.num_experts=4", "moe.top_k=2",
            "moe.expert_hidden=16", "moe.bias_update_rate=0.01", "parallel.ep=1", "data.kind=tokens", "data.vocab_size=32",
            "data.seq_len=8", f"data.path={path}", "data.eval_fraction=0.2", "train.eval_steps=1",
            "checkpoint.every_steps=0"]
    ctx = DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device="cpu", backend="none",
                      topology=emulated_topology([1]), host="test")

    def fit(*extra):
        cfg = load_config([], [*args, "parallel.engine=native", "parallel.plan=zero3", *extra])
        rec = Recorder()
        result = Trainer(Recipe.of(cfg), ctx, rec, peak_tflops=1.0, show_progress=False).fit()
        return result, rec

    evaluated, rec = fit("train.eval_every=1")
    quiet, quiet_rec = fit()
    assert evaluated.losses == quiet.losses and len(evaluated.eval_losses) == 3 and quiet.eval_losses == []
    assert rec.expert_rows == quiet_rec.expert_rows  # routing statistics and bias: training's only
    assert [r["step"] for r in rec.rows["eval"]] == [1, 2, 3]
    assert {r["phase"] for r in rec.comm_rows} == {r["phase"] for r in quiet_rec.comm_rows}  # world 1: no gathers
    want = single_process_run([*args, "train.eval_every=1"]).eval_losses
    for (step, got), (_, ref) in zip(evaluated.eval_losses, want):
        assert abs(got - ref) <= 1e-5 * ref, (step, got, ref)
