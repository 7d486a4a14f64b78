"""Tokenizer compression (SPEC §2.1) on a BPE trained from real text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engramlm import CompressedVocab, TokenizerMismatchError
from engramlm.data import NAMED_CORPORA
from engramlm.tokenization import compression_normalizer, resolve_pad_id, special_token_ids


def train_bpe(files: list[Path], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(f) for f in files], trainer)
    return tok


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe(NAMED_CORPORA["stdlib"].files()[:40], 2048)


@pytest.mark.parametrize(
    "raw,normalised",
    [
        (" Apple", "apple"),
        ("APPLE\n", "apple"),
        ("Café", "cafe"),
        ("ﬁ", "fi"),
        ("a \t b", "a b"),
        (" ", " "),
        ("\n", " "),
        ("  x  ", "x"),
    ],
)
def test_normaliser_follows_spec_sequence(raw: str, normalised: str) -> None:
    assert compression_normalizer().normalize_str(raw) == normalised


def test_case_and_space_variants_share_a_compressed_id(bpe: Tokenizer) -> None:
    cv = CompressedVocab.from_tokenizer(bpe)
    vocab = bpe.get_vocab()
    pairs = [
        (a, b)
        for a, b in [("Ġthe", "the"), ("ĠThe", "the"), ("The", "the")]
        if a in vocab and b in vocab
    ]
    assert pairs, "expected common English tokens in the BPE vocabulary"
    for a, b in pairs:
        assert cv.lookup[vocab[a]] == cv.lookup[vocab[b]]


def test_canonical_ids_follow_first_appearance(bpe: Tokenizer) -> None:
    cv = CompressedVocab.from_tokenizer(bpe)
    seen = -1
    for c in cv.lookup.tolist():
        assert c <= seen + 1  # a new id is always the next unused one
        seen = max(seen, c)
    assert seen + 1 == cv.num_compressed
    assert 0 < cv.num_compressed < cv.vocab_size and 0 < cv.ratio < 1


def test_partial_utf8_tokens_keep_their_raw_string(bpe: Tokenizer) -> None:
    cv = CompressedVocab.from_tokenizer(bpe)
    # Byte-level tokens for lone UTF-8 continuation bytes decode to U+FFFD: each stays distinct.
    partial = [i for i in range(bpe.get_vocab_size()) if "\ufffd" in bpe.decode([i])]
    assert len(partial) > 10
    assert len({int(cv.lookup[i]) for i in partial}) == len(partial)


def test_special_tokens_are_kept(bpe: Tokenizer) -> None:
    cv = CompressedVocab.from_tokenizer(bpe)
    eos, pad = bpe.token_to_id("<|endoftext|>"), bpe.token_to_id("<pad>")
    assert cv.lookup[eos] != cv.lookup[pad]


def test_compress_passes_negative_ids_through(bpe: Tokenizer) -> None:
    cv = CompressedVocab.from_tokenizer(bpe)
    ids = torch.tensor([[-1, 5, 300], [7, -100, 0]])
    out = cv.compress(ids)
    assert out[0, 0] == -1 and out[1, 1] == -100
    assert out[0, 1] == cv.lookup[5] and out[0, 2] == cv.lookup[300]


def test_fingerprint_mismatch_is_refused(bpe: Tokenizer, text_files: list[Path]) -> None:
    cv = CompressedVocab.from_tokenizer(bpe)
    cv.check_tokenizer(bpe)
    other = train_bpe(text_files[100:110], 1024)
    with pytest.raises(TokenizerMismatchError, match="does not match"):
        cv.check_tokenizer(other)


def test_pretrained_tokenizer_fast_gives_the_same_lookup(bpe: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe)
    a, b = CompressedVocab.from_tokenizer(bpe), CompressedVocab.from_tokenizer(fast)
    assert (a.lookup == b.lookup).all() and a.fingerprint == b.fingerprint


def test_save_load_round_trip(bpe: Tokenizer, tmp_path: Path) -> None:
    cv = CompressedVocab.from_tokenizer(bpe)
    cv.save(tmp_path / "cv.json")
    back = CompressedVocab.load(tmp_path / "cv.json")
    assert (back.lookup == cv.lookup).all() and back.num_compressed == cv.num_compressed
    assert back.fingerprint == cv.fingerprint


def test_not_a_tokenizer_is_refused() -> None:
    with pytest.raises(TypeError, match="tokenizers.Tokenizer"):
        CompressedVocab.from_tokenizer("gpt2")


# --- the n-gram filler (SPEC §2.2): a special token, resolved from the tokenizer --------------


def test_unset_filler_resolves_to_the_pad_token(bpe: Tokenizer) -> None:
    vocab = CompressedVocab.from_tokenizer(bpe)
    pad = resolve_pad_id(None, bpe, vocab.lookup, pad_token="<pad>", eos_token="<|endoftext|>")
    assert pad == bpe.token_to_id("<pad>")


def test_unset_filler_falls_back_to_eos(bpe: Tokenizer) -> None:
    pad = resolve_pad_id(None, bpe, pad_token="<no-such-token>", eos_token="<|endoftext|>")
    assert pad == bpe.token_to_id("<|endoftext|>")


def test_demo_pad_id_2_is_an_ordinary_token_here_and_refused(bpe: Tokenizer) -> None:
    """The old default: raw id 2 is a byte-level piece ("!") in our BPE, so every sequence start
    would have hashed like a real ("!", x) n-gram."""
    assert 2 not in special_token_ids(bpe)
    with pytest.raises(ValueError, match="ordinary token '!'"):
        resolve_pad_id(2, bpe, CompressedVocab.from_tokenizer(bpe).lookup)


def test_filler_sharing_a_compressed_id_with_an_ordinary_token_is_refused(bpe: Tokenizer) -> None:
    vocab = CompressedVocab.from_tokenizer(bpe)
    lookup = vocab.lookup.copy()
    pad = bpe.token_to_id("<pad>")
    lookup[pad] = lookup[bpe.token_to_id("!")]  # as if "<pad>" normalised to "!"
    with pytest.raises(ValueError, match="shares its compressed id"):
        resolve_pad_id(pad, bpe, lookup)


def test_tokenizer_without_pad_or_eos_needs_an_explicit_filler(bpe: Tokenizer) -> None:
    with pytest.raises(ValueError, match="neither a pad nor an EOS"):
        resolve_pad_id(None, bpe)
