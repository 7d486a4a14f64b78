"""Corpora, token files and batches (with precomputed Engram hash ids).

The pipeline, each step cached on disk by a hash of its inputs:

    load_documents(source)             real text: a named corpus (DATA.md), a file, a folder, JSONL
    split_documents(docs, frac, seed)  train/val by document, never by position
    train_tokenizer(train_docs, V)     byte-level BPE, trained on the training split only
    tokenize_to_file(docs, tok, path)  one flat uint16/uint32 stream, documents joined by EOS
    TrainBatches / ValBatches          [B, T] windows (+ hash ids), resumable; Prefetcher

``prepare_corpus`` runs the first four in one call. Hashing is a pure function of token ids
(SPEC §2.3), so the loader can compute every Engram layer's rows ahead of the step that needs
them (paper §2.5: indices are known before the forward) and a background thread can overlap
that with training.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import os
import queue
import re
import sysconfig
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor
from tqdm.auto import tqdm

from engramlm.tokenization import CompressedVocab, vocab_fingerprint

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)  # ids 0 and 1 of every tokenizer trained here
TEXT_SUFFIXES = frozenset({".txt", ".text", ".md", ".markdown", ".rst", ".org", ".adoc", ".tex"})
DATA_INSTALL_HINT = (
    "run `make data`, or as root: apt-get install -y python3.11-doc fortunes-zh (DATA.md)"
)
# SGR colour codes; the fortunes also hold a few broken ones ("\x1b[;" then another code).
_ANSI_ESCAPE = re.compile(r"\x1b(?:\[[0-9;]*[A-Za-z]?)?")
_TOKEN_FILE_FORMAT = 1
_ENCODE_CHUNK = 256  # documents per encode_batch call


def default_cache_dir() -> Path:
    """``$ENGRAMLM_CACHE`` if set, else ``.cache/engramlm`` in the working directory."""
    return Path(os.environ.get("ENGRAMLM_CACHE") or Path.cwd() / ".cache" / "engramlm")


# ---------------------------------------------------------------------------------------------
# Corpora


@dataclass(frozen=True)
class Document:
    """One unit of text; train/val splits never cut through one."""

    name: str  # where it came from: a relative path, "file:entry" or "file:line"
    text: str


class CorpusNotInstalledError(FileNotFoundError):
    """A named corpus whose Debian package is not installed on this machine."""


def _split_fortunes(path: Path) -> list[Document]:
    """'%'-separated fortune entries, ANSI colour escapes stripped; empty entries dropped."""
    text = _ANSI_ESCAPE.sub("", path.read_text(encoding="utf-8"))
    entries = re.split(r"^%\s*$", text, flags=re.MULTILINE)
    docs = []
    for i, entry in enumerate(entries):
        entry = entry.strip("\n")
        if entry.strip():
            docs.append(Document(f"{path.name}:{i}", entry))
    return docs


@dataclass(frozen=True)
class NamedCorpus:
    """A corpus installed from a Debian package (DATA.md): where it lives and how to read it."""

    name: str
    root: Path
    patterns: tuple[str, ...]  # globs under root, relative; recursive with "**"
    install_hint: str
    fortunes: bool = False  # files are '%'-separated entries rather than one document each
    exclude: tuple[str, ...] = ()  # folder names under root whose files are left out

    def files(self) -> list[Path]:
        """The corpus files, sorted, symlinks to files already listed (fortunes' .u8) dropped."""
        found = {
            p.resolve(): p
            for pat in self.patterns
            for p in self.root.glob(pat)
            if p.is_file() and not set(p.relative_to(self.root).parts[:-1]) & set(self.exclude)
        }
        return sorted(found.values())

    def load(self) -> list[Document]:
        files = self.files() if self.root.is_dir() else []
        if not files:
            raise CorpusNotInstalledError(
                f"corpus {self.name!r} is not installed (nothing matching {list(self.patterns)} "
                f"under {self.root}); {self.install_hint}"
            )
        if self.fortunes:
            return [doc for path in files for doc in _split_fortunes(path)]
        docs = [_read_text_file(path, path.relative_to(self.root).as_posix()) for path in files]
        return [doc for doc in docs if doc is not None]


NAMED_CORPORA: dict[str, NamedCorpus] = {
    "pydocs": NamedCorpus(
        "pydocs",
        Path("/usr/share/doc/python3.11/html/_sources"),
        ("**/*.rst.txt",),
        DATA_INSTALL_HINT,
    ),
    "zh-fortunes": NamedCorpus(
        "zh-fortunes",
        Path("/usr/share/games/fortunes"),
        ("chinese", "tang300", "song100"),  # not the .dat indexes
        DATA_INSTALL_HINT,
        fortunes=True,
    ),
    "kernel-docs": NamedCorpus(
        "kernel-docs",
        Path("/usr/share/doc/linux-doc-6.1"),
        ("**/*.rst", "**/*.txt", "**/*.rst.gz", "**/*.txt.gz"),
        "as root: apt-get install -y linux-doc-6.1 (about 190 MB installed; DATA.md)",
    ),
    # The running Python's standard library source: modules with their docstrings and
    # comments, present wherever Python is (no root, no download), so the tests and the demo's
    # fallback have real text anywhere. Code and prose mixed: losses are not comparable to
    # pydocs'. About 14 MB (734 files) for CPython 3.11; other versions differ a little.
    "stdlib": NamedCorpus(
        "stdlib",
        Path(sysconfig.get_paths()["stdlib"]),
        ("**/*.py",),
        "this Python ships without its standard library's .py source; use another corpus",
        exclude=("test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"),
    ),
}


def _is_text_file(path: Path) -> bool:
    suffixes = path.suffixes[-2:] if path.suffix == ".gz" else path.suffixes[-1:]
    return bool(suffixes) and suffixes[0].lower() in TEXT_SUFFIXES and not path.name.startswith(".")


def _read_text_file(path: Path, name: str) -> Document | None:
    """A UTF-8 (optionally gzipped) file as one document; None (logged) if empty or not UTF-8."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        text = raw.decode("utf-8")
    except (UnicodeDecodeError, gzip.BadGzipFile, OSError) as err:
        logger.warning("skipping %s: not readable as UTF-8 text (%s)", path, err)
        return None
    if not text.strip():
        logger.debug("skipping %s: empty", path)
        return None
    return Document(name, text)


def _load_jsonl(path: Path) -> list[Document]:
    """One document per line, text in the "text" field; blank lines ignored."""
    docs = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {lineno}: not valid JSON ({err})") from err
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(
                    f'{path}, line {lineno}: expected an object with a string "text" field, '
                    f"got {line.strip()[:80]!r}"
                )
            if record["text"].strip():
                docs.append(
                    Document(str(record.get("id", f"{path.name}:{lineno}")), record["text"])
                )
    return docs


def load_documents(source: str | Path = "pydocs") -> list[Document]:
    """Read a corpus as documents.

    ``source`` is a named corpus (``pydocs``, ``zh-fortunes``, ``kernel-docs``, ``stdlib``) or a
    path: a ``.jsonl`` file (one document per line, field "text"), any other text file (one
    document), or a folder (every text-like file under it, recursively, one document each:
    suffixes in ``TEXT_SUFFIXES``, optionally gzipped). Files that are not UTF-8 are skipped
    with a warning.
    """
    if isinstance(source, str) and source in NAMED_CORPORA:
        docs = NAMED_CORPORA[source].load()
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"corpus {str(source)!r} is neither a named corpus nor an existing path; pass one "
                f"of {sorted(NAMED_CORPORA)}, a text file, a folder of text files or a .jsonl file"
            )
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and _is_text_file(p))
            read = (_read_text_file(p, p.relative_to(path).as_posix()) for p in files)
            docs = [doc for doc in read if doc is not None]
        elif path.suffix.lower() == ".jsonl":
            docs = _load_jsonl(path)
        else:
            doc = _read_text_file(path, path.name)
            docs = [doc] if doc is not None else []
    if not docs:
        raise ValueError(
            f"corpus {str(source)!r} has no readable documents (non-empty UTF-8 text; folders "
            f"are searched for {sorted(TEXT_SUFFIXES)})"
        )
    logger.info("loaded %d documents from %s", len(docs), source)
    return docs


def split_documents(
    docs: Sequence[Document], val_fraction: float = 0.05, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """Split by whole documents, never by position (DATA.md): a seeded permutation picks
    ``round(val_fraction * n)`` documents (at least 1, at most n - 1) for validation.

    Deterministic in ``(docs, val_fraction, seed)``; both splits keep the input order.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = len(docs)
    if n < 2:
        raise ValueError(
            f"splitting needs at least 2 documents (one per split), got {n}; add documents, "
            "or for a single long text give a folder of several files or a .jsonl file"
        )
    n_val = min(max(1, round(val_fraction * n)), n - 1)
    val_idx = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val


def _content_hash(settings: dict[str, Any], texts: Iterable[str]) -> str:
    """SHA-256 (hex, 16 chars) of the settings and the texts, each length-prefixed."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:16]


def _atomic_write(path: Path, data: bytes | str) -> None:
    """Write to a temporary file beside ``path``, then rename: readers never see a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# Tokenizer


def _tokenizer_settings(vocab_size: int) -> dict[str, Any]:
    """Everything that changes the trained tokenizer; part of its cache key."""
    return {
        "kind": "byte-level-bpe",
        "vocab_size": vocab_size,
        "special_tokens": list(SPECIAL_TOKENS),
        "min_frequency": 2,
        "add_prefix_space": False,
        "tokenizers": tokenizers.__version__,
    }


def train_tokenizer(
    train_docs: Sequence[Document], vocab_size: int = 8192, cache_dir: str | Path | None = None
) -> Tokenizer:
    """Byte-level BPE trained on the training split only, cached by content hash.

    Special tokens: ``<|endoftext|>`` (id 0, the EOS between documents) and ``<pad>`` (id 1).
    The cache key hashes the training texts, ``vocab_size`` and the settings, so a second call
    with the same inputs loads ``cache_dir/tokenizer-<key>.json`` instead of retraining.
    """
    min_size = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_size:
        raise ValueError(
            f"vocab_size must be >= {min_size} (256 byte tokens + {len(SPECIAL_TOKENS)} "
            f"special tokens), got {vocab_size}"
        )
    if not train_docs:
        raise ValueError("train_tokenizer needs at least one training document, got none")
    settings = _tokenizer_settings(vocab_size)
    key = _content_hash(settings, (d.text for d in train_docs))
    path = Path(cache_dir or default_cache_dir()) / f"tokenizer-{key}.json"
    if path.exists():
        logger.info("tokenizer cache hit: %s", path)
        return Tokenizer.from_file(str(path))

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=settings["min_frequency"],
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: no unknown tokens
        show_progress=False,
    )
    tokenizer.train_from_iterator((d.text for d in train_docs), trainer, length=len(train_docs))
    _atomic_write(path, tokenizer.to_str())
    logger.info(
        "trained a %d-token byte-level BPE on %d documents -> %s",
        tokenizer.get_vocab_size(),
        len(train_docs),
        path,
    )
    return tokenizer


