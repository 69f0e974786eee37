"""`tierzero data prepare` against the `tokenizers` library itself: a corpus built from the Python
standard library on this machine, a small BPE tokenizer trained on it (no network), and the
token file compared with tokenizing each document directly and joining with EOS."""

import ast
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

from tierzero.launcher.cli import main
from tierzero.recipes import prepare
from tierzero.recipes.prepare import PrepareError, choose_eos, token_dtype, write_prepared

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
tokenizers = pytest.importorskip("tokenizers")

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TEXT_MODULES = ["textwrap", "fnmatch", "glob", "shlex"]  # whole sources: one .txt document each
DOC_MODULES = ["string", "heapq", "csv", "calendar"]  # docstrings: one JSONL line / Parquet row each
EOS = "<|endoftext|>"


def docstrings(module: str):
    tree = ast.parse((STDLIB / f"{module}.py").read_text())
    return [d for node in ast.walk(tree) if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
            for d in [ast.get_docstring(node)] if d]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Text, JSONL and Parquet inputs (~120 KB), their documents in input order, and a BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("corpus")
    texts = root / "texts"
    (texts / "more").mkdir(parents=True)
    sources = [(STDLIB / f"{m}.py").read_text() for m in TEXT_MODULES]
    names = ["a.txt", "b.txt", "more/c.txt", "more/d.txt"]
    for name, text in zip(names, sources):
        (texts / name).write_text(text)
    (texts / "README.md").write_text("not an input: the suffix is not read")
    (texts / ".hidden.txt").write_text("not an input: hidden")

    docs = docstrings("string") + docstrings("heapq")
    docs[3] = f"a document that quotes {EOS} in its text is still one document, caf\u00e9 \U0001F600"
    lines = [json.dumps({"id": i, "text": d}) for i, d in enumerate(docs)]
    lines[5:5] = ["", json.dumps({"text": ""}), json.dumps({"text": None, "id": -1})]  # blank, empty, null: skipped
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")

    rows = docstrings("csv") + docstrings("calendar")
    table = pa.table({"id": list(range(len(rows) + 1)), "body": rows[:2] + [None] + rows[2:]})
    pq.write_table(table, root / "docs.parquet", row_group_size=16)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sources + docs + rows, trainer)
    tok.save(str(root / "tokenizer.json"))
    documents = sources + [d for d in docs] + rows  # input order: folder (sorted), JSONL, Parquet
    inputs = [str(texts), str(root / "docs.jsonl"), str(root / "docs.parquet")]
    return dict(root=root, inputs=inputs, documents=documents, tokenizer=str(root / "tokenizer.json"),
                num_empty=3)


