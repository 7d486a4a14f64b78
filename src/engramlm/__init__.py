"""engramlm: conditional memory for language models (DeepSeek's Engram, arXiv 2601.07372)."""

from engramlm.config import EngramConfig
from engramlm.engram import Engram, ShortConv, context_gate
from engramlm.hashing import NgramHasher, head_moduli, layer_multipliers, ngram_hash
from engramlm.tables import DeviceTable, Table
from engramlm.tokenization import CompressedVocab, TokenizerMismatchError, vocab_fingerprint

__version__ = "0.1.0"

__all__ = [
    "CompressedVocab",
    "DeviceTable",
    "Engram",
    "EngramConfig",
    "NgramHasher",
    "ShortConv",
    "Table",
    "TokenizerMismatchError",
    "__version__",
    "context_gate",
    "head_moduli",
    "layer_multipliers",
    "ngram_hash",
    "vocab_fingerprint",
]