def special_token_id(tokenizer: Tokenizer, token: str = EOS_TOKEN) -> int:
    """The id of ``token``; ValueError if the tokenizer has none."""
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"tokenizer has no {token!r} token; use one from train_tokenizer")
    return int(token_id)


# ---------------------------------------------------------------------------------------------
# Token files


@dataclass(frozen=True)
class TokenFile:
    """A flat token stream on disk (``.bin``, memory-mapped) and its JSON sidecar.

    Documents are each followed by the EOS id. ``num_bytes`` is the UTF-8 size of the
    documents' text, for bits per byte (:meth:`bits_per_byte`).
    """

    path: Path
    tokens: np.ndarray  # [num_tokens] uint16 or uint32, a read-only np.memmap
    num_documents: int
    num_bytes: int
    eos_id: int
    vocab_size: int
    tokenizer_fingerprint: str
    content_hash: str

    @staticmethod
    def sidecar(path: str | Path) -> Path:
        """``train.bin`` -> ``train.bin.json``."""
        path = Path(path)
        return path.with_name(path.name + ".json")

    @classmethod
    def open(cls, path: str | Path) -> TokenFile:
        """Memory-map ``path`` after checking it against its sidecar (size, dtype, format)."""
        path = Path(path)
        meta_path = cls.sidecar(path)
        if not path.exists() or not meta_path.exists():
            missing = path if not path.exists() else meta_path
            raise FileNotFoundError(
                f"token file {path} is incomplete: {missing} does not exist; write it with "
                "tokenize_to_file (or prepare_corpus)"
            )
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != _TOKEN_FILE_FORMAT:
            raise ValueError(
                f"token file {path}: sidecar format {meta.get('format')!r}, expected "
                f"{_TOKEN_FILE_FORMAT}; delete it and re-tokenize"
            )
        dtype = np.dtype(meta["dtype"])
        expected = int(meta["num_tokens"]) * dtype.itemsize
        actual = path.stat().st_size
        if actual != expected:
            raise ValueError(
                f"token file {path} holds {actual} bytes but its sidecar says "
                f"{meta['num_tokens']} {dtype.name} tokens = {expected} bytes: truncated or "
                "stale; delete it and re-tokenize"
            )
        tokens = np.memmap(path, dtype=dtype, mode="r") if expected else np.zeros(0, dtype=dtype)
        return cls(
            path=path,
            tokens=tokens,
            num_documents=int(meta["num_documents"]),
            num_bytes=int(meta["num_bytes"]),
            eos_id=int(meta["eos_id"]),
            vocab_size=int(meta["vocab_size"]),
            tokenizer_fingerprint=str(meta["tokenizer_fingerprint"]),
            content_hash=str(meta["content_hash"]),
        )

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def __len__(self) -> int:
        return self.num_tokens

    def bits_per_byte(self, loss_nats: float) -> float:
        """Mean next-token loss (nats/token) -> bits per UTF-8 byte of this split's text:
        ``loss * tokens / (bytes * ln 2)``. Tokenizer-independent, so runs with different
        vocabularies compare. Tokens include the EOS after each document."""
        return loss_nats * self.num_tokens / (self.num_bytes * math.log(2))

    def stats(self) -> dict[str, float]:
        return {
            "documents": self.num_documents,
            "tokens": self.num_tokens,
            "bytes": self.num_bytes,
            "bytes_per_token": self.num_bytes / max(1, self.num_tokens),
        }


