"""Tokenizer compression: the surjection P: V -> V' by normalised text (SPEC §2.1, paper §2.2).

Raw ids whose single-token text normalises to the same string share a compressed id, so
"Apple", " apple" and "APPLE" address the same n-gram rows. The lookup carries a fingerprint of
the vocabulary it was built from, so a model can refuse a tokenizer it was not built for.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, normalizers
from torch import Tensor

_SPACE_SENTINEL = "\ue000"  # private-use char: protects a token that is exactly one space


def compression_normalizer() -> normalizers.Normalizer:
    """NFKC, NFD, strip accents, lowercase, collapse [ \\t\\r\\n]+ to one space, strip -
    except that a string that is exactly one space stays one space (SPEC §2.1)."""
    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), _SPACE_SENTINEL),
            normalizers.Strip(),
            normalizers.Replace(_SPACE_SENTINEL, " "),
        ]
    )


def _backend(tokenizer: Any) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` from itself or a ``PreTrainedTokenizerFast``."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer):
        return backend
    raise TypeError(
        "expected a tokenizers.Tokenizer or a transformers PreTrainedTokenizerFast, got "
        f"{type(tokenizer).__name__}"
    )


def vocab_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of the id -> token-string table, including added tokens (hex, 16 chars)."""
    tok = _backend(tokenizer)
    size = tok.get_vocab_size(with_added_tokens=True)
    pieces = [tok.id_to_token(i) for i in range(size)]
    return hashlib.sha256(json.dumps(pieces, ensure_ascii=False).encode()).hexdigest()[:16]


class TokenizerMismatchError(ValueError):
    """A tokenizer whose vocabulary differs from the one a model/lookup was built for."""


@dataclass(frozen=True)
class CompressedVocab:
    """The lookup raw id -> compressed id, with its source vocabulary's fingerprint."""

    lookup: np.ndarray  # [V] int64, values in [0, num_compressed)
    num_compressed: int  # V'
    fingerprint: str

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> CompressedVocab:
        """Build P by scanning raw ids 0..V-1; canonical ids in order of first appearance."""
        tok = _backend(tokenizer)
        size = tok.get_vocab_size(with_added_tokens=True)
        normalizer = compression_normalizer()
        texts = tok.decode_batch([[i] for i in range(size)], skip_special_tokens=False)
        key_to_id: dict[str, int] = {}
        lookup = np.empty(size, dtype=np.int64)
        for raw_id, text in enumerate(texts):
            if "\ufffd" in text:  # a partial UTF-8 byte: keep the raw token string
                key = tok.id_to_token(raw_id)
            else:
                key = normalizer.normalize_str(text) or text
            lookup[raw_id] = key_to_id.setdefault(key, len(key_to_id))
        return cls(lookup=lookup, num_compressed=len(key_to_id), fingerprint=vocab_fingerprint(tok))

    @classmethod
    def identity(cls, vocab_size: int, fingerprint: str = "") -> CompressedVocab:
        """No compression (the "w/o tokenizer compression" ablation): P(x) = x."""
        return cls(np.arange(vocab_size, dtype=np.int64), vocab_size, fingerprint)

    @property
    def vocab_size(self) -> int:
        """|V|, the raw vocabulary size."""
        return int(self.lookup.shape[0])

    @property
    def ratio(self) -> float:
        """Share of the vocabulary removed: 1 - V'/V (the paper reports 23% for 128k)."""
        return 1.0 - self.num_compressed / self.vocab_size

    def compress(self, ids: Tensor) -> Tensor:
        """Raw ids -> compressed ids, any shape; negative ids pass through unchanged (SPEC)."""
        table = torch.as_tensor(self.lookup, device=ids.device)
        return torch.where(ids < 0, ids, table[ids.clamp_min(0)])

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise :class:`TokenizerMismatchError` unless ``tokenizer`` is our source."""
        got = vocab_fingerprint(tokenizer)
        if got != self.fingerprint:
            size = _backend(tokenizer).get_vocab_size(with_added_tokens=True)
            raise TokenizerMismatchError(
                f"tokenizer vocabulary fingerprint {got} (size {size}) does not match the one "
                f"this model was built for ({self.fingerprint}, size {self.vocab_size}); load "
                "the tokenizer saved with the model, or rebuild the compressed vocabulary"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_compressed": self.num_compressed,
            "fingerprint": self.fingerprint,
            "lookup": self.lookup.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompressedVocab:
        lookup = np.asarray(d["lookup"], dtype=np.int64)
        num = int(d["num_compressed"])
        if lookup.size and (lookup.min() < 0 or lookup.max() >= num):
            raise ValueError(f"compressed vocabulary lookup has values outside [0, {num})")
        return cls(lookup=lookup, num_compressed=num, fingerprint=str(d["fingerprint"]))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> CompressedVocab:
        return cls.from_dict(json.loads(Path(path).read_text()))
