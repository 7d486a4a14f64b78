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
    def from_tokenizer(cls, tokenizer: Any, *, expected_size: int | None = None) -> CompressedVocab:
        """Build P by scanning raw ids 0..V-1; canonical ids in order of first appearance.

        Each id's text is the Rust backend's decode with special tokens kept (as DeepSeek-V4.1
        builds its map; the demo used the Python tokenizer's decode). ``expected_size`` (a
        checkpoint's ``engram_compressed_vocab_size``) refuses a map of another size: the hash
        multipliers depend on V', so every table row would move.
        """
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
        if expected_size is not None and len(key_to_id) != expected_size:
            raise ValueError(
                f"the tokenizer ({size} ids) compresses to {len(key_to_id)} ids, the model "
                f"expects {expected_size} (engram_compressed_vocab_size): the hash multipliers "
                "depend on it, so every table row would move; use the model's own tokenizer"
            )
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


def special_token_ids(tokenizer: Any) -> set[int]:
    """Raw ids of the tokenizer's special tokens (a ``tokenizers.Tokenizer`` or an HF one)."""
    return {i for i, t in _backend(tokenizer).get_added_tokens_decoder().items() if t.special}


def resolve_pad_id(
    pad_id: int | None,
    tokenizer: Any,
    lookup: np.ndarray | None = None,
    *,
    pad_token: str | None = None,
    eos_token: str | None = None,
    field: str = "engram.pad_id",
) -> int:
    """The raw id that fills the n-gram history before a sequence start (SPEC §2.2), checked.

    ``None`` takes the tokenizer's pad token, else its EOS: an HF tokenizer's
    ``pad_token_id``/``eos_token_id``, or for a ``tokenizers.Tokenizer`` the ids of the tokens
    named ``pad_token``/``eos_token``. The filler must be a special token that no ordinary
    token shares after compression (``lookup``: raw -> compressed ids): an ordinary one would
    make every (start, x) n-gram address the rows of a real (token, x) n-gram. ValueError
    names the offending token and the fix.
    """
    backend = _backend(tokenizer)
    specials = special_token_ids(tokenizer)
    if pad_id is None:
        names = (pad_token, eos_token)
        candidates = [getattr(tokenizer, a, None) for a in ("pad_token_id", "eos_token_id")]
        candidates += [backend.token_to_id(n) for n in names if n is not None]
        found = [c for c in candidates if isinstance(c, int)]
        if not found:
            raise ValueError(
                f"{field} is unset and the tokenizer has neither a pad nor an EOS token; set "
                f"{field} to the raw id of a special token (special ids: {sorted(specials)})"
            )
        pad_id = found[0]
    size = backend.get_vocab_size(with_added_tokens=True)
    if not 0 <= pad_id < size:
        raise ValueError(f"{field}={pad_id} is not a token id of the tokenizer [0, {size})")
    if pad_id not in specials:
        raise ValueError(
            f"{field}={pad_id} is the ordinary token {backend.id_to_token(pad_id)!r}: the filler "
            "before a sequence start must be a special token, or every sequence start aliases "
            f"real n-grams. Leave {field} unset (the tokenizer's pad, else EOS) or set it to one "
            f"of the special ids {sorted(specials)}"
        )
    if lookup is not None:
        shared = [i for i in np.flatnonzero(lookup == lookup[pad_id]).tolist() if i not in specials]
        if shared:
            raise ValueError(
                f"{field}={pad_id} ({backend.id_to_token(pad_id)!r}) shares its compressed id "
                f"with the ordinary token(s) {[backend.id_to_token(i) for i in shared[:5]]}; "
                "choose a special token whose text no ordinary token normalises to"
            )
    return pad_id