def tokenize_to_file(docs: Sequence[Document], tokenizer: Tokenizer, path: str | Path) -> TokenFile:
    """Tokenize once into ``path`` (+ ``path.json`` sidecar); reuse it if the content matches.

    Documents are encoded in batches and each followed by the EOS id; ids are stored as
    uint16 when the vocabulary fits (<= 65536), else uint32. Both files are written atomically,
    the sidecar last, so an interrupted run leaves nothing that :meth:`TokenFile.open` accepts.
    """
    path = Path(path)
    eos_id = special_token_id(tokenizer, EOS_TOKEN)
    fingerprint = vocab_fingerprint(tokenizer)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    content_hash = _content_hash(
        {"format": _TOKEN_FILE_FORMAT, "tokenizer": fingerprint}, (d.text for d in docs)
    )
    if path.exists() and TokenFile.sidecar(path).exists():
        try:
            cached = TokenFile.open(path)
        except ValueError as err:
            logger.warning("re-tokenizing: %s", err)
        else:
            if cached.content_hash == content_hash:
                logger.info("token file cache hit: %s", path)
                return cached

    dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    num_tokens = num_bytes = 0
    try:
        with (
            os.fdopen(fd, "wb") as f,
            tqdm(
                total=len(docs),
                desc=f"tokenizing {path.name}",
                unit="doc",
                disable=None,
                leave=False,
            ) as bar,
        ):
            for start in range(0, len(docs), _ENCODE_CHUNK):
                texts = [d.text for d in docs[start : start + _ENCODE_CHUNK]]
                encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
                ids = [np.asarray(e.ids + [eos_id], dtype=dtype) for e in encodings]
                chunk = np.concatenate(ids) if ids else np.zeros(0, dtype=dtype)
                f.write(chunk.tobytes())
                num_tokens += int(chunk.shape[0])
                num_bytes += sum(len(t.encode("utf-8")) for t in texts)
                bar.update(len(texts))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    meta = {
        "format": _TOKEN_FILE_FORMAT,
        "dtype": dtype.name,
        "num_tokens": num_tokens,
        "num_documents": len(docs),
        "num_bytes": num_bytes,
        "eos_id": eos_id,
        "vocab_size": vocab_size,
        "tokenizer_fingerprint": fingerprint,
        "content_hash": content_hash,
    }
    _atomic_write(TokenFile.sidecar(path), json.dumps(meta, indent=2))
    logger.info("wrote %d tokens of %d documents to %s", num_tokens, len(docs), path)
    return TokenFile.open(path)


