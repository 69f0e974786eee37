"""`tierzero data prepare`: text, JSONL and Parquet in, the token file `data.kind=tokens` reads out.

The pure pieces (which inputs, which end-of-document token, which dtype, what the sidecar says,
how a batch of documents becomes tokens) take plain values and are tested without processes.
`write_prepared` is the one side-effecting runner: it tokenizes in worker processes, writes into
a temp folder beside OUT_DIR and renames it to OUT_DIR at the end, so OUT_DIR either does not
exist or holds a finished token file and its sidecar (docs/data.md, "Preparing your own text").

`tokenizers` and `pyarrow` are imported lazily, inside the functions that use them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from tierzero.checkpoint.store import fsync_dir

log = logging.getLogger(__name__)

TOKENS_FILE = "tokens.bin"
"""The token file in OUT_DIR: what data.path names."""
SIDECAR_FILE = "tokens.json"
"""The sidecar in OUT_DIR: how the token file was made."""
SIDECAR_FORMAT = "tierzero-tokens/1"

KINDS = {".txt": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
"""Input suffix -> reader. A .txt file is one document; a JSONL line or a Parquet row is one."""

EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]")
"""End-of-document tokens looked for, in this order, when tokenizer_config.json names none
(GPT-2/Qwen/OLMo, Llama 3, Llama 2/Mistral/T5, Gemma, ...)."""

UINT16_IDS = 1 << 16
UINT32_IDS = 1 << 32
BATCH_BYTES = 1 << 20
"""Text per work unit sent to a worker: large enough that a process hop is cheap beside the
tokenizing, small enough that the progress bar moves and memory stays bounded."""
TEMP_PREFIX = ".{name}.prepare-"


class PrepareError(ValueError):
    """Something the user can fix (an input, a key, the tokenizer, OUT_DIR); one message each."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# ---- pure pieces -------------------------------------------------------------------------------

def token_dtype(num_ids: int) -> str:
    """The narrowest dtype the recipes read that holds ids 0 .. num_ids - 1: uint16 or uint32."""
    if num_ids <= UINT16_IDS:
        return "uint16"
    if num_ids <= UINT32_IDS:
        return "uint32"
    raise PrepareError([
        f"the tokenizer has {num_ids:,} token ids, more than uint32 holds ({UINT32_IDS:,}); tierzero token files "
        "store ids as uint16 or uint32 (data.token_dtype), so no token file can hold them: use a tokenizer with at "
        "most 2**32 ids"])


def choose_eos(vocab: Dict[str, int], special: Sequence[str], *, config_eos: Optional[str], requested: Optional[str],
               where: str) -> str:
    """The end-of-document token: --eos-token if given, else tokenizer_config.json's eos_token, else
    the first of EOS_CANDIDATES in the vocabulary. `special` (the tokenizer's special tokens) only
    feeds the message when none is found."""
    if requested is not None:
        if requested not in vocab:
            raise PrepareError([
                f"--eos-token {requested!r} is not a token of {where}; pass one of its tokens, e.g. one of its special "
                f"tokens: {', '.join(special[:12]) or '(none)'}"])
        return requested
    if config_eos and config_eos in vocab:
        return config_eos
    for token in EOS_CANDIDATES:
        if token in vocab:
            return token
    raise PrepareError([
        f"{where} has no end-of-document token (looked for tokenizer_config.json's eos_token and "
        f"{', '.join(EOS_CANDIDATES)}; its special tokens: {', '.join(special[:12]) or '(none)'}); name the token "
        "that ends a document with --eos-token, e.g. --eos-token '</s>'"])


@dataclass(frozen=True)
class Source:
    """One input file and how to read it."""

    path: str
    kind: str
    """text, jsonl or parquet."""
    key: Optional[str]
    """jsonl: the field; parquet: the column; text: None."""
    size_bytes: int
    mtime_ns: int