def reference(tokenizer_path: str, documents, dtype: str = "uint16") -> np.ndarray:
    """Each document through `tokenizers` directly (special-token text read as text), EOS after each."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_path)
    tok.encode_special_tokens = True
    eos = tok.token_to_id(EOS)
    ids = []
    for doc in documents:
        ids += tok.encode(doc, add_special_tokens=False).ids + [eos]
    return np.asarray(ids, dtype=dtype)


def leftovers(out: Path):
    return sorted(p.name for p in out.parent.glob(f".{out.name}.prepare-*"))


def test_token_file_is_the_reference_for_one_and_two_workers(corpus, tmp_path, capsys):
    out1, out2 = tmp_path / "w1", tmp_path / "w2"
    rc = main(["data", "prepare", *corpus["inputs"], "--tokenizer", corpus["tokenizer"], str(out1),
               "--column", "body", "--workers", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"data.path={out1 / 'tokens.bin'} data.token_dtype=uint16" in printed
    # two workers, many small batches: order must survive the pool
    done = write_prepared(corpus["inputs"], corpus["tokenizer"], str(out2), column="body", num_workers=2,
                          batch_bytes=2048, progress=False)
    expected = reference(corpus["tokenizer"], corpus["documents"])
    one = (out1 / "tokens.bin").read_bytes()
    assert one == (out2 / "tokens.bin").read_bytes()
    np.testing.assert_array_equal(np.frombuffer(one, dtype=np.uint16), expected)

    side = json.loads((out1 / "tokens.json").read_text())
    eos = side["tokenizer"]["eos_id"]
    assert side["dtype"] == "uint16" and side["tokenizer"]["eos_token"] == EOS
    assert side["num_tokens"] == len(expected) == done.num_tokens
    assert side["num_documents"] == len(corpus["documents"]) == int((expected == eos).sum())  # quoted EOS is text
    assert side["num_empty_skipped"] == corpus["num_empty"]
    assert side["tokenizer"]["vocab_size"] == 600 and side["tokenizer"]["num_ids"] == 600
    import hashlib

    assert side["tokenizer"]["sha256"] == hashlib.sha256(Path(corpus["tokenizer"]).read_bytes()).hexdigest()
    paths = [Path(s["path"]).relative_to(corpus["root"]).as_posix() for s in side["sources"]]
    assert paths == ["texts/a.txt", "texts/b.txt", "texts/more/c.txt", "texts/more/d.txt", "docs.jsonl",
                     "docs.parquet"]
    assert sum(s["num_tokens"] for s in side["sources"]) == side["num_tokens"]
    assert [s["num_documents"] for s in side["sources"]][:4] == [1, 1, 1, 1]
    src = side["sources"][4]
    assert src["key"] == "text" and src["size_bytes"] == os.path.getsize(corpus["inputs"][1])
    assert src["sha256"] == hashlib.sha256(Path(corpus["inputs"][1]).read_bytes()).hexdigest()
    assert side["sources"][5]["key"] == "body"
    assert not leftovers(out1) and not leftovers(out2)


def test_the_recipes_reader_reads_the_prepared_file(corpus, tmp_path):
    from tierzero.recipes.config import DataConfig
    from tierzero.recipes.data import build_dataset

    out = tmp_path / "out"
    done = write_prepared(corpus["inputs"], corpus["tokenizer"], str(out), column="body", num_workers=1, progress=False)
    side = json.loads((out / "tokens.json").read_text())
    ds = build_dataset(DataConfig(kind="tokens", path=done.tokens_path, token_dtype=side["dtype"], seq_len=32,
                                  vocab_size=side["data_keys"]["data.vocab_size"]))
    tokens = np.fromfile(done.tokens_path, dtype=side["dtype"]).astype(np.int64)
    last = ds.num_samples - 1
    batch = ds.samples([0, 1, last]).numpy()
    for row, j in zip(batch, [0, 1, last]):
        np.testing.assert_array_equal(row, tokens[j * 32: j * 32 + 33])
    assert batch.max() < ds.vocab_size == 600


def test_ids_past_uint16_are_written_as_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from tierzero.recipes.config import DataConfig
    from tierzero.recipes.data import build_dataset

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2, "</s>": 70000}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["</s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    docs = ["hello world " * 5, "world hello other"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "out"
    assert main(["data", "prepare", str(tmp_path / "in.jsonl"), "--tokenizer", str(tmp_path), str(out)]) == 0
    side = json.loads((out / "tokens.json").read_text())
    assert side["dtype"] == "uint32" and side["tokenizer"]["num_ids"] == 70001
    expected = [1, 2] * 5 + [70000] + [2, 1, 0, 70000]
    np.testing.assert_array_equal(np.fromfile(out / "tokens.bin", dtype=np.uint32), expected)
    ds = build_dataset(DataConfig(kind="tokens", path=str(out / "tokens.bin"), token_dtype="uint32", seq_len=4,
                                  vocab_size=70001))
    assert ds.samples([0]).tolist() == [expected[:5]]
    # uint32 read as uint16 would pass the size check (an even number of 16-bit halves): the sidecar catches it
    with pytest.raises(ValueError, match=r"as uint32 tokens .* data.token_dtype=uint16; set data.token_dtype=uint32"):
        build_dataset(DataConfig(kind="tokens", path=str(out / "tokens.bin"), token_dtype="uint16", seq_len=4))
    with pytest.raises(ValueError, match=r"70001-token vocabulary .* data.vocab_size=3; set data.vocab_size=70001"):
        build_dataset(DataConfig(kind="tokens", path=str(out / "tokens.bin"), token_dtype="uint32", seq_len=4,
                                 vocab_size=3))


def test_dtype_is_the_narrowest_that_holds_every_id():
    assert token_dtype(600) == token_dtype(65536) == "uint16"
    assert token_dtype(65537) == token_dtype(2**32) == "uint32"
    with pytest.raises(PrepareError, match="4,294,967,297 token ids, more than uint32"):
        token_dtype(2**32 + 1)


def test_eos_choice():
    vocab = {"</s>": 2, "<|endoftext|>": 7, "<pad>": 0}
    assert choose_eos(vocab, [], config_eos=None, requested=None, where="t") == "<|endoftext|>"
    assert choose_eos(vocab, [], config_eos="</s>", requested=None, where="t") == "</s>"
    assert choose_eos(vocab, [], config_eos="</s>", requested="<pad>", where="t") == "<pad>"
    with pytest.raises(PrepareError, match="--eos-token '<eot>' is not a token of t"):
        choose_eos(vocab, ["<pad>"], config_eos=None, requested="<eot>", where="t")
    with pytest.raises(PrepareError, match=r"has no end-of-document token.*special tokens: <pad>.*--eos-token"):
        choose_eos({"<pad>": 0, "a": 1}, ["<pad>"], config_eos=None, requested=None, where="t")


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


BAD = {
    "jsonl without the field": (lambda d: [_write(d / "x.jsonl", '{"text": "a"}\n{"text": "b"}\n{"body": "c"}\n')],
                                ["x.jsonl, line 3 has no field 'text'", "--field body"]),
    "invalid JSON": (lambda d: [_write(d / "x.jsonl", '{"text": "a"}\n{"text": \n')], ["line 2 is not valid JSON"]),
    "parquet without the column": (
        lambda d: [pq.write_table(pa.table({"body": ["a"]}), d / "x.parquet") or str(d / "x.parquet")],
        ["x.parquet has no column 'text' (its columns: body)", "--column body"]),
    "empty file": (lambda d: [_write(d / "x.txt", "")], ["x.txt is empty (0 bytes)"]),
    "no document in it": (lambda d: [_write(d / "x.jsonl", '\n{"text": ""}\n\n')], ["x.jsonl holds no document"]),
    "missing file": (lambda d: [str(d / "nope.jsonl")], ["nope.jsonl does not exist"]),
    "unknown suffix": (lambda d: [_write(d / "x.csv", "a,b\n")], ["x.csv: tierzero reads .txt, .jsonl"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_and_writes_nothing(corpus, tmp_path, capsys, case):
    make, expected = BAD[case]
    (tmp_path / "in").mkdir()
    good = str(tmp_path / "in" / "good.txt")
    Path(good).write_text("a good document comes first, so a late error has written tokens")
    inputs = [good] + make(tmp_path / "in")
    out = tmp_path / "out"
    assert main(["data", "prepare", *inputs, "--tokenizer", corpus["tokenizer"], str(out)]) == 2
    err = capsys.readouterr().err
    for phrase in expected:
        assert phrase in err
    assert "Traceback" not in err
    assert not out.exists() and not leftovers(out)


def test_bad_tokenizers_exit_2(corpus, tmp_path, capsys, monkeypatch):
    from tokenizers import Tokenizer, models

    doc = _write(tmp_path / "doc.txt", "hello")
    out = tmp_path / "out"
    garbage = _write(tmp_path / "garbage.json", '{"not": "a tokenizer"}')
    Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]")).save(str(tmp_path / "no_eos.json"))
    cases = [
        ([garbage], "cannot read"),
        ([str(tmp_path / "absent.json")], "absent.json does not exist"),
        ([str(tmp_path / "no_eos.json")], "no end-of-document token"),
        ([str(tmp_path / "no_eos.json"), "--eos-token", "</s>"], "--eos-token '</s>' is not a token"),
    ]
    for args, phrase in cases:
        assert main(["data", "prepare", doc, "--tokenizer", *args, str(out)]) == 2
        assert phrase in capsys.readouterr().err
    monkeypatch.setattr(prepare, "count_ids", lambda tok: (2**32 + 1, 2**32 + 1))
    assert main(["data", "prepare", doc, "--tokenizer", corpus["tokenizer"], str(out)]) == 2
    assert "more than uint32 holds" in capsys.readouterr().err
    assert not out.exists() and not leftovers(out)


def test_a_non_empty_out_dir_is_left_alone(corpus, tmp_path, capsys):
    doc = _write(tmp_path / "doc.txt", "hello")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.bin").write_bytes(b"user data")
    assert main(["data", "prepare", doc, "--tokenizer", corpus["tokenizer"], str(out)]) == 2
    err = capsys.readouterr().err
    assert "is not empty (1 entries, e.g. mine.bin)" in err and "pick a new OUT_DIR" in err
    assert os.listdir(out) == ["mine.bin"] and (out / "mine.bin").read_bytes() == b"user data"
    assert not leftovers(out)
    (out / "mine.bin").unlink()  # an empty folder is fine
    assert main(["data", "prepare", doc, "--tokenizer", corpus["tokenizer"], str(out), "--workers", "1"]) == 0
    assert sorted(os.listdir(out)) == ["tokens.bin", "tokens.json"]


def test_a_killed_prepare_leaves_no_out_dir_and_a_rerun_starts_over(corpus, tmp_path, capsys):
    big = tmp_path / "big.jsonl"
    line = json.dumps({"text": "\n".join(corpus["documents"][:4])}) + "\n"
    big.write_text(line * 40)  # ~2 MB: seconds of tokenizing, so the signal lands mid-run
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "tierzero.launcher.cli", "data", "prepare", str(big), "--tokenizer",
           corpus["tokenizer"], str(out), "--workers", "1"]
    for signum in (signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not leftovers(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signum)
        err = proc.communicate(timeout=30)[1]
        assert proc.returncode in (128 + signum, -signum), err
        assert not out.exists()
        if signum == signal.SIGTERM:
            assert not leftovers(out), "SIGTERM removes the temp folder"
    (stale,) = leftovers(out)  # SIGKILL cannot be caught: the hidden temp folder stays, never complete
    assert "tokens.json" not in os.listdir(out.parent / stale)
    doc = _write(tmp_path / "doc.txt", "hello")
    assert main(["data", "prepare", doc, "--tokenizer", corpus["tokenizer"], str(out), "--workers", "1"]) == 0
    assert stale in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["tokens.bin", "tokens.json"]


def test_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "prepare", "--help"])
    assert e.value.code == 0
    assert "tierzero data prepare books/*.txt --tokenizer" in capsys.readouterr().out