# ---------------------------------------------------------------------------------------------
# Batches

HashFn = Callable[[Tensor], dict[int, Tensor]]  # [B, T] raw ids -> {layer_id: [B, T, H]}


@dataclass
class Batch:
    """One step's data. ``targets[:, t] = input_ids[:, t + 1]`` in the token stream."""

    input_ids: Tensor  # [B, T] int64
    targets: Tensor  # [B, T] int64
    hash_ids: dict[int, Tensor] | None = None  # {layer_id: [B, T, H] int64}, from hash_fn

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The same batch on ``device`` (hash ids included)."""
        hash_ids = None
        if self.hash_ids is not None:
            hash_ids = {
                k: v.to(device, non_blocking=non_blocking) for k, v in self.hash_ids.items()
            }
        return Batch(
            self.input_ids.to(device, non_blocking=non_blocking),
            self.targets.to(device, non_blocking=non_blocking),
            hash_ids,
        )


def _tokens_of(source: TokenFile | np.ndarray) -> np.ndarray:
    return source.tokens if isinstance(source, TokenFile) else np.asarray(source)


def _check_window(tokens: np.ndarray, seq_len: int, batch_size: int) -> None:
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
    if tokens.shape[0] < seq_len + 1:
        raise ValueError(
            f"corpus has {tokens.shape[0]} tokens, fewer than one window of seq_len + 1 = "
            f"{seq_len + 1}; use a shorter seq_len or a larger corpus/validation fraction"
        )


def _make_batch(
    tokens: np.ndarray, starts: Sequence[int], seq_len: int, hash_fn: HashFn | None
) -> Batch:
    """Windows ``tokens[s : s + T + 1]`` -> inputs [B, T] and next-token targets [B, T]."""
    windows = np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)
    window = torch.from_numpy(windows)  # [B, T + 1]
    input_ids, targets = window[:, :-1], window[:, 1:]  # [B, T] each
    hash_ids = hash_fn(input_ids) if hash_fn is not None else None
    return Batch(input_ids, targets, hash_ids)


class TrainBatches:
    """An endless stream of random [B, T] windows from a token stream, exactly resumable.

    Window starts come from a ``torch.Generator`` seeded with ``seed``; :meth:`state_dict`
    holds its state and the number of batches drawn, so ``load_state_dict`` continues with
    the batches an uninterrupted run would have produced, bit for bit. ``hash_fn`` (e.g. the
    model's ``compute_hash_ids``) is applied to each batch's inputs here, off the step.
    """

    def __init__(
        self,
        source: TokenFile | np.ndarray,
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        hash_fn: HashFn | None = None,
    ) -> None:
        self.tokens = _tokens_of(source)
        _check_window(self.tokens, seq_len, batch_size)
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.hash_fn = hash_fn
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> Batch:
        # Start in [0, n - T - 1], so the window's last target tokens[s + T] exists.
        high = self.tokens.shape[0] - self.seq_len
        starts = torch.randint(0, high, (self.batch_size,), generator=self.generator)
        self.batches_drawn += 1
        return _make_batch(self.tokens, starts.tolist(), self.seq_len, self.hash_fn)

    def state_dict(self) -> dict[str, Any]:
        """The data position: generator state, batches drawn, and what they were drawn from."""
        return {
            "generator_state": self.generator.get_state(),
            "batches_drawn": self.batches_drawn,
            "seed": self.seed,
            "num_tokens": int(self.tokens.shape[0]),
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``; refuses a state saved for another corpus size or batch shape."""
        for field in ("num_tokens", "batch_size", "seq_len"):
            mine = int(self.tokens.shape[0]) if field == "num_tokens" else getattr(self, field)
            if int(state[field]) != mine:
                raise ValueError(
                    f"data state was saved with {field}={state[field]}, this loader has {mine}; "
                    "resume with the same corpus and batch shape"
                )
        self.generator.set_state(state["generator_state"])
        self.batches_drawn = int(state["batches_drawn"])
        self.seed = int(state["seed"])


class ValBatches:
    """Deterministic, sequential, non-overlapping [B, T] windows: the same list every pass.

    Window w covers inputs ``tokens[w*T : (w+1)*T]``; the last batch may hold fewer than B
    windows so that every full window is scored. ``max_batches`` keeps the first ones only.
    """

    def __init__(
        self,
        source: TokenFile | np.ndarray,
        batch_size: int,
        seq_len: int,
        *,
        max_batches: int | None = None,
        hash_fn: HashFn | None = None,
    ) -> None:
        self.tokens = _tokens_of(source)
        _check_window(self.tokens, seq_len, batch_size)
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.hash_fn = hash_fn
        num_windows = (self.tokens.shape[0] - 1) // seq_len
        self.starts = [w * seq_len for w in range(num_windows)]
        num_batches = math.ceil(num_windows / batch_size)
        self.num_batches = num_batches if max_batches is None else min(num_batches, max_batches)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        for b in range(self.num_batches):
            starts = self.starts[b * self.batch_size : (b + 1) * self.batch_size]
            yield _make_batch(self.tokens, starts, self.seq_len, self.hash_fn)


_DONE = object()


class Prefetcher:
    """Prepares the next ``depth`` batches (hash ids included) in a background thread.

    Iterates exactly the batches of ``source`` in order. For a resumable source
    (:class:`TrainBatches`), :meth:`state_dict` is the source's state after the last batch
    *handed out*, not after the ones waiting in the queue, so a checkpoint resumes where the
    training step actually was. Call :meth:`close` (or use it as a context manager) to stop
    the thread.
    """

    def __init__(self, source: Iterable[Batch], depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self.source = source
        self.depth = depth
        self._state = self._source_state()
        self._thread: threading.Thread | None = None
        self._start()

    def _source_state(self) -> dict[str, Any] | None:
        state_dict = getattr(self.source, "state_dict", None)
        return state_dict() if state_dict is not None else None

    def _start(self) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=self.depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="engramlm-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        """Block until there is room or we are told to stop; False if stopped."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for batch in self.source:
                # The source's state right after this batch: what a checkpoint taken after
                # the consumer has used it must record.
                if not self._put((batch, self._source_state())) or self._stop.is_set():
                    return
        except BaseException as err:  # handed to the consumer, raised there
            self._put(err)
            return
        self._put(_DONE)

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Batch:
        if self._thread is None:
            raise StopIteration
        item = self._queue.get()
        if item is _DONE:
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        batch, self._state = item
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The source's state after the last batch handed out (resume point)."""
        if self._state is None:
            raise TypeError(f"{type(self.source).__name__} has no state_dict; it cannot resume")
        return self._state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Drop prefetched batches, move the source to ``state`` and prefetch from there."""
        self.close()
        self.source.load_state_dict(state)  # type: ignore[attr-defined]
        self._state = self._source_state()
        self._start()

    def close(self) -> None:
        """Stop the thread; batches it had prepared are dropped."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# One call


@dataclass(frozen=True)
class PreparedCorpus:
    """Everything training needs from a corpus: tokenizer, P: V -> V', token files, stats."""

    source: str
    tokenizer: Tokenizer
    compressed_vocab: CompressedVocab
    train: TokenFile
    val: TokenFile
    # How the documents were split (``prepare_corpus``'s seed and tuning flag): a run keeps
    # them, so that its validation split (and tokenizer) can be rebuilt to score it later.
    split_seed: int = 0
    tuning: bool = False

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return special_token_id(self.tokenizer, EOS_TOKEN)

    @property
    def pad_id(self) -> int:
        return special_token_id(self.tokenizer, PAD_TOKEN)

    def stats(self) -> dict[str, dict[str, float]]:
        """Documents, tokens, UTF-8 bytes and bytes per token of each split."""
        return {"train": self.train.stats(), "val": self.val.stats()}


def prepare_corpus(
    source: str | Path = "pydocs",
    *,
    vocab_size: int = 8192,
    val_fraction: float = 0.05,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    tuning: bool = False,
) -> PreparedCorpus:
    """Load, split by document, train the tokenizer on train only, tokenize both splits.

    ``tuning=True`` gives the tuning split instead, for choosing hyper-parameters without
    touching the validation documents the results are reported on: the same tokenizer (trained
    on the same training documents), a validation split of ``val_fraction`` of the *training*
    documents (another seeded draw) and the rest of them to train on.

    Every step is cached under ``cache_dir`` (default :func:`default_cache_dir`) by content
    hash, so a second call re-reads the text and hashes it but trains and tokenizes nothing.
    """
    cache = Path(cache_dir or default_cache_dir())
    docs = load_documents(source)
    train_docs, val_docs = split_documents(docs, val_fraction, seed)
    tokenizer = train_tokenizer(train_docs, vocab_size, cache)
    if tuning:
        train_docs, val_docs = split_documents(train_docs, val_fraction, seed + 1)
    fingerprint = vocab_fingerprint(tokenizer)
    files = {}
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        key = _content_hash({"tokenizer": fingerprint}, (d.text for d in split_docs))
        files[split] = tokenize_to_file(split_docs, tokenizer, cache / f"tokens-{key}-{split}.bin")
    corpus = PreparedCorpus(
        source=f"{source} (tuning split)" if tuning else str(source),
        tokenizer=tokenizer,
        compressed_vocab=CompressedVocab.from_tokenizer(tokenizer),
        train=files["train"],
        val=files["val"],
        split_seed=seed,
        tuning=tuning,
    )
    logger.info("prepared %s: %s", source, corpus.stats())
    return corpus
