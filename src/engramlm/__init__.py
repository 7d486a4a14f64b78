"""engramlm: conditional memory for language models (DeepSeek's Engram, arXiv 2601.07372)."""

from engramlm.checkpoint import (
    CheckpointError,
    check_compatible,
    find_latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from engramlm.config import EngramConfig, ModelConfig
from engramlm.data import (
    Batch,
    CorpusNotInstalledError,
    Document,
    Prefetcher,
    PreparedCorpus,
    TokenFile,
    TrainBatches,
    ValBatches,
    load_documents,
    prepare_corpus,
    split_documents,
    tokenize_to_file,
    train_tokenizer,
)
from engramlm.engram import Engram, ShortConv, context_gate
from engramlm.hashing import NgramHasher, head_moduli, layer_multipliers, ngram_hash
from engramlm.model import (
    DecodeCache,
    EngramLM,
    ModelOutput,
    ModelStats,
    allocate,
    model_stats,
)
from engramlm.retrofit import load_retrofit, retrofit, save_retrofit, train_retrofit
from engramlm.tables import DeviceTable, Table
from engramlm.tokenization import CompressedVocab, TokenizerMismatchError, vocab_fingerprint
from engramlm.train import TrainConfig

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "CheckpointError",
    "CompressedVocab",
    "CorpusNotInstalledError",
    "DecodeCache",
    "DeviceTable",
    "Document",
    "Engram",
    "EngramConfig",
    "EngramLM",
    "ModelConfig",
    "ModelOutput",
    "ModelStats",
    "NgramHasher",
    "Prefetcher",
    "PreparedCorpus",
    "ShortConv",
    "Table",
    "TokenFile",
    "TokenizerMismatchError",
    "TrainBatches",
    "TrainConfig",
    "ValBatches",
    "__version__",
    "allocate",
    "check_compatible",
    "context_gate",
    "find_latest_checkpoint",
    "head_moduli",
    "layer_multipliers",
    "load_checkpoint",
    "load_documents",
    "load_retrofit",
    "model_stats",
    "ngram_hash",
    "prepare_corpus",
    "retrofit",
    "save_retrofit",
    "save_checkpoint",
    "split_documents",
    "tokenize_to_file",
    "train_retrofit",
    "train_tokenizer",
    "verify_checkpoint",
    "vocab_fingerprint",
]

# The transformers integration imports transformers (seconds): loaded on first use only.
_HF_EXPORTS = frozenset(
    {"EngramCache", "EngramForCausalLM", "EngramHFConfig", "export_run", "load_offloaded"}
)


def __getattr__(name: str) -> object:
    """``engramlm.EngramForCausalLM`` and friends import ``engramlm.hf`` when first asked for."""
    if name in _HF_EXPORTS:
        from engramlm import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'engramlm' has no attribute {name!r}")
