"""Fuzz `tierzero config` with generated overrides and YAML files (hypothesis).

Whatever a careless or hostile user types, composing and checking a config ends in exit 0 (a
config, printed; printed again, it reads back the same) or exit 2 (problems, each naming what
to fix) -- never an uncaught exception, never a traceback, never a file written under the
working folder. The values mix YAML scalars, NaN/inf spellings, numbers too large for a float
or an int64, lists, nested maps, anchors and aliases, unicode and control characters.
"""

import contextlib
import io
import os
import string
import tempfile
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402
from hypothesis.configuration import set_hypothesis_home_dir  # noqa: E402

set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "tierzero-hypothesis")  # its caches, not in the checkout

from tierzero.launcher.cli import main  # noqa: E402
from tierzero.launcher.config import ConfigError, describe_keys, load_config, to_yaml  # noqa: E402

KEYS = [row[0] for row in describe_keys()]
SECTIONS = sorted({key.split(".")[0] for key in KEYS})

# Spellings that YAML, OmegaConf or float() read as something surprising.
TRICKY = [
    ".nan", ".NaN", "nan", "NaN", ".inf", "-.inf", "+.inf", ".Inf", "inf", "-inf", "Infinity", "-Infinity",
    "1e400", "-1e400", "1e-400", "1.0e+400", "1" + "0" * 400, "-" + "9" * 5000, "9" * 30, str(2**63), str(-2**63 - 1),
    "0x1F", "0o17", "0b101", "1_000", "1:30", "10:00:00", "190:20:30", "2001-12-14", "2001-12-14t21:59:43.10-05:00",
    "~", "null", "Null", "NULL", "", "''", '""', "true", "yes", "on", "off", "y", "n",
    "[]", "{}", "[1, [2, [3]]]", "{a: {b: {c: 1}}}", "[.nan, 1]", "[1e400]", "[-1, 0]", "[[]]",
    "&a 1", "*a", "[&a 1, *a]", "{<<: {a: 1}}", "!!python/object/apply:os.system ['true']", "!!binary aGVsbG8=",
    "!!set {a, b}", "!!float x", "!!int 1.5", "!!str 1", "? a", "- a", "a: b", "a:b", "'it''s'", '"a\\nb"',
    '"\\x00"', '"\\u202e"', "\t", " ", "#", "a#b", "a #b", "a\\", "\\", "%", "%j", "@", "`x`", "$(touch PWNED)",
    "[" * 40 + "]" * 40, "{a: " * 30 + "1" + "}" * 30, "../../etc/passwd", "/", "memory://x", "s3://b/k",
    "ftp://h/p", "a::b", "data:text/plain,hi", "SIGKILL", "9", "19", "SIGUSR2", "USR2", "12", "ü", "🙂", "\u0660",
    "٦٤G", "64G\n", "global\n", "x" * 300,
]
SCALAR_TEXT = st.one_of(
    st.sampled_from(TRICKY),
    st.text(max_size=30),  # any unicode, control characters included
    st.text(alphabet=string.printable, max_size=30),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6).map(str),
)
FLOW_TEXT = st.recursive(
    SCALAR_TEXT.filter(lambda t: t and t[0] not in "[]{},#&*!|>'\"%@`" and not set(t) & set("[]{},\n")),
    lambda inner: st.one_of(st.lists(inner, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"),
                            st.dictionaries(st.sampled_from(["a", "b", "lr", "steps"]), inner, max_size=3).map(
                                lambda d: "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}")),
    max_leaves=8,
)
KEY = st.one_of(
    st.sampled_from(KEYS),
    st.sampled_from(KEYS),  # known keys twice as often: they reach the value checks
    st.sampled_from(SECTIONS),
    st.sampled_from(KEYS).map(lambda k: k + "x"),
    st.sampled_from(KEYS).map(lambda k: k.upper()),
    st.sampled_from(KEYS).map(lambda k: k + ".deeper"),
    st.text(max_size=20).filter(lambda k: "=" not in k),
)
OVERRIDE = st.builds(lambda k, v: f"{k}={v}", KEY, st.one_of(SCALAR_TEXT, FLOW_TEXT))

PY_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), st.sampled_from(TRICKY))
PY_VALUE = st.recursive(PY_SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                           st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                        max_leaves=10)
SECTION_DOC = st.dictionaries(
    st.one_of(st.sampled_from(SECTIONS), st.text(max_size=10)),
    st.one_of(st.dictionaries(st.one_of(st.sampled_from([k.split(".", 1)[1] for k in KEYS]), st.text(max_size=10)),
                              PY_VALUE, max_size=6), PY_VALUE),
    max_size=5,
)


def _yaml_text(doc) -> str:
    try:
        return yaml.safe_dump(doc, allow_unicode=True)
    except yaml.YAMLError:  # e.g. a surrogate or a control character safe_dump cannot write
        return repr(doc)


YAML_FILE = st.one_of(
    SECTION_DOC.map(_yaml_text),
    st.builds(lambda key, value: "\n".join([f"{key.split('.')[0]}:", f"  {key.split('.', 1)[1]}: {value}", ""]),
              st.sampled_from(KEYS), st.one_of(SCALAR_TEXT, FLOW_TEXT)),
    st.text(max_size=200),
    st.binary(max_size=200),
)


def _tree(root: str):
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))


def _config(args):
    """`tierzero config ARGS` in a fresh empty folder: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="tz-fuzz-") as work:
        os.chdir(work)
        try:
            argv = []
            for arg in args:
                if isinstance(arg, tuple):  # ("file", content): written here, passed by name
                    name = f"in{len(argv)}.yaml"
                    content = arg[1] if isinstance(arg[1], bytes) else arg[1].encode("utf-8", "surrogatepass")
                    Path(name).write_bytes(content)
                    argv.append(name)
                else:
                    argv.append(arg)
            before = _tree(work)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(["config", *argv])
            assert _tree(work) == before, f"tierzero config {argv!r} wrote {sorted(set(_tree(work)) - set(before))}"
        finally:
            os.chdir(old)
    return code, out.getvalue(), err.getvalue(), argv


def _check(args):
    code, out, err, argv = _config(args)
    assert code in (0, 2), (argv, code, err[-2000:])
    assert "Traceback" not in err, (argv, err[-2000:])
    if code == 2:
        assert err.strip() and len(err) < 20_000, (argv, len(err))
    else:
        # what `tierzero run` writes as config.yaml reads back as the same config
        with tempfile.TemporaryDirectory(prefix="tz-fuzz-") as work:
            path = Path(work) / "config.yaml"
            path.write_text(out)
            try:
                again = load_config([str(path)])
            except ConfigError as e:
                raise AssertionError(f"the config printed for {argv!r} does not read back: {e.problems}") from e
            assert to_yaml(again) == out, argv


FUZZ = settings(max_examples=80, deadline=None, database=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])


@FUZZ
@given(st.lists(OVERRIDE, min_size=1, max_size=6))
def test_generated_overrides_exit_0_or_2(overrides):
    _check(overrides)


@FUZZ
@given(YAML_FILE, st.lists(OVERRIDE, max_size=2))
def test_generated_yaml_files_exit_0_or_2(text, overrides):
    _check([("file", text), *overrides])
