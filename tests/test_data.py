"""Corpora, splits, tokenizer and token-file caches, resumable batches (real text only)."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from engramlm.data import (
    EOS_TOKEN,
    NAMED_CORPORA,
    PAD_TOKEN,
    Batch,
    CorpusNotInstalledError,
    Document,
    NamedCorpus,
    Prefetcher,
    TokenFile,
    TrainBatches,
    ValBatches,
    load_documents,
    prepare_corpus,
    split_documents,
    tokenize_to_file,
    train_tokenizer,
)
from engramlm.hashing import NgramHasher, ngram_hash
from engramlm.tokenization import CompressedVocab, vocab_fingerprint

VOCAB = 512
HASH_ARGS = dict(
    seed=0,
    layer_id=1,
    layer_ids=(1,),
    table_sizes=(101, 103),
    heads_per_ngram=2,
    max_ngram=3,
    pad_id=1,
)


def _require(name: str) -> NamedCorpus:
    corpus = NAMED_CORPORA[name]
    if not corpus.root.is_dir() or not corpus.files():
        pytest.skip(f"corpus {name!r} is not installed under {corpus.root}: run `make data`")
    return corpus


@pytest.fixture(scope="module")
def real_docs() -> list[Document]:
    """Sixty real documents: standard-library modules (the first ones, sorted by path)."""
    return load_documents("stdlib")[:60]


@pytest.fixture(scope="module")
def tokenizer(real_docs: list[Document], tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return train_tokenizer(real_docs, VOCAB, tmp_path_factory.mktemp("tok-cache"))


@pytest.fixture(scope="module")
def token_file(
    real_docs: list[Document], tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory
) -> TokenFile:
    return tokenize_to_file(real_docs[:20], tokenizer, tmp_path_factory.mktemp("tf") / "t.bin")


def _take(batches, n: int) -> list[Batch]:
    return [next(batches) for _ in range(n)]


def _assert_same_batches(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.targets, y.targets)
        if x.hash_ids is not None or y.hash_ids is not None:
            assert x.hash_ids.keys() == y.hash_ids.keys()
            assert all(torch.equal(x.hash_ids[k], y.hash_ids[k]) for k in x.hash_ids)


# --- corpora -------------------------------------------------------------------------------


def test_text_file_is_one_document(text_files: list[Path], tmp_path: Path) -> None:
    path = tmp_path / "one.txt"
    shutil.copy(text_files[0], path)
    docs = load_documents(str(path))
    assert docs == [Document("one.txt", text_files[0].read_text(encoding="utf-8"))]


def test_folder_reads_text_files_recursively(text_files: list[Path], tmp_path: Path) -> None:
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    shutil.copy(text_files[0], tmp_path / "a.rst")
    shutil.copy(text_files[1], tmp_path / "sub" / "b.md")
    shutil.copy(text_files[2], tmp_path / "sub" / "deeper" / "c.txt")
    (tmp_path / "weights.bin").write_bytes(bytes(range(256)))  # not text-like: ignored
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8: skipped
    docs = load_documents(tmp_path)
    assert [d.name for d in docs] == ["a.rst", "sub/b.md", "sub/deeper/c.txt"]
    assert docs[2].text == text_files[2].read_text(encoding="utf-8")


def test_jsonl_gives_one_document_per_line(text_files: list[Path], tmp_path: Path) -> None:
    texts = [p.read_text(encoding="utf-8") for p in text_files[:3]]
    path = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": texts[0]}), "", json.dumps({"text": texts[1], "id": "x"})]
    path.write_text("\n".join([*lines, json.dumps({"text": texts[2]})]) + "\n")
    docs = load_documents(path)
    assert [d.text for d in docs] == texts
    assert [d.name for d in docs] == ["c.jsonl:1", "x", "c.jsonl:4"]


def test_named_pydocs_has_one_document_per_file() -> None:
    corpus = _require("pydocs")
    docs = load_documents("pydocs")
    assert len(docs) == len(corpus.files()) and all(d.name.endswith(".rst.txt") for d in docs)


def test_named_stdlib_is_this_pythons_source_without_test_suites() -> None:
    corpus = NAMED_CORPORA["stdlib"]
    names = [d.name for d in load_documents("stdlib")]
    assert corpus.root == Path(json.__file__).parent.parent  # the running interpreter's
    assert "json/__init__.py" in names and "dataclasses.py" in names
    assert all(n.endswith(".py") for n in names)
    assert not [n for n in names if {"test", "tests", "site-packages"} & set(n.split("/")[:-1])]
    assert len(names) > 300


def test_named_zh_fortunes_splits_entries_and_strips_ansi() -> None:
    _require("zh-fortunes")
    docs = load_documents("zh-fortunes")
    sources = {d.name.split(":")[0] for d in docs}
    assert sources == {"chinese", "tang300", "song100"}  # .dat and .u8 links not read
    assert len(docs) > 5000
    assert not any("\x1b" in d.text or d.text.strip() == "%" for d in docs)


def test_missing_path_names_it_and_what_to_pass(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=r"nope\.txt.*pass one of.*folder.*jsonl"):
        load_documents(missing)


def test_empty_corpus_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "blank.txt").write_text("  \n\n")
    with pytest.raises(ValueError, match="no readable documents"):
        load_documents(tmp_path)


def test_named_corpus_not_installed_says_how_to_install(tmp_path: Path) -> None:
    corpus = NamedCorpus("pydocs", tmp_path / "absent", ("**/*.rst.txt",), "run `make data`")
    with pytest.raises(CorpusNotInstalledError, match="not installed.*make data"):
        corpus.load()
    if not NAMED_CORPORA["kernel-docs"].root.is_dir():
        with pytest.raises(CorpusNotInstalledError, match="apt-get install -y linux-doc"):
            load_documents("kernel-docs")


def test_jsonl_line_without_text_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2.*\"text\""):
        load_documents(path)


# --- split ---------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_complete(real_docs: list[Document]) -> None:
    train, val = split_documents(real_docs, 0.2, seed=3)
    assert (train, val) == split_documents(real_docs, 0.2, seed=3)
    assert {d.name for d in train}.isdisjoint({d.name for d in val})
    assert sorted(d.name for d in train + val) == sorted(d.name for d in real_docs)
    assert len(val) == 12
    assert split_documents(real_docs, 0.2, seed=4)[1] != val


def test_split_keeps_one_document_per_side(real_docs: list[Document]) -> None:
    train, val = split_documents(real_docs[:2], 0.001, seed=0)
    assert len(train) == 1 and len(val) == 1
    train, val = split_documents(real_docs[:3], 0.999, seed=0)
    assert len(train) == 1 and len(val) == 2


def test_split_needs_two_documents(real_docs: list[Document]) -> None:
    with pytest.raises(ValueError, match="at least 2 documents.*got 1"):
        split_documents(real_docs[:1], 0.1, seed=0)


# --- tokenizer -----------------------------------------------------------------------------


def test_tokenizer_has_special_tokens_and_round_trips(
    tokenizer: Tokenizer, real_docs: list[Document]
) -> None:
    assert tokenizer.get_vocab_size() == VOCAB
    assert (tokenizer.token_to_id(EOS_TOKEN), tokenizer.token_to_id(PAD_TOKEN)) == (0, 1)
    text = real_docs[5].text + " 中文 ✓"  # unseen characters still encode (byte level)
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_tokenizer_second_call_loads_the_cache(real_docs: list[Document], tmp_path: Path) -> None:
    first = train_tokenizer(real_docs[:20], VOCAB, tmp_path)
    (cached,) = tmp_path.glob("tokenizer-*.json")
    mtime = cached.stat().st_mtime_ns
    second = train_tokenizer(real_docs[:20], VOCAB, tmp_path)
    assert cached.stat().st_mtime_ns == mtime
    assert second.get_vocab() == first.get_vocab()
    train_tokenizer(real_docs[:20], VOCAB + 64, tmp_path)  # another key, another file
    assert len(list(tmp_path.glob("tokenizer-*.json"))) == 2
    assert not list(tmp_path.glob("*.tmp"))


def test_tokenizer_vocab_size_too_small(real_docs: list[Document], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size must be >= 258"):
        train_tokenizer(real_docs, 100, tmp_path)


# --- token files ---------------------------------------------------------------------------


def test_token_file_decodes_to_documents_joined_by_eos(
    token_file: TokenFile, tokenizer: Tokenizer, real_docs: list[Document]
) -> None:
    docs = real_docs[:20]
    reopened = TokenFile.open(token_file.path)
    assert isinstance(reopened.tokens, np.memmap) and reopened.tokens.dtype == np.uint16
    assert reopened.num_documents == 20 and int((reopened.tokens == 0).sum()) == 20
    assert reopened.num_bytes == sum(len(d.text.encode()) for d in docs)
    assert reopened.tokenizer_fingerprint == vocab_fingerprint(tokenizer)
    decoded = tokenizer.decode(reopened.tokens.tolist(), skip_special_tokens=False)
    assert decoded == "".join(d.text + EOS_TOKEN for d in docs)


def test_token_file_is_reused_when_content_matches(
    real_docs: list[Document], tokenizer: Tokenizer, tmp_path: Path
) -> None:
    path = tmp_path / "t.bin"
    tokenize_to_file(real_docs[:3], tokenizer, path)
    mtime = path.stat().st_mtime_ns
    tokenize_to_file(real_docs[:3], tokenizer, path)
    assert path.stat().st_mtime_ns == mtime
    changed = tokenize_to_file(real_docs[:4], tokenizer, path)  # other content: rewritten
    assert changed.num_documents == 4


def test_truncated_token_file_names_the_file(
    real_docs: list[Document], tokenizer: Tokenizer, tmp_path: Path
) -> None:
    path = tmp_path / "cut.bin"
    tokenize_to_file(real_docs[:3], tokenizer, path)
    os.truncate(path, path.stat().st_size - 2)
    with pytest.raises(ValueError, match=r"cut\.bin.*truncated"):
        TokenFile.open(path)
    TokenFile.sidecar(path).unlink()
    with pytest.raises(FileNotFoundError, match=r"cut\.bin\.json does not exist"):
        TokenFile.open(path)


# --- batches -------------------------------------------------------------------------------


def test_train_batch_targets_are_inputs_shifted_by_one(token_file: TokenFile) -> None:
    batch = next(TrainBatches(token_file, batch_size=4, seq_len=32, seed=0))
    assert batch.input_ids.shape == batch.targets.shape == (4, 32)
    assert batch.input_ids.dtype == batch.targets.dtype == torch.int64
    assert torch.equal(batch.input_ids[:, 1:], batch.targets[:, :-1])
    tokens = torch.from_numpy(token_file.tokens.astype(np.int64))
    row = batch.input_ids[0]
    starts = [s for s in range(len(tokens) - 32) if torch.equal(tokens[s : s + 32], row)]
    assert any(torch.equal(tokens[s + 1 : s + 33], batch.targets[0]) for s in starts)


def test_resumed_batches_are_bitwise_identical(token_file: TokenFile) -> None:
    uninterrupted = _take(TrainBatches(token_file, 4, 32, seed=7), 10)
    first = TrainBatches(token_file, 4, 32, seed=7)
    head = _take(first, 4)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # through a checkpoint, as train.py will
    buffer.seek(0)
    resumed = TrainBatches(token_file, 4, 32, seed=123)  # the seed comes from the state
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.batches_drawn == 4
    _assert_same_batches(head + _take(resumed, 6), uninterrupted)


def test_resume_refuses_another_batch_shape(token_file: TokenFile) -> None:
    state = TrainBatches(token_file, 4, 32).state_dict()
    with pytest.raises(ValueError, match="seq_len=32, this loader has 16"):
        TrainBatches(token_file, 4, 16).load_state_dict(state)


def test_corpus_smaller_than_one_window(token_file: TokenFile) -> None:
    tiny = np.asarray(token_file.tokens[:10])
    with pytest.raises(ValueError, match="10 tokens.*seq_len \\+ 1 = 11"):
        TrainBatches(tiny, 2, 10)
    with pytest.raises(ValueError, match="10 tokens"):
        ValBatches(tiny, 2, 10)


def test_val_batches_are_fixed_sequential_windows(token_file: TokenFile) -> None:
    val = ValBatches(token_file, batch_size=8, seq_len=64)
    first, second = list(val), list(val)
    _assert_same_batches(first, second)
    inputs = torch.cat([b.input_ids for b in first]).flatten()
    n_windows = (token_file.num_tokens - 1) // 64
    assert len(first) == math.ceil(n_windows / 8)
    assert torch.equal(
        inputs, torch.from_numpy(token_file.tokens[: n_windows * 64].astype(np.int64))
    )
    assert len(list(ValBatches(token_file, 8, 64, max_batches=2))) == 2


def test_hash_fn_is_applied_to_inputs(token_file: TokenFile, tokenizer: Tokenizer) -> None:
    vocab = CompressedVocab.from_tokenizer(tokenizer)
    hasher = NgramHasher(
        seed=0,
        layer_ids=(1, 3),
        table_sizes=(101, 103),
        heads_per_ngram=2,
        max_ngram=3,
        pad_id=int(vocab.lookup[1]),
        compressed_vocab_size=vocab.num_compressed,
    )

    def hash_fn(ids: torch.Tensor) -> dict[int, torch.Tensor]:
        return hasher.all_layers(vocab.compress(ids))

    batch = next(TrainBatches(token_file, 2, 16, seed=1, hash_fn=hash_fn))
    assert batch.hash_ids is not None and set(batch.hash_ids) == {1, 3}
    assert batch.hash_ids[3].shape == (2, 16, 4)
    assert torch.equal(batch.hash_ids[1], hasher(vocab.compress(batch.input_ids), 1))


def test_prefetch_yields_the_same_batches(token_file: TokenFile, tokenizer: Tokenizer) -> None:
    vocab = CompressedVocab.from_tokenizer(tokenizer)

    def hash_fn(ids: torch.Tensor) -> dict[int, torch.Tensor]:
        return {0: vocab.compress(ids)}

    plain = _take(TrainBatches(token_file, 4, 32, seed=5, hash_fn=hash_fn), 8)
    with Prefetcher(TrainBatches(token_file, 4, 32, seed=5, hash_fn=hash_fn)) as pre:
        _assert_same_batches(_take(pre, 8), plain)
    with Prefetcher(ValBatches(token_file, 8, 64)) as pre:
        _assert_same_batches(list(pre), list(ValBatches(token_file, 8, 64)))


def test_prefetch_state_is_the_consumed_position(token_file: TokenFile) -> None:
    uninterrupted = _take(TrainBatches(token_file, 4, 32, seed=9), 9)
    with Prefetcher(TrainBatches(token_file, 4, 32, seed=9), depth=2) as pre:
        head = _take(pre, 3)
        state = pre.state_dict()  # the thread has already drawn batches 4 and 5
        assert state["batches_drawn"] == 3
    with Prefetcher(TrainBatches(token_file, 4, 32, seed=0)) as resumed:
        resumed.load_state_dict(state)
        _assert_same_batches(head + _take(resumed, 6), uninterrupted)


# --- one call ------------------------------------------------------------------------------


def test_prepare_corpus_end_to_end_and_cached(text_files: list[Path], tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for p in text_files[:12]:
        shutil.copy(p, folder / f"{p.name}.txt")
    cache = tmp_path / "cache"
    corpus = prepare_corpus(folder, vocab_size=VOCAB, val_fraction=0.25, seed=0, cache_dir=cache)
    stats = corpus.stats()
    assert (stats["train"]["documents"], stats["val"]["documents"]) == (9, 3)
    total_bytes = sum(p.stat().st_size for p in text_files[:12])
    assert stats["train"]["bytes"] + stats["val"]["bytes"] == total_bytes
    assert corpus.compressed_vocab.fingerprint == vocab_fingerprint(corpus.tokenizer)
    assert (corpus.eos_id, corpus.pad_id, corpus.vocab_size) == (0, 1, VOCAB)
    bpb = corpus.val.bits_per_byte(2.0)
    assert bpb == pytest.approx(2.0 * corpus.val.num_tokens / (corpus.val.num_bytes * math.log(2)))
    mtimes = {p: p.stat().st_mtime_ns for p in cache.iterdir()}
    again = prepare_corpus(folder, vocab_size=VOCAB, val_fraction=0.25, seed=0, cache_dir=cache)
    assert {p: p.stat().st_mtime_ns for p in cache.iterdir()} == mtimes
    assert np.array_equal(again.train.tokens, corpus.train.tokens)


def test_tuning_split_holds_out_training_documents_never_validation_ones(
    text_files: list[Path], tmp_path: Path
) -> None:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for p in text_files[:16]:
        shutil.copy(p, folder / f"{p.name}.txt")
    kw = dict(vocab_size=VOCAB, val_fraction=0.25, seed=0, cache_dir=tmp_path / "cache")
    main = prepare_corpus(folder, **kw)
    tuning = prepare_corpus(folder, tuning=True, **kw)
    assert (
        tuning.compressed_vocab.fingerprint == main.compressed_vocab.fingerprint
    )  # same tokenizer
    docs = load_documents(folder)
    train_docs, val_docs = split_documents(docs, 0.25, 0)
    tune_train, tune_val = split_documents(train_docs, 0.25, 1)
    stats = tuning.stats()
    assert (stats["train"]["documents"], stats["val"]["documents"]) == (9, 3)
    assert stats["val"]["bytes"] == sum(len(d.text.encode()) for d in tune_val)
    assert not {d.name for d in tune_val} & {d.name for d in val_docs}
    assert tuning.val.num_tokens != main.val.num_tokens


def test_prefetch_raises_loader_errors_in_the_consumer(token_file: TokenFile) -> None:
    def hash_fn(ids: torch.Tensor) -> dict[int, torch.Tensor]:
        # Raw ids against a too-small compressed vocabulary: hashing refuses them.
        return {1: ngram_hash(ids, **{**HASH_ARGS, "compressed_vocab_size": 4})}

    with Prefetcher(TrainBatches(token_file, 2, 16, hash_fn=hash_fn)) as pre:
        with pytest.raises(ValueError, match="out of range"):
            next(pre)
