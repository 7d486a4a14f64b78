"""Hugging Face ``transformers`` integration: config, causal-LM wrapper, cache, export.

Importing this module registers model type ``"engramlm"`` with ``AutoConfig`` and
``AutoModelForCausalLM``, so ``AutoModelForCausalLM.from_pretrained(dir)`` and
``pipeline("text-generation", model=dir)`` work in any process that imported ``engramlm.hf``
(``engramlm.EngramForCausalLM`` imports it lazily). No ``trust_remote_code``: the code is the
installed package, not a copy in the checkpoint.

A saved directory (``save_pretrained``, :func:`export_run`)::

    config.json                          EngramHFConfig: ModelConfig's fields, engram nested
    generation_config.json               eos / pad ids of the tokenizer
    model.safetensors                    dense weights, keyed like EngramLM.state_dict()
    engram_tables-layer{L}.safetensors   tensor "weight" [rows, head_dim] fp32, one per layer
    tokenizer.json, tokenizer_config.json, ...   a PreTrainedTokenizerFast
    compressed_vocab.json                P: V -> V' and the tokenizer fingerprint (SPEC §2.1)

Tables sit in their own files so that ``from_pretrained(..., engram_tables="disk")`` can stream
them, row chunk by row chunk, into disk-tier tables (SPEC §5) without ever holding one in RAM.

Decoding state: attention keys/values live in ``transformers.DynamicCache`` layers; Engram's
decode state (the hash prefix and each layer's short-conv state, SPEC §2.2, §2.6) travels in
the same object, an :class:`EngramCache`. Batches must be unpadded (equal-length prompts):
Engram's n-gram hash and conv see positions, not a mask, so left padding would leak pad ids
into the first real tokens' n-grams.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DynamicCache,
    GenerationConfig,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg

from engramlm.config import ModelConfig
from engramlm.model import DecodeCache, EngramLM
from engramlm.tables import OffloadedTable, Table, TablePlan
from engramlm.tables.offload import row_chunks
from engramlm.tables.plan import read_rows, write_rows
from engramlm.tokenization import CompressedVocab, TokenizerMismatchError, vocab_fingerprint

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
VOCAB_FILE = "compressed_vocab.json"
TABLE_FILE = "engram_tables-layer{layer}.safetensors"
TABLE_KEY = "weight"
TableTier = Literal["memory", "disk"]

_DEFAULTS = ModelConfig()  # EngramHFConfig's defaults are ModelConfig's: one source
# from_pretrained arguments that transformers' Auto classes and pipelines pass along and that
# mean nothing for a local directory of ours.
_IGNORED_LOAD_KWARGS = frozenset(
    {
        "_from_auto",
        "_from_pipeline",
        "adapter_kwargs",
        "attn_implementation",
        "cache_dir",
        "code_revision",
        "force_download",
        "local_files_only",
        "low_cpu_mem_usage",
        "proxies",
        "revision",
        "token",
        "trust_remote_code",
        "use_safetensors",
    }
)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


class EngramHFConfig(PreTrainedConfig):
    """:class:`~engramlm.config.ModelConfig` as a ``transformers`` config.

    The fields are ModelConfig's, same names and defaults, with ``engram`` a nested dict
    (``EngramConfig.to_dict()``); ``attribute_map`` adds the names transformers looks for
    (``num_hidden_layers``, ``num_attention_heads``, ...). Validation is ModelConfig's: an
    invalid field fails at construction with ModelConfig's message. ``tokenizer_fingerprint``
    is the vocabulary the weights were trained with (checked on load).
    """

    model_type = "engramlm"
    attribute_map = {
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_heads",
        "num_key_value_heads": "num_kv_heads",
        "intermediate_size": "ffn_hidden_size",
        "max_position_embeddings": "max_seq_len",
        "rms_norm_eps": "norm_eps",
    }

    vocab_size: int = _DEFAULTS.vocab_size
    num_layers: int = _DEFAULTS.num_layers
    hidden_size: int = _DEFAULTS.hidden_size
    num_heads: int = _DEFAULTS.num_heads
    num_kv_heads: int = _DEFAULTS.num_kv_heads
    ffn_hidden_size: int = _DEFAULTS.ffn_hidden_size
    num_experts: int = _DEFAULTS.num_experts
    experts_per_token: int = _DEFAULTS.experts_per_token
    num_shared_experts: int = _DEFAULTS.num_shared_experts
    expert_hidden_size: int = _DEFAULTS.expert_hidden_size
    first_dense_layers: int = _DEFAULTS.first_dense_layers
    moe_bias_update_rate: float = _DEFAULTS.moe_bias_update_rate
    moe_routed_scale: float = _DEFAULTS.moe_routed_scale
    rope_theta: float = _DEFAULTS.rope_theta
    max_seq_len: int = _DEFAULTS.max_seq_len
    norm_eps: float = _DEFAULTS.norm_eps
    hc_mult: int = _DEFAULTS.hc_mult
    tie_embeddings: bool = _DEFAULTS.tie_embeddings
    engram: dict[str, Any] | None = None
    compressed_vocab_size: int | None = _DEFAULTS.compressed_vocab_size
    overencoding: dict[str, Any] | None = None  # the OverEncoding baseline's n-gram embedding
    tokenizer_fingerprint: str = ""
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self.to_model_config()  # validates every field now, not at model construction

    @classmethod
    def from_model_config(cls, config: ModelConfig, **kwargs: Any) -> EngramHFConfig:
        """The transformers config of ``config``; ``kwargs`` set the HF-only fields."""
        return cls(**config.to_dict(), **kwargs)

    def to_model_config(self) -> ModelConfig:
        """The :class:`ModelConfig` these fields describe."""
        return ModelConfig.from_dict(
            {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)}
        )


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


class EngramCache(DynamicCache):
    """A ``DynamicCache`` (attention keys/values per layer) plus Engram's decode state.

    ``hash_prefix`` [B, N-1]: the last N-1 compressed ids (SPEC §2.2); ``conv_states``: per
    Engram layer, the short conv's last (w-1)N normalised inputs [B, M*D, (w-1)N] (SPEC §2.6).
    Batch reordering (beam search, ``num_return_sequences``) applies to both. Engram's state
    cannot be rolled back, so ``crop`` (assisted/speculative decoding) is refused. Retrofitted
    HF models (``engramlm.retrofit``) keep their Engram state in this cache too (M = 1);
    ``kwargs`` go to ``DynamicCache`` (``config=`` lays out a base model's sliding layers).

    A step runs ``EngramLM.forward`` on a :class:`~engramlm.model.DecodeCache` view of this
    cache, then hands the new keys/values to ``DynamicCache.update``: one extra copy of the
    keys/values per step, the price of using only DynamicCache's public API.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hash_prefix: Tensor | None = None
        self.conv_states: dict[int, Tensor] = {}

    def decode_cache(self, num_layers: int) -> DecodeCache:
        """A :class:`~engramlm.model.DecodeCache` view for one ``EngramLM.forward`` step."""
        keys: list[Tensor | None] = []
        values: list[Tensor | None] = []
        for i in range(num_layers):
            seen = i < len(self.layers) and self.layers[i].get_seq_length() > 0
            keys.append(self.layers[i].keys if seen else None)
            values.append(self.layers[i].values if seen else None)
        return DecodeCache(
            keys=keys,
            values=values,
            conv_states=dict(self.conv_states),
            hash_prefix=self.hash_prefix,
            offset=self.get_seq_length(),
        )

    def absorb(self, step: DecodeCache, past: int) -> None:
        """Take the new keys/values (positions ``past``..) and Engram state of a finished step."""
        for i, (k, v) in enumerate(zip(step.keys, step.values, strict=True)):
            if k is not None and v is not None:
                self.update(k[:, :, past:], v[:, :, past:], i)  # [B, kv, T, hd]
        self.hash_prefix = step.hash_prefix
        self.conv_states = step.conv_states

    def _map_engram_state(self, fn: Callable[[Tensor], Tensor]) -> None:
        if self.hash_prefix is not None:
            self.hash_prefix = fn(self.hash_prefix)
        self.conv_states = {layer: fn(s) for layer, s in self.conv_states.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_engram_state(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_engram_state(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_engram_state(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError(
                f"cannot crop {tokens_to_remove} tokens: Engram's hash prefix and short-conv "
                "state only move forward (assisted/speculative decoding is unsupported)"
            )
        super().crop(tokens_to_remove)

    @property
    def is_croppable(self) -> bool:
        return False

    def reset(self) -> None:
        super().reset()
        self.hash_prefix = None
        self.conv_states = {}


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class EngramForCausalLM(PreTrainedModel, GenerationMixin):
    """:class:`~engramlm.model.EngramLM` (at ``.model``) behind the transformers causal-LM API.

    ``forward(input_ids, attention_mask=None, cache=None, labels=None, use_cache=None)``
    returns ``CausalLMOutputWithPast``; ``past_key_values=`` is accepted as the old name of
    ``cache`` (transformers 5 renamed it). ``labels`` are the input ids (shifted inside, HF's
    convention). ``generate`` works with greedy, sampling and beam search; it feeds only the
    new token after the prompt. ``tokenizer`` is kept to be saved beside the weights.
    """

    config_class = EngramHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _is_stateful = True  # Engram's conv state cannot rewind: no assisted generation

    def __init__(
        self,
        config: EngramHFConfig,
        *,
        engramlm: EngramLM | None = None,
        compressed_vocab: CompressedVocab | None = None,
        tables: TablePlan | None = None,
        tokenizer: Any = None,
    ) -> None:
        super().__init__(config)
        model_config = config.to_model_config()
        if engramlm is None:
            vocab = compressed_vocab if model_config.compressed_vocab_size is not None else None
            engramlm = EngramLM(model_config, vocab, tables=tables)
        elif engramlm.config != model_config:
            raise ValueError(
                f"engramlm.config {engramlm.config} differs from the config's {model_config}"
            )
        self.model = engramlm
        self.tokenizer = None if tokenizer is None else as_fast_tokenizer(tokenizer)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing: EngramLM initialises itself when built (``EngramLM.init_weights``), and a
        wrapped trained model must keep its weights."""

    @classmethod
    def from_engramlm(cls, model: EngramLM, tokenizer: Any) -> EngramForCausalLM:
        """Wrap a built or trained :class:`EngramLM` (no copy) with its tokenizer
        (``tokenizers.Tokenizer`` or ``PreTrainedTokenizerFast``)."""
        fast = as_fast_tokenizer(tokenizer)
        fingerprint = vocab_fingerprint(fast)
        if model.vocab_fingerprint and model.vocab_fingerprint != fingerprint:
            raise TokenizerMismatchError(
                f"the model's compressed vocabulary was built for tokenizer "
                f"{model.vocab_fingerprint}, got tokenizer {fingerprint}"
            )
        config = EngramHFConfig.from_model_config(
            model.config,
            tokenizer_fingerprint=fingerprint,
            eos_token_id=fast.eos_token_id,
            pad_token_id=fast.pad_token_id,
        )
        return cls(config, engramlm=model, tokenizer=fast)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.lm_head

    @property
    def compressed_vocab(self) -> CompressedVocab:
        """P: V -> V' of the model (the identity without compression), with the fingerprint."""
        cfg = self.model.config
        if cfg.compressed_vocab_size is None:
            return CompressedVocab.identity(cfg.vocab_size, self.config.tokenizer_fingerprint)
        lookup = self.model.compress_lookup.to("cpu").numpy().copy()
        return CompressedVocab(lookup, cfg.compressed_vocab_size, self.model.vocab_fingerprint)

    # --- forward and generation --------------------------------------------------------------
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cache: EngramCache | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        inputs_embeds: Tensor | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple[Any, ...]:
        """input_ids [B, T] (continuing ``cache``'s tokens) -> logits [B, T, V] (+ loss, cache).

        ``attention_mask`` [B, past+T] must be all ones (unpadded batches). ``labels`` [B, T]
        use -100 to ignore; token t is scored against label t+1. ``logits_to_keep`` > 0 returns
        only the last that many positions' logits.
        """
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("EngramForCausalLM needs input_ids (Engram hashes token ids)")
        for flag in ("output_attentions", "output_hidden_states"):
            if kwargs.get(flag):
                raise NotImplementedError(f"{flag}=True is not supported by EngramForCausalLM")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is None and use_cache:
            cache = EngramCache()
        if cache is not None and not isinstance(cache, EngramCache):
            raise TypeError(
                f"cache must be an EngramCache (attention + Engram decode state), got "
                f"{type(cache).__name__}"
            )
        past = 0 if cache is None else cache.get_seq_length()
        _check_unpadded(attention_mask, input_ids.shape[0], past + input_ids.shape[1])

        step = None if cache is None else cache.decode_cache(self.config.num_layers)
        targets = None if labels is None else F.pad(labels[:, 1:], (0, 1), value=-100)
        out = self.model(input_ids, targets=targets, cache=step)
        if cache is not None and step is not None:
            cache.absorb(step, past)
        logits = out.logits[:, -logits_to_keep:] if logits_to_keep else out.logits
        result = CausalLMOutputWithPast(loss=out.loss, logits=logits, cache=cache)
        return result if return_dict is not False else result.to_tuple()

    def prepare_inputs_for_generation(
        self,
        input_ids: Tensor,
        cache: EngramCache | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Feed only the tokens the cache has not seen: the prompt first, then one per step."""
        if inputs_embeds is not None:
            raise ValueError("EngramForCausalLM generates from input_ids, not inputs_embeds")
        past = 0 if cache is None else cache.get_seq_length()
        skipped = {"next_sequence_length", "is_first_iteration", "position_ids", "labels"}
        inputs = {k: v for k, v in kwargs.items() if k not in skipped}
        inputs.update(input_ids=input_ids[:, past:], cache=cache, attention_mask=attention_mask)
        return inputs

    def _prepare_cache_for_generation(
        self,
        generation_config: GenerationConfig,
        model_kwargs: dict[str, Any],
        *args: Any,
        **kwargs: Any,
    ) -> None:
        """``generate`` builds an :class:`EngramCache` where it would build a DynamicCache."""
        if model_kwargs.get("cache") is None and generation_config.use_cache is not False:
            implementation = generation_config.cache_implementation
            if implementation not in (None, "dynamic"):
                raise ValueError(
                    f"cache_implementation={implementation!r} is not supported; EngramForCausalLM "
                    "uses an EngramCache (a DynamicCache with Engram's decode state)"
                )
            model_kwargs["cache"] = EngramCache()
            return
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    # --- saving and loading ------------------------------------------------------------------
    def save_pretrained(  # type: ignore[override]
        self,
        save_directory: str | os.PathLike[str],
        *,
        tokenizer: Any = None,
        is_main_process: bool = True,
        safe_serialization: bool = True,
    ) -> None:
        """Write the directory described in the module docstring (safetensors only).

        ``tokenizer`` defaults to the one the model was loaded or wrapped with. Tables are
        streamed row chunk by row chunk, so a disk-tier table is saved without loading it.
        """
        if not safe_serialization:
            raise ValueError("EngramForCausalLM saves safetensors only (no pickle)")
        if not is_main_process:
            return
        fast = as_fast_tokenizer(tokenizer if tokenizer is not None else self.tokenizer)
        fingerprint = vocab_fingerprint(fast)
        vocab = self.compressed_vocab
        if vocab.fingerprint and vocab.fingerprint != fingerprint:
            raise TokenizerMismatchError(
                f"the model was built for tokenizer {vocab.fingerprint}, got {fingerprint}"
            )
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        self.config.tokenizer_fingerprint = fingerprint
        self.config.eos_token_id, self.config.pad_token_id = fast.eos_token_id, fast.pad_token_id
        self.config.architectures = [type(self).__name__]
        # Every field, not the diff to defaults: a later default change must not alter a model.
        self.config.to_json_file(out / "config.json", use_diff=False)
        self.generation_config.save_pretrained(out)

        table_keys = _table_state_keys(self.model)
        dense = {
            k: v.detach().to("cpu").contiguous()
            for k, v in self.model.state_dict().items()
            if k not in table_keys
        }
        if self.model.config.tie_embeddings:
            dense.pop("lm_head.weight")  # the same tensor as embed.weight; restored by the tie
        save_file(dense, str(out / MODEL_FILE), metadata={"format": "pt"})
        for block in self.model.layers:
            if block.engram is not None:
                path = out / TABLE_FILE.format(layer=block.layer_id)
                _write_table_shard(path, block.engram.table, block.layer_id)

        fast.save_pretrained(out)
        CompressedVocab(vocab.lookup, vocab.num_compressed, fingerprint).save(out / VOCAB_FILE)
        logger.info("saved %s to %s", type(self).__name__, out)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        *model_args: Any,
        config: EngramHFConfig | None = None,
        engram_tables: TableTier = "memory",
        table_dir: str | os.PathLike[str] | None = None,
        table_cache_mb: int = 256,
        dtype: torch.dtype | str | None = None,
        device_map: str | torch.device | None = None,
        **kwargs: Any,
    ) -> EngramForCausalLM:
        """Load a directory written by :meth:`save_pretrained` (local directories only).

        Checks that the saved tokenizer, compressed vocabulary and config share one vocabulary
        fingerprint (``TokenizerMismatchError`` otherwise). ``engram_tables="disk"`` creates
        disk-tier tables under ``table_dir`` (one folder per layer, which must not exist yet)
        with ``table_cache_mb`` of RAM cache each, and streams the rows in without holding a
        table in memory. ``dtype`` casts the dense weights; ``device_map`` may name one
        device. Hub-download arguments that transformers passes along are ignored.
        """
        torch_dtype = kwargs.pop("torch_dtype", None)
        unknown = sorted(set(kwargs) - _IGNORED_LOAD_KWARGS)
        if model_args or unknown:
            raise TypeError(
                f"EngramForCausalLM.from_pretrained got unsupported arguments "
                f"{[*map(repr, model_args), *unknown]}"
            )
        directory = Path(pretrained_model_name_or_path)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(
                f"{directory} has no config.json: EngramForCausalLM loads local directories "
                "written by save_pretrained or engramlm.hf.export_run"
            )
        if config is None:
            config = EngramHFConfig.from_pretrained(directory)
        if not isinstance(config, EngramHFConfig):
            raise TypeError(f"config must be an EngramHFConfig, got {type(config).__name__}")

        tokenizer, vocab = _checked_tokenizer(directory, config)

        if engram_tables == "memory":
            plan = None
        elif engram_tables == "disk":
            if table_dir is None:
                raise ValueError('engram_tables="disk" needs table_dir= (a folder for the tables)')
            plan = TablePlan("disk", path=str(table_dir), cache_mb=table_cache_mb)
        else:
            raise ValueError(f"engram_tables must be 'memory' or 'disk', got {engram_tables!r}")
        model = cls(config, compressed_vocab=vocab, tables=plan, tokenizer=tokenizer)
        _load_dense(model.model, directory / MODEL_FILE, vocab)
        for block in model.model.layers:
            if block.engram is not None:
                path = directory / TABLE_FILE.format(layer=block.layer_id)
                _load_table_shard(path, block.engram.table)

        dtype = dtype if dtype is not None else torch_dtype
        return _finish_loading(model, directory, dtype, device_map, pretrained_model_name_or_path)


def _checked_tokenizer(
    directory: Path, config: EngramHFConfig
) -> tuple[PreTrainedTokenizerFast, CompressedVocab]:
    """The folder's tokenizer and compressed vocabulary, checked to share the config's
    fingerprint (``TokenizerMismatchError`` otherwise)."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
    vocab = CompressedVocab.load(directory / VOCAB_FILE)
    vocab.check_tokenizer(tokenizer)
    if config.tokenizer_fingerprint != vocab.fingerprint:
        raise TokenizerMismatchError(
            f"config.json names tokenizer {config.tokenizer_fingerprint}, but "
            f"{VOCAB_FILE} and the tokenizer are {vocab.fingerprint}"
        )
    return tokenizer, vocab


def _check_unpadded(attention_mask: Tensor | None, batch: int, length: int) -> None:
    """Refuse masks with zeros: Engram would hash pad ids into the real tokens' n-grams."""
    if attention_mask is None:
        return
    if tuple(attention_mask.shape) != (batch, length):
        raise ValueError(
            f"attention_mask must be [B, past + T] = [{batch}, {length}], "
            f"got {list(attention_mask.shape)}"
        )
    if not bool(attention_mask.bool().all()):
        raise ValueError(
            "padded batches are not supported (attention_mask has zeros): Engram's n-gram hash "
            "and short conv see positions, not the mask; batch prompts of equal length, or "
            "generate one prompt at a time"
        )


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def as_fast_tokenizer(tokenizer: Any) -> PreTrainedTokenizerFast:
    """A ``PreTrainedTokenizerFast`` over a ``tokenizers.Tokenizer`` (EOS and pad tokens set
    from engramlm's special tokens when present), or the argument itself."""
    from engramlm.data import EOS_TOKEN, PAD_TOKEN

    if isinstance(tokenizer, PreTrainedTokenizerFast):
        return tokenizer
    if isinstance(tokenizer, Tokenizer):
        specials = {
            name: token
            for name, token in (("eos_token", EOS_TOKEN), ("pad_token", PAD_TOKEN))
            if tokenizer.token_to_id(token) is not None
        }
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **specials)
    raise TypeError(
        "tokenizer must be a tokenizers.Tokenizer or a PreTrainedTokenizerFast, got "
        f"{type(tokenizer).__name__} (pass tokenizer= to save_pretrained)"
    )


def _table_state_keys(model: EngramLM) -> set[str]:
    """State-dict keys of the Engram table weights (present for in-memory tiers only)."""
    return {f"layers.{b.layer_id}.engram.table.weight" for b in model.layers if b.engram}


def _load_dense(model: EngramLM, path: Path, vocab: CompressedVocab) -> None:
    """Load ``model.safetensors``; everything but the tables (and a tied head) must be there."""
    state = load_file(str(path))
    saved_lookup = state.get("compress_lookup")
    if saved_lookup is not None and not torch.equal(
        saved_lookup, torch.as_tensor(vocab.lookup, dtype=saved_lookup.dtype)
    ):
        raise TokenizerMismatchError(
            f"{path} was trained with a different compressed vocabulary than {VOCAB_FILE}"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = _table_state_keys(model)
    if model.config.tie_embeddings:
        allowed.add("lm_head.weight")
    missing = sorted(set(missing) - allowed)
    if missing or unexpected:
        raise ValueError(f"{path}: missing keys {missing}, unexpected keys {sorted(unexpected)}")


def _write_table_shard(path: Path, table: Table, layer_id: int) -> None:
    """Write a table as safetensors tensor ``weight`` [rows, dim] fp32, one row chunk at a time.

    The format is an 8-byte little-endian header length, a JSON header padded with spaces to a
    multiple of 8 bytes, then the raw little-endian data. ``safetensors.save_file`` needs the
    whole tensor in memory; a disk-tier table may not fit, so this streams it.
    """
    nbytes = table.num_rows * table.dim * 4
    header = {
        "__metadata__": {"format": "pt", "engram_layer": str(layer_id)},
        TABLE_KEY: {
            "dtype": "F32",
            "shape": [table.num_rows, table.dim],
            "data_offsets": [0, nbytes],
        },
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    # Ids go where the rows are: a DeviceTable's parameter; offloaded tables take CPU ids.
    params = list(table.parameters()) if isinstance(table, nn.Module) else []
    device = params[0].device if params else torch.device("cpu")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for start, stop in row_chunks(table.num_rows):
            rows = torch.arange(start, stop, device=device)
            f.write(read_rows(table, rows).numpy().astype("<f4", copy=False).tobytes())


def _load_table_shard(path: Path, table: Table) -> None:
    """Stream the safetensors tensor ``weight`` into ``table`` (any backend) in row chunks."""
    with safe_open(str(path), framework="pt") as f:
        weight = f.get_slice(TABLE_KEY)
        shape = tuple(weight.get_shape())
        if shape != (table.num_rows, table.dim):
            raise ValueError(
                f"{path} holds a {list(shape)} table, the model needs "
                f"[{table.num_rows}, {table.dim}] (sum of head primes, head_dim)"
            )
        for start, stop in row_chunks(table.num_rows):
            write_rows(table, torch.arange(start, stop), weight[start:stop].float())
    if isinstance(table, OffloadedTable):
        table.flush()


def export_run(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Convert a training run (its last good checkpoint, ``engramlm.train.load_run``) into a
    Hugging Face directory loadable with ``AutoModelForCausalLM.from_pretrained``."""
    from engramlm.train import load_run

    model, tokenizer = load_run(run_dir)
    EngramForCausalLM.from_engramlm(model, tokenizer).save_pretrained(out_dir)
    logger.info("exported run %s to %s", run_dir, out_dir)
    return Path(out_dir)


# --------------------------------------------------------------------------------------------
# Released models with hashed n-gram tables, served from a table tier
# --------------------------------------------------------------------------------------------

# model_type in config.json -> the module whose ``load`` serves it.
OFFLOADED_MODEL_TYPES = {"qwen4_exp": "engramlm.qwen4_exp", "qwen4_exp_text": "engramlm.qwen4_exp"}


def load_offloaded(
    model_dir: str | os.PathLike[str],
    *,
    engram_tables: Literal["host", "disk"] = "disk",
    table_dir: str | os.PathLike[str] | None = None,
    cache_rows: int | None = None,
    **from_pretrained_kwargs: Any,
) -> PreTrainedModel:
    """The transformers model of a local folder, its hashed n-gram tables served by an
    engramlm table tier and its n-gram layers computed by engramlm's :class:`Engram`.

    Supported: Qwen4-Exp (``qwen4_exp``, ``qwen4_exp_text``; its PLE layers, see
    :mod:`engramlm.qwen4_exp`) - the model is transformers' own class, e.g.
    ``Qwen4ExpForCausalLM``, with the same outputs - and engramlm's own folders
    (``EngramForCausalLM``, :meth:`EngramForCausalLM.from_pretrained`). Another model type is a
    ``ValueError`` naming the supported ones.

    ``engram_tables="host"``: rows in RAM (float32), streamed from the shards at each load;
    ``"disk"``: rows in files under ``table_dir`` (default
    :func:`engramlm.table_io.default_table_dir`), built on the first load - atomically,
    fingerprinted with the tables' shapes, dtype and source files - and reused by later loads
    of the same folder; a tier built from anything else is refused with the reason.
    ``cache_rows``: the disk tier's RAM cache, rows per table. Rows go from the checkpoint's
    safetensors shards to the tier in chunks: no table is ever whole in memory. Lookups are
    prefetched as soon as a forward's ids are known. Other keyword arguments go to
    ``from_pretrained`` (``dtype``, ``device_map``, ...).
    """
    import importlib

    directory = Path(model_dir)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} has no config.json: not a model folder")
    model_type = json.loads((directory / "config.json").read_text()).get("model_type")
    supported = sorted([*OFFLOADED_MODEL_TYPES, EngramHFConfig.model_type])
    if model_type == EngramHFConfig.model_type:
        return _load_engramlm_offloaded(
            directory, engram_tables, table_dir, cache_rows, **from_pretrained_kwargs
        )
    if model_type not in OFFLOADED_MODEL_TYPES:
        raise ValueError(
            f"{directory} is a {model_type!r} model, which has no hashed n-gram tables that "
            f"engramlm serves; supported model types: {supported}"
        )
    module = importlib.import_module(OFFLOADED_MODEL_TYPES[model_type])
    return module.load(
        directory,
        engram_tables=engram_tables,
        table_dir=table_dir,
        cache_rows=cache_rows,
        **from_pretrained_kwargs,
    )


def generate_offloaded(
    model_dir: str | os.PathLike[str],
    prompt: str,
    *,
    engram_tables: Literal["host", "disk"] = "disk",
    table_dir: str | os.PathLike[str] | None = None,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float = 1.0,
    seed: int = 0,
) -> str:
    """The continuation of ``prompt`` by a folder's model served with :func:`load_offloaded`
    (its tokenizer from the same folder); ``temperature=0`` is greedy."""
    from transformers import AutoTokenizer

    if not any(
        (Path(model_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")
    ):
        raise ValueError(
            f"{model_dir} has no tokenizer (tokenizer.json / tokenizer_config.json): save the "
            "model's tokenizer into the folder (tokenizer.save_pretrained(folder))"
        )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise ValueError("the prompt encodes to no tokens; give some text")
    model = load_offloaded(model_dir, engram_tables=engram_tables, table_dir=table_dir)
    try:
        sample = temperature > 0
        torch.manual_seed(seed)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else None
        with torch.no_grad():
            out = model.generate(
                ids,
                max_new_tokens=max_new_tokens,
                do_sample=sample,
                **(dict(temperature=temperature, top_k=top_k, top_p=top_p) if sample else {}),
                **({} if pad is None else {"pad_token_id": pad}),
            )
    finally:
        close_tables(model)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def close_tables(model: nn.Module) -> None:
    """Flush and release every offloaded table of a model (disk files unlock, so another model
    may open the same tier); idempotent. The model cannot look rows up afterwards."""
    for module in model.modules():
        if isinstance(module, OffloadedTable):
            module.close()


def _load_engramlm_offloaded(
    directory: Path,
    engram_tables: str,
    table_dir: str | os.PathLike[str] | None,
    cache_rows: int | None,
    **kwargs: Any,
) -> EngramForCausalLM:
    """:func:`load_offloaded` for engramlm's own folders: the tables of
    ``engram_tables-layer{L}.safetensors`` on a host or disk tier, the rest as
    :meth:`EngramForCausalLM.from_pretrained` loads it."""
    from engramlm.table_io import TableSource, load_table_tier
    from engramlm.tables import DeviceTable

    dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", None))
    device_map = kwargs.pop("device_map", None)
    unknown = sorted(set(kwargs) - _IGNORED_LOAD_KWARGS)
    if unknown:
        raise TypeError(f"load_offloaded got unsupported arguments {unknown} for {directory}")
    config = EngramHFConfig.from_pretrained(directory)
    model_config = config.to_model_config()
    if model_config.engram is None or model_config.overencoding is not None:
        raise ValueError(
            f"{directory}: load_offloaded serves Engram tables; this model has "
            f"{'none' if model_config.engram is None else 'an Over-Encoding table too'}: load "
            "it with EngramForCausalLM.from_pretrained"
        )
    tokenizer, vocab = _checked_tokenizer(directory, config)
    # Built on the meta device: no table (nor weight) is allocated. The tables are swapped for
    # one-row stand-ins while init_weights restores the buffers that are not in the checkpoint
    # (it would otherwise reset the served rows), then for the tier's tables.
    with torch.device("meta"):
        model = EngramForCausalLM(config, compressed_vocab=vocab, tokenizer=tokenizer)
    engrams = {b.layer_id: b.engram for b in model.model.layers if b.engram is not None}
    sources = [
        TableSource(
            f"engram_layer{layer}",
            ((directory / TABLE_FILE.format(layer=layer), TABLE_KEY),),
            engram.table.num_rows,
            engram.table.dim,
        )
        for layer, engram in engrams.items()
    ]
    tables = load_table_tier(
        directory,
        sources,
        kind=engram_tables,
        table_dir=table_dir,
        cache_rows=cache_rows,
        identity={
            "model_type": EngramHFConfig.model_type,
            "engram": model_config.engram.to_dict(),
            "tokenizer_fingerprint": vocab.fingerprint,
        },
    )
    for engram in engrams.values():
        with torch.device("meta"):
            engram.table = DeviceTable(1, engram.table.dim)
    model.to_empty(device="cpu")
    model.model.init_weights()
    for layer, engram in engrams.items():
        engram.table = tables[f"engram_layer{layer}"]
    _load_dense(model.model, directory / MODEL_FILE, vocab)
    return _finish_loading(model, directory, dtype, device_map, directory)


def _finish_loading(
    model: EngramForCausalLM, directory: Path, dtype: Any, device_map: Any, name: Any
) -> EngramForCausalLM:
    """What every load of an engramlm folder ends with: its generation config, the asked dtype
    and device (one device: ``device_map`` naming several is refused), eval mode."""
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    if dtype is not None and dtype != "auto":
        model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    if device_map is not None:
        if not isinstance(device_map, str | torch.device) or device_map == "auto":
            raise NotImplementedError(f"device_map must name one device, got {device_map!r}")
        model.to(device_map)
    model.name_or_path = model.config.name_or_path = str(name)
    model.eval()
    return model


AutoConfig.register(EngramHFConfig.model_type, EngramHFConfig, exist_ok=True)
AutoModelForCausalLM.register(EngramHFConfig, EngramForCausalLM, exist_ok=True)