def plan_sources(inputs: Sequence[str], *, field: str, column: str) -> Tuple[List[Source], List[str]]:
    """The input files in order (a folder: its files with a known suffix, sorted, recursively) and
    every problem found from their names, sizes and (Parquet) schemas; reads no document."""
    sources, problems = [], []
    known = ", ".join(KINDS)
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in KINDS
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                problems.append(f"input folder {item} holds no file ending in {known}; name the files, or put "
                                "the text in .txt (one document per file), .jsonl or .parquet files")
            files = [str(p) for p in found]
        else:
            files = [item]
        for name in files:
            p = Path(name)
            kind = KINDS.get(p.suffix.lower())
            if not p.exists():
                problems.append(f"input {name} does not exist; check the path")
            elif not p.is_file():
                problems.append(f"input {name} is not a file or folder")
            elif kind is None:
                problems.append(f"input {name}: tierzero reads {known} (a .txt file is one document, a JSONL line or "
                                f"a Parquet row is one); rename or convert it")
            else:
                st = p.stat()
                key = field if kind == "jsonl" else column if kind == "parquet" else None
                if st.st_size == 0:
                    problems.append(f"input {name} is empty (0 bytes): it has no document to tokenize; drop it "
                                    "from the inputs")
                    continue
                if kind == "parquet":
                    problem = _parquet_problem(name, column)
                    if problem:
                        problems.append(problem)
                        continue
                sources.append(Source(name, kind, key, st.st_size, st.st_mtime_ns))
    return sources, problems


def _parquet_problem(path: str, column: str) -> Optional[str]:
    """Why --column cannot be read from `path` (its footer only), or None."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's own error types vary by cause (ArrowInvalid, OSError)
        return f"input {path} is not a readable Parquet file ({type(e).__name__}: {e}); check it with pyarrow"
    schema = meta.schema_arrow
    if column not in schema.names:
        names = ", ".join(schema.names[:20])
        hint = next((n for n in schema.names if pa.types.is_string(schema.field(n).type)
                     or pa.types.is_large_string(schema.field(n).type)), None)
        return (f"input {path} has no column {column!r} (its columns: {names}); pass the column that holds the "
                f"text with --column" + (f", e.g. --column {hint}" if hint else ""))
    dtype = schema.field(column).type
    if not (pa.types.is_string(dtype) or pa.types.is_large_string(dtype)
            or getattr(pa.types, "is_string_view", lambda _: False)(dtype)):
        return (f"column {column!r} of {path} holds {dtype}, not text; pass the column that holds the text with "
                "--column")
    if meta.metadata.num_rows == 0:
        return f"input {path} has no rows: it has no document to tokenize; drop it from the inputs"
    return None


def encode_documents(tokenizer, texts: Sequence[Optional[str]], *, eos_id: int, dtype: str) -> Tuple[np.ndarray, int, int]:
    """(tokens, num_documents, num_empty): each document's ids followed by `eos_id`, in order.
    A document that is None, "" or has no tokens is skipped (counted in num_empty): an EOS with
    nothing before it would teach the model nothing but that EOS follows EOS."""
    pieces, num_empty = [], 0
    eos = np.array([eos_id], dtype=dtype)
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False).ids if text else []
        if not ids:
            num_empty += 1
            continue
        pieces += [np.asarray(ids, dtype=dtype), eos]
    tokens = np.concatenate(pieces) if pieces else np.empty(0, dtype=dtype)
    return tokens, len(texts) - num_empty, num_empty


def build_sidecar(*, tokenizer: "TokenizerInfo", sources: Sequence[Source], stats: Sequence[dict], num_tokens: int,
                  num_documents: int, num_empty: int) -> dict:
    """The JSON sidecar written beside the token file: enough to know how it was made and to check
    that a rerun would make the same bytes (tokenizer and input hashes)."""
    return {
        "format": SIDECAR_FORMAT,
        "tokens_file": TOKENS_FILE,
        "dtype": tokenizer.dtype,
        "byte_order": sys.byteorder,
        "num_tokens": num_tokens,
        "num_documents": num_documents,
        "num_empty_skipped": num_empty,
        "layout": "each document's tokens followed by eos; no bos; special-token text in documents is tokenized "
                  "as text",
        "tokenizer": {"path": tokenizer.path, "sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size,
                      "num_ids": tokenizer.num_ids, "eos_token": tokenizer.eos_token, "eos_id": tokenizer.eos_id},
        "sources": [{"path": os.path.abspath(s.path), "kind": s.kind, "key": s.key, "size_bytes": s.size_bytes,
                     "mtime_ns": s.mtime_ns, **st} for s, st in zip(sources, stats)],
        "data_keys": {"data.kind": "tokens", "data.token_dtype": tokenizer.dtype, "data.vocab_size": tokenizer.num_ids},
    }


# ---- the tokenizer -----------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenizerInfo:
    path: str
    """The tokenizer.json read."""
    sha256: str
    vocab_size: int
    """Tokens in the vocabulary, added tokens included."""
    num_ids: int
    """Largest id + 1: what data.vocab_size must cover."""
    eos_token: str
    eos_id: int
    dtype: str


def tokenizer_file(path: str) -> Path:
    """`path` itself, or the tokenizer.json inside the folder `path` (a save_pretrained folder)."""
    p = Path(path)
    if not p.exists():
        raise PrepareError([f"--tokenizer {path} does not exist; pass a Hugging Face tokenizer.json, or the folder "
                            "holding one (what AutoTokenizer.save_pretrained writes)"])
    if p.is_dir():
        if not (p / "tokenizer.json").is_file():
            raise PrepareError([
                f"--tokenizer {path} is a folder without tokenizer.json; tierzero reads the `tokenizers` format. A "
                "folder with only a slow tokenizer (e.g. a sentencepiece tokenizer.model) converts with "
                "`AutoTokenizer.from_pretrained(DIR).save_pretrained(OUT)`, which writes OUT/tokenizer.json"])
        return p / "tokenizer.json"
    return p


def load_tokenizer(path: str):
    """The `tokenizers.Tokenizer` in `path`, set to read special-token text in a document as text
    (so a document quoting "<|endoftext|>" gets no EOS in its middle)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.encode_special_tokens = True
    return tok


