"""Data are validated in full before any training: every token id, meta.json, the tokenizer."""

from __future__ import annotations

import shutil
import struct

import numpy as np
import pytest

from conftest import one_run_smoke
from leanopt.bench import data as bdata
from leanopt.bench.tasks import run_task


@pytest.fixture
def copy(bench_data, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(bench_data, d)
    return d


def run(data, tmp_path):
    run_task(one_run_smoke(), tmp_path / "runs", data, progress=False, log=lambda s: None)


def test_token_ids_beyond_the_vocabulary_are_reported_before_training(copy, tmp_path):
    shard = copy / "src" / "val.bin"
    raw = bytearray(shard.read_bytes())
    header = struct.calcsize("<8sIIQ")
    raw[header + 20:header + 22] = struct.pack("<H", 400)  # a valid header, one id >= the vocabulary of 320
    shard.write_bytes(bytes(raw))
    with pytest.raises(bdata.DataError, match=r"val\.bin holds token id 400, outside its vocabulary of 320.*prepare --force"):
        run(copy, tmp_path)
    assert not (tmp_path / "runs").exists()  # nothing started


@pytest.mark.parametrize("content", ['{"vocab_size": 3', "[]", "\xff\xfe"], ids=["truncated", "not-an-object", "binary"])
def test_a_corrupt_meta_json_names_the_file_and_the_fix(copy, tmp_path, content):
    (copy / "src" / "meta.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(bdata.DataError, match=r"meta\.json is corrupt.*leanopt prepare --force"):
        run(copy, tmp_path)


def test_a_corrupt_or_foreign_tokenizer_is_reported(copy, tmp_path):
    tok = copy / "tokenizer-320.json"
    tok.write_text(tok.read_text()[:100])
    with pytest.raises(bdata.DataError, match=r"tokenizer-320\.json is corrupt.*prepare --force"):
        run(copy, tmp_path)
    tok.write_text('{"model": {"vocab": {"a": 0, "b": 1}}}')
    with pytest.raises(bdata.DataError, match="has 2 tokens but corpus 'src' was tokenized with 320"):
        run(copy, tmp_path)


def test_every_token_is_checked(copy):
    corpus = bdata.load_corpus(copy, "src")
    assert int(np.max(corpus.train)) < 320 and int(np.max(corpus.val)) < 320
    tokens = np.asarray(corpus.train).copy()
    tokens[-1] = 319  # the last id of a shard is checked too: still valid
    bdata.write_shard(copy / "src" / "train.bin", tokens, 320)
    bdata.load_corpus(copy, "src")
