"""Every config value checked before anything runs, tried as a careless and as a hostile user would.

Each finding goes through the CLI in-process (`main([...])` in tmp_path): exit 2, one message
naming the key (or file) and the fix, no traceback, and nothing written under the working folder.
The runs here would train (and write runs/...) if the config were let through; they are refused
before a rank starts, so each takes well under a second.
"""

import dataclasses
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tierzero.launcher import config as config_module
from tierzero.launcher.cli import main
from tierzero.launcher.config import ConfigError, check_world, describe_keys, load_config
from tierzero.launcher.signals import signal_number

ROOT = Path(__file__).resolve().parent.parent
# A run that would be quick if it started: one rank, one step, no checkpoints.
RUN = ["run", "dense_tiny_cpu", "launcher.nproc=1", "train.steps=1", "checkpoint.every_steps=0",
       "launcher.max_restarts=0"]


def _tree(root: Path):
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _refused(tmp_path, monkeypatch, capfd, argv, *named, may_block=False):
    """main(argv) in tmp_path: exit 2, every string of `named` in the message, no traceback,
    nothing new on disk. `may_block`: in a thread, so that a regression that blocks (reading a
    FIFO) fails instead of hanging; otherwise in this (the main) thread, as the CLI runs."""
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    result = {}
    if may_block:
        worker = threading.Thread(target=lambda: result.update(code=main(list(argv))), daemon=True)
        worker.start()
        worker.join(30)
        assert not worker.is_alive(), f"tierzero {argv[0]} still running after 30 s"
    else:
        result["code"] = main(list(argv))
    out, err = capfd.readouterr()
    assert result.get("code") == 2, (result, out[-2000:], err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    for text in named:
        assert text in err, (text, err[-3000:])
    assert _tree(tmp_path) == before, f"written: {sorted(_tree(tmp_path) - before)}"
    return err


# ---- 1. NaN / inf: refused by rule, for every float key --------------------------------------

NONFINITE = ["train.lr=.nan", "train.grad_clip=.nan", "model.norm_eps=.inf", "model.rope_theta=.nan",
             "moe.capacity_factor=.nan", "launcher.timeout_s=.inf", "launcher.restart_window_s=.nan",
             "train.lr=-.inf", "train.lr=nan", "train.weight_decay=1e400"]


@pytest.mark.parametrize("override", NONFINITE)
def test_nonfinite_floats_are_refused_before_a_run(override, tmp_path, monkeypatch, capfd):
    key = override.split("=")[0]
    err = _refused(tmp_path, monkeypatch, capfd, [*RUN, override], f"{key}=", "finite numbers only")
    assert sum(line.startswith(f"  - {key}=") for line in err.splitlines()) == 1  # named once, not per rule


def test_a_float_too_large_in_a_yaml_file_is_inf_and_refused(tmp_path, monkeypatch, capfd):
    (tmp_path / "big.yaml").write_text("train:\n  lr: 1e400\n  steps: 1\nlauncher:\n  nproc: 1\n")
    _refused(tmp_path, monkeypatch, capfd, ["run", "big.yaml"], "train.lr=inf", "1e400")


def _float_keys():
    return [key for key, tname, *_ in describe_keys() if "float" in tname]


def test_the_rule_covers_every_float_key_of_every_section():
    keys = _float_keys()
    assert {"train.lr", "moe.capacity_factor", "topology.bandwidths_gbps", "telemetry.peak_tflops"} <= set(keys)
    for key in keys:
        tname = dict((k, t) for k, t, *_ in describe_keys())[key]
        for bad in (".nan", ".inf", "-.inf"):
            value = f"[1.0, {bad}]" if tname.startswith("list") else bad
            with pytest.raises(ConfigError) as e:
                load_config([], [f"{key}={value}"])
            assert any(p.startswith(f"{key}=") and "finite" in p for p in e.value.problems), (key, e.value.problems)


def test_no_float_field_opts_out_of_the_rule():
    from tierzero.launcher.config import RunConfig

    for section in dataclasses.fields(RunConfig):
        for f in dataclasses.fields(section.default_factory):
            assert not f.metadata.get("allow_nonfinite"), f"{section.name}.{f.name} accepts nan/inf: say why here"


# ---- 2. ranges --------------------------------------------------------------------------------

RANGES = [
    ("train.beta1=5", "train.beta1=5.0", "[0, 1)"),
    ("train.beta1=1", "train.beta1=1.0", "[0, 1)"),
    ("train.beta2=-1", "train.beta2=-1.0", "[0, 1)"),
    ("train.weight_decay=-10", "train.weight_decay=-10.0", ">= 0"),
    ("model.params=-5", "model.params=-5.0", "positive"),
    ("launcher.requeue_signal=9", "launcher.requeue_signal='9'", "SIGKILL"),
    ("launcher.requeue_signal=19", "launcher.requeue_signal='19'", "SIGSTOP"),
    ("launcher.requeue_signal=999", "launcher.requeue_signal='999'", "not a signal number"),
    ("launcher.requeue_signal=SIGCHLD", "launcher.requeue_signal='SIGCHLD'", "child process"),
    ("launcher.requeue_signal=11", "launcher.requeue_signal='11'", "SIGSEGV"),
    ("launcher.timeout_s=1e300", "launcher.timeout_s=", "31 years"),
    ("telemetry.flush_every_s=1e300", "telemetry.flush_every_s=", "31 years"),
    ("parallel.reduce_dtype=fp8", "parallel.reduce_dtype='fp8'", "float32"),
    ("parallel.comm_timing=synced", "parallel.comm_timing='synced'", "parallel.comm_timing=aligned"),
    ("parallel.grad_sync=always", "parallel.grad_sync='always'", "parallel.grad_sync=step"),
    ("train.activation_checkpointing=layers", "train.activation_checkpointing='layers'", "blocks"),
    ("telemetry.peak_tflops=-1", "telemetry.peak_tflops=-1", "datasheet"),
    ("topology.latencies_us=[3.4,-1]", "topology.latencies_us=[3.4, -1.0]", "between 0 and 1e6"),
    ("topology.latencies_us=[3.4,9.6,1]", "topology.latencies_us=[3.4, 9.6, 1.0]", "one us figure per level"),
    ("parallel.quant_grads=int2", "parallel.quant_grads='int2'", "int4"),
    ("parallel.quant_block_size=1000000000000", "parallel.quant_block_size=1000000000000", "65536"),
]


@pytest.mark.parametrize("override,named,rule", RANGES)
def test_out_of_range_values_are_refused_before_a_run(override, named, rule, tmp_path, monkeypatch, capfd):
    _refused(tmp_path, monkeypatch, capfd, [*RUN, override], named, rule)


def _limited(argv, cwd, limit_bytes=2 << 30, timeout_s=60):
    """`tierzero ARGV` in a real process with at most `limit_bytes` of address space."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "-m", "tierzero.launcher.cli", *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout_s, preexec_fn=limit)


@pytest.mark.parametrize("sizes", ["0:1K", "0:0:4", "1," + "9" * 5000, "1K,99999999G"])
def test_bench_sizes_that_never_end_or_cannot_be_allocated_are_refused(sizes, tmp_path):
    # 0:1K doubled 0 forever (a hang that filled memory); a 5000-digit size was a traceback
    r = _limited(["config", f"bench.sizes={sizes}"], tmp_path)
    assert r.returncode == 2 and "bench.sizes=" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert _tree(tmp_path) == set()


@pytest.mark.parametrize("override", ["train.beta1=0", "train.beta2=0.999", "train.weight_decay=0",
                                      "launcher.requeue_signal=SIGHUP", "launcher.requeue_signal=12",
                                      "launcher.requeue_signal=usr1", "launcher.timeout_s=1e9"])
def test_edge_values_inside_the_ranges_pass(override):
    load_config(["dense_tiny_cpu"], [override])


def test_signal_numbers_follow_the_rules_of_their_names():
    assert signal_number("12") == signal_number("SIGUSR2") == signal_number("usr2") == signal.SIGUSR2
    for text in ("9", "SIGKILL", "19", "STOP", "11", "17", "0", "65", "SIGNOPE", "-1"):
        with pytest.raises(ValueError):
            signal_number(text)


# ---- 3. YAML alias bombs and size: a budget ----------------------------------------------------

def _bomb(levels: int) -> str:
    """'Billion laughs': each level a list of 9 aliases of the one before; 9 levels ~ 360 bytes, 9**9 leaves."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        name, prev = chr(ord("a") + i), chr(ord("a") + i - 1)
        lines.append(f"{name}: &{name} [" + ",".join(f"*{prev}" for _ in range(9)) + "]")
    lines.append(f"train: {{lr: *{chr(ord('a') + levels - 1)}}}")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_file_is_refused_at_once(tmp_path, monkeypatch, capfd):
    # 7 levels (290 bytes) made 35 MB of error text and 160 MB of memory in 3 s; 9 levels exhaust memory
    (tmp_path / "bomb.yaml").write_text(_bomb(7))
    t0 = time.monotonic()
    err = _refused(tmp_path, monkeypatch, capfd, ["config", "bomb.yaml"], "bomb.yaml", "alias")
    assert time.monotonic() - t0 < 10 and len(err) < 2000, (time.monotonic() - t0, len(err))


def test_an_alias_bomb_in_a_real_process_stays_small(tmp_path):
    """The full 9-level bomb (358 bytes) under a 2 GB address-space limit: exit 2 in seconds
    (it took > 1 GB and minutes, or died of MemoryError, before)."""
    (tmp_path / "bomb.yaml").write_text(_bomb(9))
    assert len(_bomb(9)) < 400

    t0 = time.monotonic()
    r = _limited(["config", "bomb.yaml"], tmp_path, timeout_s=120)
    assert r.returncode == 2 and "bomb.yaml" in r.stderr and "alias" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and len(r.stderr) < 2000
    assert time.monotonic() - t0 < 60
    assert _tree(tmp_path) == {"bomb.yaml"}


def test_an_alias_bomb_in_an_override_is_refused(tmp_path, monkeypatch, capfd):
    inline = "{" + _bomb(7).strip().replace("\n", ", ").replace("train: {lr: *g}", "z: *g") + "}"
    _refused(tmp_path, monkeypatch, capfd, ["config", f"slurm.extra_sbatch={inline}"], "slurm.extra_sbatch", "alias")


def test_recipes_use_no_anchors_and_load_within_the_budget():
    for recipe in sorted((ROOT / "recipes" / "configs").glob("*.yaml")):
        text = recipe.read_text()
        assert len(text.encode()) < config_module.MAX_CONFIG_BYTES
        config_module.load_yaml(text)  # raises YAMLBudgetError for an anchor, an alias or too deep a nesting


def test_merge_keys_need_aliases_and_are_refused():
    with pytest.raises(config_module.YAMLBudgetError):
        config_module.load_yaml("base: &b {lr: 1}\ntrain:\n  <<: *b\n")


# ---- 4. config files that are not config files -----------------------------------------------

def _deep(levels: int) -> str:
    return "train: " + "[" * levels + "]" * levels + "\n"


FILES = {
    "a folder": (lambda p: p.mkdir(), "is a folder"),
    "invalid UTF-8": (lambda p: p.write_bytes(b"train:\n  lr: \xff\xfe\x00\x01\n"), "not UTF-8"),
    "binary": (lambda p: p.write_bytes(bytes(range(256)) * 16), "not UTF-8"),
    "a FIFO": (lambda p: os.mkfifo(p), "not a regular file"),
    "nested 5000 deep": (lambda p: p.write_text(_deep(5000)), "deeper than 16 levels"),
    "nested maps 3000 deep": (lambda p: p.write_text("train: " + "{a: " * 3000 + "1" + "}" * 3000), "deeper"),
    "over the size cap": (lambda p: p.write_text("train:\n  steps: 3\n" + ("#" + "x" * 99 + "\n") * 3000),
                          "larger than"),
    "too many values": (lambda p: p.write_text("slurm:\n  sweep_nodes: [" + ",".join(["1"] * 6000) + "]\n"),
                        "more than"),
}


@pytest.mark.parametrize("what", sorted(FILES))
def test_config_files_that_cannot_be_configs_are_one_message(what, tmp_path, monkeypatch, capfd):
    make, says = FILES[what]
    make(tmp_path / "cfg.yaml")
    _refused(tmp_path, monkeypatch, capfd, ["config", "cfg.yaml"], "'cfg.yaml'", says, may_block=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_an_unreadable_config_file_is_one_message(tmp_path, monkeypatch, capfd):
    (tmp_path / "cfg.yaml").write_text("train:\n  steps: 3\n")
    (tmp_path / "cfg.yaml").chmod(0)
    _refused(tmp_path, monkeypatch, capfd, ["config", "cfg.yaml"], "'cfg.yaml'", "cannot be opened")


def test_a_junk_file_lists_a_bounded_number_of_problems(tmp_path, monkeypatch, capfd):
    (tmp_path / "junk.yaml").write_text("".join(f"k{i}: {i}\n" for i in range(2000)))
    err = _refused(tmp_path, monkeypatch, capfd, ["config", "junk.yaml"], "'k0'", "and 1980 more problem(s)")
    assert len(err.splitlines()) < 30


def test_an_integer_too_large_for_a_float_is_a_type_error(tmp_path, monkeypatch, capfd):
    err = _refused(tmp_path, monkeypatch, capfd, ["config", "train.lr=1" + "0" * 400], "train.lr=", "float")
    assert len(err) < 1000


# ---- 5. names end at \Z, not before a trailing newline -----------------------------------------

@pytest.mark.parametrize("override,key", [('run.name="tiny\\n"', "run.name"), ('slurm.mem="64G\\n"', "slurm.mem"),
                                          ('slurm.time="10:00\\n"', "slurm.time"),
                                          ('bench.scopes=["global\\n"]', "bench.scopes"),
                                          ("slurm.mem=٦٤G", "slurm.mem")])
def test_a_trailing_newline_or_a_non_ascii_digit_is_refused(override, key, tmp_path, monkeypatch, capfd):
    _refused(tmp_path, monkeypatch, capfd, [*RUN, override], f"{key}=")


# ---- 6. values sbatch's #SBATCH parser would cut or change -------------------------------------

@pytest.mark.parametrize("override,key,what", [
    ("slurm.partition=gpu#2", "slurm.partition", "'#'"),
    ("slurm.account=proj\\", "slurm.account", "backslash"),
    ("slurm.constraint=a\\b", "slurm.constraint", "backslash"),
    ("slurm.job_name=run#3", "slurm.job_name", "'#'"),
    ("slurm.output=logs/a#b.out", "slurm.output", "'#'"),
    ("slurm.extra_sbatch=[--comment=a#b]", "slurm.extra_sbatch[0]", "unquoted '#'"),
    ("slurm.extra_sbatch=[--comment=a\\b]", "slurm.extra_sbatch[0]", "backslash"),
])
def test_sbatch_values_sbatch_would_cut_are_refused(override, key, what, tmp_path, monkeypatch, capfd):
    _refused(tmp_path, monkeypatch, capfd, ["sbatch", "dense_tiny_cpu", override], f"{key}=", what)


def test_a_run_dir_with_a_hash_is_refused_for_the_slurm_log(tmp_path, monkeypatch, capfd):
    _refused(tmp_path, monkeypatch, capfd, ["sbatch", "dense_tiny_cpu", f"run.dir={tmp_path}/x#y/run"],
             "run.dir=", "'#'")


# ---- 7. memory:// with several processes ------------------------------------------------------

@pytest.mark.parametrize("key", ["checkpoint.dir", "telemetry.dir"])
def test_memory_storage_with_several_local_ranks_is_refused(key, tmp_path, monkeypatch, capfd):
    # on HEAD: two ranks each wrote into their own memory:// and the first commit waited forever
    argv = ["run", "dense_tiny_cpu", "launcher.nproc=2", "train.steps=2", "train.global_batch_size=16",
            "train.micro_batch_size=8", "checkpoint.every_steps=1", f"{key}=memory://tz-hostile/{key}",
            "launcher.hang_timeout_s=10", "launcher.max_restarts=0"]
    _refused(tmp_path, monkeypatch, capfd, argv, f"{key}='memory://", "launcher.nproc=2")


def test_memory_storage_is_checked_against_the_real_world_size():
    cfg = load_config(["dense_tiny_cpu"], ["launcher.nproc=1", "checkpoint.dir=memory://tz-one/ckpt",
                                           "telemetry.dir=memory://tz-one/tel"])
    assert check_world(cfg, 1) == []  # one process: memory:// keeps working
    problems = check_world(cfg, 8)  # e.g. 8 Slurm tasks, whatever launcher.nproc says
    assert [p.split("=")[0] for p in problems if "memory://" in p] == ["checkpoint.dir", "telemetry.dir"]
    assert all("8 processes" in p for p in problems if "memory://" in p)
    assert not [p for p in check_world(cfg, 8, batch=False) if "memory://" in p]  # planning runs nothing


# ---- 8. locations whose protocol tierzero cannot use ------------------------------------------

@pytest.mark.parametrize("override", ["checkpoint.dir=ftp://127.0.0.1:1/ckpt", "checkpoint.dir=foo://x/ckpt",
                                      "telemetry.dir=ftp://127.0.0.1:1/tel", "checkpoint.resume=foo://x/step-1",
                                      "checkpoint.init_from=gs://bucket/model.safetensors",
                                      "checkpoint.dir=simplecache::s3://bucket/ckpt",
                                      "checkpoint.dir=S3://bucket/ckpt"])
def test_unsupported_protocols_are_refused_naming_the_supported_ones(override, tmp_path, monkeypatch, capfd):
    key = override.split("=")[0]
    err = _refused(tmp_path, monkeypatch, capfd, [*RUN, override], f"{key}=")
    assert "s3://" in err and "file://" in err


def test_s3_without_s3fs_is_refused_naming_the_extra(tmp_path, monkeypatch, capfd):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # what `import s3fs` sees where it is not installed
    _refused(tmp_path, monkeypatch, capfd, [*RUN, "checkpoint.dir=s3://bucket/ckpt"], "checkpoint.dir=",
             "tierzero[s3]")


@pytest.mark.parametrize("override", ["checkpoint.dir=s3://bucket/ckpt", "checkpoint.dir=file:///tmp/ckpt",
                                      "checkpoint.dir=relative/ckpt", "telemetry.dir=memory://tz-one/tel",
                                      "checkpoint.resume=/abs/step-00000001", "checkpoint.resume=none"])
def test_supported_locations_pass_without_a_connection(override):
    load_config(["dense_tiny_cpu"], ["launcher.nproc=1", override])


def test_a_config_whose_config_yaml_would_break_the_budget_is_refused():
    """Each override within the budget, together past it: refused here, not by every rank
    reading the config.yaml `tierzero run` wrote."""
    lists = ["slurm.setup=[" + ",".join(["echo"] * 3000) + "]", "slurm.extra_sbatch=[" + ",".join(["--a"] * 3000) + "]"]
    with pytest.raises(ConfigError) as e:
        load_config(["dense_tiny_cpu"], lists)
    assert "config.yaml" in str(e.value) and "5000 values" in str(e.value)
    with pytest.raises(ConfigError, match="256 KiB"):
        load_config(["dense_tiny_cpu"], ["slurm.setup=[" + ",".join(["x" * 60_000] * 5) + "]"])


# ---- 9. a file that is not a config is not echoed (issue 24, item 3) ---------------------------

# /etc/shadow's lines end in ':', so YAML reads each one as a key: every line came back as
# "Unknown config key 'root:*:...'", into logs others may read (Slurm output files).
SHADOW = ("root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n"
          "alice:$6$rounds=5000$Zx9s0mEsalt$8fJ2kq0hash.of.a.password/xyz:19000:0:99999:7:::\n")
NOT_CONFIGS = {
    "shadow lines": SHADOW,
    "passwd lines": "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000:Alice Liddell:/home/alice:/bin/sh\n",
    "a list": "- hunter2-the-password\n- s3cr3t-token-abcdef\n",
    "a scalar": "AKIAIOSFODNN7EXAMPLE/wJalrXUtnFEMIK7MDENG\n",
    "a mapping with a key that is no name": "train: {steps: 3}\ndb password: hunter2-the-password\n",
}


def _secret_text(case: str) -> str:
    if case == "the real /etc/shadow":
        try:
            return Path("/etc/shadow").read_text()
        except OSError:
            pytest.skip("/etc/shadow is not readable here")
    return NOT_CONFIGS[case]


@pytest.mark.parametrize("link", [False, True], ids=["file", "link"])
@pytest.mark.parametrize("case", [*sorted(NOT_CONFIGS), "the real /etc/shadow"])
def test_a_file_that_is_not_a_config_is_named_never_echoed(case, link, tmp_path, monkeypatch, capfd):
    text = _secret_text(case)
    secret = tmp_path / "secret"
    secret.write_text(text)
    if link:  # ln -s /etc/shadow shadow.yaml; tierzero config shadow.yaml
        (tmp_path / "shadow.yaml").symlink_to(secret)
    else:
        secret.rename(tmp_path / "shadow.yaml")
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    code = main(["config", "shadow.yaml"])
    out, err = capfd.readouterr()
    assert code == 2, (out[-2000:], err[-2000:])
    assert "'shadow.yaml' is not a tierzero config" in err and "mapping of sections (run, " in err, err
    shown = out + err
    for line in filter(None, (line.strip() for line in text.splitlines())):
        for part in (line, line.rstrip(":"), line[:12]):
            assert part not in shown, (part, shown[-2000:])
    assert "hunter2" not in shown and "Traceback" not in shown
    assert _tree(tmp_path) == before


def test_a_typo_in_a_real_config_file_is_still_named_with_suggestions(tmp_path, monkeypatch, capfd):
    (tmp_path / "cfg.yaml").write_text("train:\n  stepz: 3\n")
    _refused(tmp_path, monkeypatch, capfd, ["config", "cfg.yaml"], "'train.stepz' (in cfg.yaml)", "train.steps")
    # a key no name inside a real section: named, cut short (it may still be a line of another file)
    (tmp_path / "cfg.yaml").write_text("train:\n  " + SHADOW.splitlines()[2] + "\n")
    err = _refused(tmp_path, monkeypatch, capfd, ["config", "cfg.yaml"], "Unknown config key 'train.alice:$6$",
                   "characters)")
    assert "password" not in err and len(err) < 1000


def test_a_long_override_is_echoed_cut(tmp_path, monkeypatch, capfd):
    err = _refused(tmp_path, monkeypatch, capfd, ["config", "train." + "z" * 300 + "=3"], "Unknown config key 'train.z")
    assert "z" * 60 not in err
    err = _refused(tmp_path, monkeypatch, capfd, ["config", "q" * 5000], "cannot be opened", "File name too long")
    assert "q" * 200 not in err