def count_ids(tokenizer) -> Tuple[int, int]:
    """(vocab_size, num_ids = largest id + 1) of a `tokenizers.Tokenizer`."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    return len(vocab), max(vocab.values(), default=-1) + 1


def inspect_tokenizer(path: str, *, eos_token: Optional[str] = None) -> TokenizerInfo:
    """Read and check the tokenizer (readable, an EOS, ids that fit uint32); PrepareError if not."""
    file = tokenizer_file(path)
    try:
        data = file.read_bytes()
        tok = load_tokenizer(str(file))
    except Exception as e:  # tokenizers raises a plain Exception for a malformed file
        raise PrepareError([
            f"--tokenizer {path}: cannot read {file} as a Hugging Face tokenizer.json ({type(e).__name__}: "
            f"{str(e)[:200]}); pass the tokenizer.json of a `tokenizers` tokenizer (AutoTokenizer.save_pretrained "
            "writes one)"]) from e
    vocab = tok.get_vocab(with_added_tokens=True)
    special = [t.content for t in tok.get_added_tokens_decoder().values() if t.special]
    config_eos = None
    config = file.parent / "tokenizer_config.json"
    if config.is_file():
        try:
            value = json.loads(config.read_text()).get("eos_token")
            config_eos = value.get("content") if isinstance(value, dict) else value
        except (ValueError, OSError, AttributeError):
            config_eos = None  # a broken config only loses the hint; the candidates still apply
    eos = choose_eos(vocab, special, config_eos=config_eos, requested=eos_token, where=f"--tokenizer {path}")
    vocab_size, num_ids = count_ids(tok)
    return TokenizerInfo(path=str(file.resolve()), sha256=hashlib.sha256(data).hexdigest(), vocab_size=vocab_size,
                         num_ids=num_ids, eos_token=eos, eos_id=vocab[eos], dtype=token_dtype(num_ids))


# ---- readers: a source -> batches of documents -------------------------------------------------

@dataclass
class Batch:
    source: int
    """Index of the source in the plan."""
    texts: List[Optional[str]]
    nbytes: int
    """Input bytes this batch accounts for (progress)."""


def read_batches(sources: Sequence[Source], *, batch_bytes: int, stats: List[dict]) -> Iterator[Batch]:
    """Every source's documents in order, in batches; appends each source's sha256 to `stats` once
    it is read. PrepareError (naming file, line or row, key and fix) on a bad document."""
    readers = {"text": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet}
    for i, src in enumerate(sources):
        hasher = hashlib.sha256()
        num_texts = 0
        for texts, nbytes in readers[src.kind](src, batch_bytes, hasher):
            num_texts += sum(1 for t in texts if t)
            yield Batch(i, texts, nbytes)
        if num_texts == 0:
            fix = {"text": "", "jsonl": f" (every line is blank or its {src.key!r} empty or null)",
                   "parquet": f" (every {src.key!r} is empty or null)"}[src.kind]
            option = {"text": "", "jsonl": ", or pick the field that holds the text with --field",
                      "parquet": ", or pick the column that holds the text with --column"}[src.kind]
            raise PrepareError([f"input {src.path} holds no document with text{fix}; drop it from the inputs{option}"])
        stats.append({"sha256": hasher.hexdigest()})


def _read_text(src: Source, batch_bytes: int, hasher) -> Iterator[Tuple[List[str], int]]:
    """A .txt file is one document: the whole file, UTF-8 (a leading byte-order mark dropped)."""
    data = Path(src.path).read_bytes()
    hasher.update(data)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PrepareError([
            f"input {src.path} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); convert it, e.g. "
            f"`iconv -f latin1 -t utf-8 {src.path}`"]) from e
    yield [text], len(data)


def _read_jsonl(src: Source, batch_bytes: int, hasher) -> Iterator[Tuple[List[Optional[str]], int]]:
    """One document per line: the string in field `src.key`; blank lines skipped; null -> empty."""
    field = src.key
    texts: List[Optional[str]] = []
    size = nbytes = 0
    with open(src.path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            hasher.update(line)
            nbytes += len(line)
            if not line.strip():
                continue
            where = f"input {src.path}, line {lineno}"
            try:
                record = json.loads(line)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both
                raise PrepareError([f"{where} is not valid JSON ({e}); fix or remove that line"]) from e
            if not isinstance(record, dict):
                raise PrepareError([f"{where} is a JSON {type(record).__name__}, not an object with a {field!r} "
                                    "field; write one JSON object per line"])
            if field not in record:
                keys = ", ".join(list(record)[:12])
                strings = [k for k, v in record.items() if isinstance(v, str)]
                hint = max(strings, key=lambda k: len(record[k]), default=None)  # the longest is likely the text
                raise PrepareError([
                    f"{where} has no field {field!r} (its fields: {keys or 'none'}); pass the field that holds the "
                    f"text with --field" + (f", e.g. --field {hint}" if hint else "")
                    + ", or fix the line"])
            text = record[field]
            if text is not None and not isinstance(text, str):
                raise PrepareError([f"{where}: field {field!r} is a {type(text).__name__} ({str(text)[:40]}), not a "
                                    "string; pass the field that holds the text with --field"])
            texts.append(text)
            size += len(text) if text else 0
            if size >= batch_bytes:
                yield texts, nbytes
                texts, size, nbytes = [], 0, 0
    if texts or nbytes:
        yield texts, nbytes


def _read_parquet(src: Source, batch_bytes: int, hasher) -> Iterator[Tuple[List[Optional[str]], int]]:
    """One document per row: column `src.key` (checked to be text by plan_sources); null -> empty."""
    import pyarrow.parquet as pq

    with open(src.path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            hasher.update(chunk)
    pf = pq.ParquetFile(src.path)
    num_rows = pf.metadata.num_rows
    done_bytes = 0
    texts: List[Optional[str]] = []
    size = rows = 0
    for record_batch in pf.iter_batches(batch_size=1024, columns=[src.key]):
        for text in record_batch.column(0).to_pylist():
            texts.append(text)
            size += len(text) if text else 0
            rows += 1
            if size >= batch_bytes:
                upto = src.size_bytes * rows // num_rows
                yield texts, upto - done_bytes
                done_bytes, texts, size = upto, [], 0
    if texts:
        yield texts, src.size_bytes - done_bytes


# ---- workers -----------------------------------------------------------------------------------

_worker: dict = {}
"""Per worker process only: its tokenizer, EOS id and dtype, set once by _init_worker."""


def _init_worker(tokenizer_path: str, eos_id: int, dtype: str) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it ends the pool
    _worker.update(tokenizer=load_tokenizer(tokenizer_path), eos_id=eos_id, dtype=dtype)


def _encode_in_worker(texts):
    return encode_documents(_worker["tokenizer"], texts, eos_id=_worker["eos_id"], dtype=_worker["dtype"])


def _encoded(batches: Iterator[Batch], tok: TokenizerInfo, workers: int):
    """(batch, (tokens, num_documents, num_empty)) in input order. With workers > 1, at most
    2 x workers batches are in flight, so memory stays bounded whatever the corpus size."""
    if workers == 1:
        tokenizer = load_tokenizer(tok.path)
        for batch in batches:
            yield batch, encode_documents(tokenizer, batch.texts, eos_id=tok.eos_id, dtype=tok.dtype)
        return
    import multiprocessing

    # spawn, not fork: the parent may hold threads (torch's, a test runner's) that fork would copy mid-state
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tok.path, tok.eos_id, tok.dtype)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append((batch, pool.apply_async(_encode_in_worker, (batch.texts,))))
            if len(pending) >= 2 * workers:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()


# ---- progress ----------------------------------------------------------------------------------

class _Progress:
    """A rich bar on a terminal (bytes read, MB/s, tokens, ETA); otherwise a log line every 10%."""

    def __init__(self, total_bytes: int, enabled: bool):
        self.total, self.enabled = max(total_bytes, 1), enabled
        self._bar = None
        self._done = self._tokens = 0
        self._next_tenth = 1

    def __enter__(self):
        if self.enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self._bar = Progress(TextColumn("[bold]prepare"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                 TextColumn("{task.fields[tokens]:,} tokens"), TimeRemainingColumn(),
                                 console=Console(stderr=True))
            self._bar.start()
            self._task = self._bar.add_task("prepare", total=self.total, tokens=0)
        return self

    def advance(self, nbytes: int, ntokens: int) -> None:
        self._done += nbytes
        self._tokens += ntokens
        if self._bar is not None:
            self._bar.update(self._task, completed=self._done, tokens=self._tokens)
        elif self.enabled and self._done * 10 >= self._next_tenth * self.total:
            self._next_tenth = self._done * 10 // self.total + 1
            log.info("%3.0f%% of %.1f MB read, %s tokens", 100 * self._done / self.total, self.total / 1e6,
                     f"{self._tokens:,}")

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.stop()
        return False


# ---- the runner --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prepared:
    out_dir: str
    tokens_path: str
    tokenizer: TokenizerInfo
    num_sources: int
    num_documents: int
    num_empty: int
    num_tokens: int
    input_bytes: int
    elapsed_s: float
    num_workers: int


def out_dir_problem(out_dir: str) -> Optional[str]:
    """Why OUT_DIR cannot be written: tierzero writes only a new or an empty folder."""
    p = Path(out_dir)
    if p.is_dir():
        entries = sorted(os.listdir(p))
        if entries:
            return (f"OUT_DIR {out_dir} is not empty ({len(entries)} entries, e.g. {entries[0]}); tierzero data "
                    "prepare writes only a new or an empty folder, so it never overwrites what it did not write: "
                    "pick a new OUT_DIR, or empty this one yourself")
    elif p.exists() or p.is_symlink():
        return f"OUT_DIR {out_dir} exists and is not a folder; pick a new OUT_DIR"
    return None


def write_prepared(inputs: Sequence[str], tokenizer: str, out_dir: str, *, field: str = "text",
                   column: str = "text", num_workers: Optional[int] = None, eos_token: Optional[str] = None,
                   batch_bytes: int = BATCH_BYTES, progress: bool = True) -> Prepared:
    """Tokenize `inputs` into OUT_DIR/tokens.bin + OUT_DIR/tokens.json, atomically.

    Everything checkable before reading a document is checked first and reported together
    (PrepareError). The work happens in a temp folder beside OUT_DIR (mkdtemp, a hidden name),
    renamed to OUT_DIR only when the token file and sidecar are complete and synced; any error,
    Ctrl-C or SIGTERM removes it. A SIGKILL leaves it (hidden, without a sidecar); a rerun starts
    over and names it."""
    t0 = time.perf_counter()
    workers = num_workers if num_workers is not None else _usable_cpus()
    tok, sources = _checked(inputs, tokenizer, out_dir, field=field, column=column, workers=workers,
                            eos_token=eos_token)
    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = TEMP_PREFIX.format(name=out.name)
    stale = sorted(p.name for p in out.parent.glob(prefix + "*"))
    if stale:
        log.warning("%s holds %s, left by a prepare of %s that was killed (or one still running); delete it once no "
                    "prepare writes %s", out.parent, ", ".join(stale), out.name, out.name)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=prefix))
    try:
        stats, per_source, num_documents, num_empty, num_tokens = _tokenize_into(
            tmp / TOKENS_FILE, sources, tok, workers=workers, batch_bytes=batch_bytes, progress=progress)
        silent = [s.path for s, (docs, _) in zip(sources, per_source) if docs == 0]
        if silent:  # text, but nothing the tokenizer makes a token of (e.g. its normalizer strips it all)
            raise PrepareError([f"input {p} holds no document the tokenizer makes a token of; drop it from the inputs"
                                for p in silent])
        for st, (docs, ntok) in zip(stats, per_source):
            st.update(num_documents=docs, num_tokens=ntok)
        sidecar = build_sidecar(tokenizer=tok, sources=sources, stats=stats, num_tokens=num_tokens,
                                num_documents=num_documents, num_empty=num_empty)
        with open(tmp / SIDECAR_FILE, "w") as f:
            json.dump(sidecar, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700, widened to what a plain mkdir gives
        try:
            # rename(2) replaces an absent or empty folder atomically, and fails if one appeared with files in it
            os.rename(tmp, out)
        except OSError as e:
            raise PrepareError([f"OUT_DIR {out_dir} was created or filled by something else while preparing "
                                f"({e.strerror}); nothing was written there: pick a new OUT_DIR"]) from e
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Prepared(out_dir=str(out), tokens_path=str(out / TOKENS_FILE), tokenizer=tok,
                    num_sources=len(sources), num_documents=num_documents, num_empty=num_empty,
                    num_tokens=num_tokens, input_bytes=sum(s.size_bytes for s in sources),
                    elapsed_s=time.perf_counter() - t0, num_workers=workers)


def _checked(inputs, tokenizer: str, out_dir: str, *, field: str, column: str, workers: int,
             eos_token: Optional[str]):
    """(tokenizer, sources) once every check made before reading a document passes; else one
    PrepareError with every problem."""
    problems = []
    if workers < 1:
        problems.append(f"--workers {workers}: give 1 or more worker processes")
    if not inputs:
        problems.append("no INPUT given: name text (.txt), JSONL or Parquet files, or folders holding them")
    out_problem = out_dir_problem(out_dir)
    if out_problem:
        problems.append(out_problem)
    tok = None
    try:
        tok = inspect_tokenizer(tokenizer, eos_token=eos_token)
    except PrepareError as e:
        problems += e.problems
    sources, source_problems = plan_sources(inputs, field=field, column=column)
    problems += source_problems
    if problems:
        raise PrepareError(problems)
    return tok, sources


def _tokenize_into(path: Path, sources, tok, *, workers: int, batch_bytes: int, progress: bool):
    """Every source's documents, tokenized by `workers` processes, appended to `path` in input
    order and synced. Returns (per-source stats, [documents, tokens] per source, documents,
    empty documents skipped, tokens)."""
    stats: List[dict] = []
    per_source = [[0, 0] for _ in sources]  # [documents, tokens]
    num_documents = num_empty = num_tokens = 0
    with open(path, "wb") as f, _Progress(sum(s.size_bytes for s in sources), progress) as bar:
        batches = read_batches(sources, batch_bytes=batch_bytes, stats=stats)
        for batch, (tokens, n_docs, n_empty) in _encoded(batches, tok, workers):
            tokens.tofile(f)
            per_source[batch.source][0] += n_docs
            per_source[batch.source][1] += len(tokens)
            num_documents, num_empty, num_tokens = num_documents + n_docs, num_empty + n_empty, num_tokens + len(tokens)
            bar.advance(batch.nbytes, len(tokens))
        f.flush()
        os.fsync(f.fileno())
    return stats, per_source, num_documents, num_empty, num_tokens


def _usable_cpus() -> int:
    """The CPUs this process may run on (a Slurm or cgroup allotment, not the whole node)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1

