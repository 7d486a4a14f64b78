"""Retrofit Engram into a pretrained Hugging Face causal LM, without editing its source.

The model's decoder layers at ``engram_config.layer_ids`` (0-based) are wrapped so that each
computes ``h <- h + Engram(h, hash_ids)`` before calling the original layer, i.e. before its
attention and FFN (SPEC §2.7), with one residual stream (``hc_mult=1``). Engram's value
projection W_V starts at zero (weight and bias; the short conv is already zero, SPEC §2.6), so
``Y = 0`` exactly and the retrofitted model's logits equal the original's bit for bit until
Engram is trained - the LoRA-style "B = 0" start. The base weights are frozen by default.

Hash ids come from the input ids (SPEC §2.1-2.3). A decoder layer never sees ``input_ids``, so a
forward pre-hook on the base model (``model.base_model``) compresses and hashes them once per
call; the wrapped layers read the result. For KV-cached decoding, Engram's decode state (the
hashing prefix, the last N-1 compressed ids, and each layer's short-conv state) lives in the
generation cache beside the keys and values: an :class:`engramlm.hf.EngramCache`, the cache of
engramlm's own HF model. ``generate`` builds one, a cached forward without a cache gets one, and
beam search's ``reorder_cache`` / ``batch_repeat_interleave`` / ``batch_select_indices`` move
the Engram state with the keys and values; ``crop`` is refused (the state cannot rewind), and the
model is marked stateful, so assisted decoding is refused too. A call whose cache is empty starts
a fresh sequence.

Left-padded batches are supported: positions where the 2-D ``attention_mask`` is 0 are hashed as
the compressed pad id, exactly like the positions before a sequence's start (SPEC §2.2), and
enter the short conv as zeros, like its causal padding; so a left-padded row decodes as it would
alone. Masks with a zero after a one (right or inner padding) are refused.

Engram's tables stay fp32 when the base model is bf16/fp16 (the rest of Engram takes the base
model's dtype; looked-up rows are cast to it): bf16's 8-bit mantissa would drop table updates
smaller than 1/256 of a row's magnitude, and only the rows a batch addresses are ever cast.

    model = retrofit(model, tokenizer, EngramConfig.preset("tiny"))  # pad: the tokenizer's
    report = train_retrofit(model, tokenizer, TrainConfig(data="pydocs", steps=200, lr=1e-3))
    save_retrofit(model, "out/")  ...  load_retrofit(base_model, tokenizer, "out/")

transformers and safetensors are imported inside the functions that need them.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engramlm.config import EngramConfig
from engramlm.data import Document, TrainBatches, ValBatches, load_documents, split_documents
from engramlm.engram import Engram
from engramlm.hashing import NgramHasher
from engramlm.tables import DeviceTable
from engramlm.tokenization import (
    CompressedVocab,
    TokenizerMismatchError,
    _backend,
    resolve_pad_id,
)
from engramlm.train import TrainConfig, lr_at

logger = logging.getLogger(__name__)

RETROFIT_FORMAT = 1
_CONFIG_FILE = "retrofit.json"
_WEIGHTS_FILE = "engram.safetensors"
_VOCAB_FILE = "compressed_vocab.json"
# Where a base model keeps its decoder layers: Llama/Mistral/Qwen2/Qwen3 ``layers``, GPT-2 ``h``.
_LAYER_LISTS = ("layers", "h")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a HF causal LM (``model.base_model.layers`` or ``.h``)."""
    base = getattr(model, "base_model", model)
    for name in _LAYER_LISTS:
        layers = getattr(base, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__}: its base model "
        f"{type(base).__name__} has no nn.ModuleList named any of {list(_LAYER_LISTS)} "
        "(supported: Llama, Mistral, Qwen2, Qwen3, GPT-2 and others laid out like them)"
    )


def _engram_cache(config: Any) -> Any:
    """An empty :class:`engramlm.hf.EngramCache` laid out for ``config`` (sliding layers too)."""
    from engramlm.hf import EngramCache

    return EngramCache(config=config.get_text_config(decoder=True))


def _real_tokens(
    attention_mask: Tensor | None, batch: int, past: int, length: int
) -> Tensor | None:
    """[B, T] bool, False at this call's left-pad positions; None when nothing is padded.

    ``attention_mask`` [B, past + T] must be 0s then 1s in every row (left padding): a zero
    after a one would put a pad inside a real token's n-grams and conv window.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, past + length):
        raise ValueError(
            f"an Engram-retrofitted model needs a 2-D attention_mask [B, past + T] = "
            f"[{batch}, {past + length}] (Engram reads it to skip left padding), got "
            f"{list(attention_mask.shape)}"
        )
    mask = attention_mask.bool()
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        row = int((mask[:, :-1] & ~mask[:, 1:]).any(dim=1).nonzero()[0])
        raise ValueError(
            f"attention_mask row {row} has a 0 after a 1: an Engram-retrofitted model supports "
            "left padding only (pads before each row's first token); pad on the left "
            "(tokenizer.padding_side = 'left')"
        )
    keep = mask[:, past:]  # [B, T]
    return None if bool(keep.all()) else keep


class EngramRetrofit(nn.Module):
    """What every wrapped layer shares: P: V -> V', the hasher, and the per-call inputs.

    Attached to the model as ``model.engram_retrofit``. It holds only non-persistent buffers
    (they follow ``model.to(...)`` but add nothing to the model's state dict) and no decode
    state: that lives in the call's :class:`engramlm.hf.EngramCache`. ``begin`` runs from a
    forward pre-hook on the base model once per forward call, ``end`` from a forward hook.
    """

    def __init__(
        self, config: EngramConfig, compressed_vocab: CompressedVocab, num_layers: int
    ) -> None:
        super().__init__()
        self.config = config
        self.compressed_vocab = compressed_vocab
        self.num_layers = num_layers
        lookup = torch.as_tensor(compressed_vocab.lookup, dtype=torch.int64)
        self.register_buffer("compress_lookup", lookup, persistent=False)  # [V]
        self.compressed_pad = int(compressed_vocab.lookup[config.pad_id])  # SPEC §2.2
        self.hasher = NgramHasher.from_config(
            config,
            pad_id=self.compressed_pad,
            compressed_vocab_size=compressed_vocab.num_compressed,
        )
        # This call's inputs, set by begin() and cleared by end():
        self.hash_ids: dict[int, Tensor] | None = None  # {layer_id: [B, T, H]}
        self.cache: Any = None  # the EngramCache carrying the decode state, or None
        self.continuing = False  # the cache already holds earlier tokens of these sequences
        self.real_tokens: Tensor | None = None  # [B, T] bool, False at left pads; None: no pads

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise :class:`TokenizerMismatchError` unless ``tokenizer`` is the one retrofitted."""
        self.compressed_vocab.check_tokenizer(tokenizer)

    def begin(self, input_ids: Tensor, cache: Any, attention_mask: Tensor | None) -> None:
        """Hash one forward call's ``input_ids`` [B, T], continuing ``cache``'s sequences.

        ``cache`` is None (no decoding state kept) or an ``EngramCache``: empty, it starts new
        sequences (pad-filled prefix, zero conv state); otherwise its hash prefix and conv
        states continue, and the new prefix is written back to it.
        """
        from engramlm.hf import EngramCache

        B, T = input_ids.shape
        past = 0 if cache is None else int(cache.get_seq_length())
        if cache is not None and not isinstance(cache, EngramCache):
            raise TypeError(
                f"an Engram-retrofitted model keeps its decode state in an "
                f"engramlm.hf.EngramCache, got a {type(cache).__name__}; pass cache=None (one is "
                "made and returned) or the EngramCache an earlier call returned"
            )
        prefix = None
        if past:
            held = cache.hash_prefix
            layers = set(self.config.layer_ids)
            if held is None or held.shape[0] != B or set(cache.conv_states) != layers:
                raise RuntimeError(
                    f"the cache holds {past} tokens but no Engram decode state for {B} sequences "
                    f"and layers {sorted(layers)} (it has "
                    f"{'none' if held is None else f'{held.shape[0]} sequences'}, conv states "
                    f"of layers {sorted(cache.conv_states)}); decode a cache only through the "
                    "retrofitted model that filled it"
                )
            prefix = held
        keep = _real_tokens(attention_mask, B, past, T)
        compressed = self.compress_lookup[input_ids.to(self.compress_lookup.device)]  # [B, T]
        if keep is not None:  # left pads hash like the positions before the start
            compressed = compressed.masked_fill(~keep.to(compressed.device), self.compressed_pad)
        self.hash_ids = self.hasher.all_layers(compressed, prefix)
        self.cache, self.continuing, self.real_tokens = cache, past > 0, keep
        if cache is not None:
            cache.hash_prefix = self.hasher.next_prefix(prefix, compressed)
            if not past:
                cache.conv_states = {}

    def end(self) -> None:
        """Forget this call's inputs once the base model's forward returns."""
        self.hash_ids, self.cache, self.continuing, self.real_tokens = None, None, False, None

    def _pre_hook(self, signature: inspect.Signature, config: Any) -> Callable[..., Any]:
        names = list(signature.parameters)
        cache_at = names.index("cache") if "cache" in names else None

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            arguments = signature.bind(*args, **kwargs).arguments
            extra = arguments.get("kwargs", {})
            input_ids = arguments.get("input_ids")
            if input_ids is None:
                raise ValueError(
                    "an Engram-retrofitted model hashes input_ids (SPEC §2.3); it cannot run "
                    "from inputs_embeds alone"
                )
            cache = arguments.get("cache", extra.get("cache"))
            kwargs = dict(kwargs)
            if "past_key_values" in kwargs:  # the name before transformers 5.40
                cache = kwargs.pop("past_key_values")
            use_cache = arguments.get("use_cache", extra.get("use_cache"))
            if use_cache is None:
                use_cache = getattr(config, "use_cache", False)
            if cache is None and use_cache:  # the base model would make a plain DynamicCache
                cache = _engram_cache(config)
            if cache_at is not None and cache_at < len(args):  # passed positionally
                args = (*args[:cache_at], cache, *args[cache_at + 1 :])
            else:
                kwargs["cache"] = cache
            self.begin(input_ids, cache, arguments.get("attention_mask"))
            return args, kwargs

        return hook


class EngramDecoderLayer(nn.Module):
    """A decoder layer with Engram in front: ``layer(h + Engram(h, hash_ids), ...)`` (SPEC §2.7).

    Attributes the wrapped layer has (``attention_type``, ``self_attn``, ...) read through, so
    model code that inspects its layers keeps working.
    """

    def __init__(
        self, layer: nn.Module, engram: Engram, layer_id: int, context: EngramRetrofit
    ) -> None:
        super().__init__()
        self.layer = layer
        self.engram = engram
        self.layer_id = layer_id
        object.__setattr__(self, "_context", context)  # shared, not a submodule of this layer

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            layer = self._modules.get("layer")
            if layer is None:
                raise
            return getattr(layer, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        ctx: EngramRetrofit = self._context
        if ctx.hash_ids is None:
            raise RuntimeError(
                f"Engram layer {self.layer_id} ran outside a forward of the retrofitted model, "
                "so it has no hash ids; call the model (or its base model) with input_ids"
            )
        hidden = args[0] if args else kwargs.pop("hidden_states")  # [B, T, D]
        cache = ctx.cache
        state = cache.conv_states[self.layer_id] if ctx.continuing else None  # [B, D, (w-1)N]
        # Left pads add nothing and enter the conv as zeros (RMSNorm(0) = 0), like its causal
        # padding: as if the row began later.
        y, state = self.engram(
            hidden.unsqueeze(2), ctx.hash_ids[self.layer_id], state, mask=ctx.real_tokens
        )
        if cache is not None:
            cache.conv_states[self.layer_id] = state.detach()
        hidden = hidden + y.squeeze(2)  # [B, T, D], before attention and FFN
        return self.layer(hidden, *args[1:], **kwargs)


def retrofit(
    model: nn.Module,
    tokenizer: Any,
    engram_config: EngramConfig,
    *,
    freeze_base: bool = True,
) -> nn.Module:
    """Insert Engram at ``engram_config.layer_ids`` of a HF causal LM, in place; returns it.

    ``tokenizer`` (a ``PreTrainedTokenizerFast`` or ``tokenizers.Tokenizer``) defines the
    compression P: V -> V' (SPEC §2.1); model ids beyond the tokenizer's vocabulary (padded
    embedding rows) each get a compressed id of their own. Engram's W_V is zero, so logits are
    unchanged until training. ``freeze_base`` sets ``requires_grad=False`` on every base
    parameter, leaving only Engram's trainable.
    """
    if hasattr(model, "engram_retrofit"):
        raise ValueError(f"{type(model).__name__} is already retrofitted with Engram")
    layers = decoder_layers(model)
    for i, layer_id in enumerate(engram_config.layer_ids):
        if layer_id >= len(layers):
            raise ValueError(
                f"engram layer_ids[{i}]={layer_id} is out of range: {type(model).__name__} has "
                f"{len(layers)} decoder layers, so layer ids must be in [0, {len(layers)})"
            )
    if engram_config.hc_mult != 1:
        raise ValueError(
            f"engram hc_mult={engram_config.hc_mult}, but a retrofitted model has one residual "
            "stream; use dataclasses.replace(config, hc_mult=1)"
        )
    vocab = CompressedVocab.from_tokenizer(tokenizer)
    model_vocab = int(model.get_input_embeddings().num_embeddings)
    if vocab.vocab_size > model_vocab:
        raise TokenizerMismatchError(
            f"tokenizer has {vocab.vocab_size} ids but the model embeds only {model_vocab}; "
            "use the tokenizer the model was trained with"
        )
    if model_vocab > vocab.vocab_size:  # padded embedding rows: no text, their own classes
        extra = vocab.num_compressed + np.arange(model_vocab - vocab.vocab_size)
        lookup = np.concatenate([vocab.lookup, extra])
        vocab = CompressedVocab(lookup, int(extra[-1]) + 1, vocab.fingerprint)
    if not engram_config.compress_tokens:  # the ablation: hash raw ids (SPEC §2.1 skipped)
        vocab = CompressedVocab.identity(model_vocab, vocab.fingerprint)
    if engram_config.pad_id is not None and engram_config.pad_id >= model_vocab:
        raise ValueError(
            f"engram pad_id={engram_config.pad_id} must be a raw token id in [0, {model_vocab})"
        )
    lookup = vocab.lookup if engram_config.compress_tokens else None
    pad = resolve_pad_id(engram_config.pad_id, tokenizer, lookup)  # SPEC §2.2
    engram_config = dataclasses.replace(engram_config, pad_id=pad)
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)

    reference = next(model.parameters())
    context = EngramRetrofit(engram_config, vocab, len(layers)).to(reference.device)
    hidden_size = int(model.config.hidden_size)
    for layer_id in engram_config.layer_ids:
        engram = Engram(engram_config, hidden_size, context.hasher.moduli[layer_id])
        nn.init.zeros_(engram.kv_proj.weight[engram.value_rows])  # Y = 0 at init: logits kept
        if engram.kv_proj.bias is not None:
            nn.init.zeros_(engram.kv_proj.bias[engram.value_rows])
        _place(engram, reference.device, reference.dtype)
        layers[layer_id] = EngramDecoderLayer(layers[layer_id], engram, layer_id, context)
    model.engram_retrofit = context
    base = getattr(model, "base_model", model)
    base.register_forward_pre_hook(
        context._pre_hook(inspect.signature(base.forward), model.config), with_kwargs=True
    )
    base.register_forward_hook(lambda module, args, output: context.end())
    _generate_with_engram_cache(model)
    logger.info(
        "retrofitted Engram at layers %s of %s: %s parameters, V=%d -> V'=%d",
        engram_config.layer_ids,
        type(model).__name__,
        f"{sum(p.numel() for p in engram_parameters(model)):,}",
        vocab.vocab_size,
        vocab.num_compressed,
    )
    return model


def _place(engram: Engram, device: torch.device, dtype: torch.dtype) -> None:
    """Move Engram to the base model's device and dtype, except its table, which stays fp32
    (see the module docstring); ``Engram.retrieve`` casts looked-up rows to the hidden dtype."""
    engram.to(device=device)
    table = {id(p) for p in engram.table.parameters()}
    for p in engram.parameters():
        if id(p) not in table and p.is_floating_point():
            p.data = p.data.to(dtype)  # in place, as nn.Module.to does


def _generate_with_engram_cache(model: nn.Module) -> None:
    """Make ``model.generate`` build an EngramCache where it would build a DynamicCache, and mark
    the model stateful (its Engram state cannot rewind: no assisted decoding)."""
    default = model._prepare_cache_for_generation

    def prepare(generation_config: Any, model_kwargs: dict, *args: Any, **kwargs: Any) -> Any:
        dynamic = generation_config.cache_implementation in (None, "dynamic")
        if model_kwargs.get("cache") is None and generation_config.use_cache and dynamic:
            model_kwargs["cache"] = _engram_cache(model.config)
            return None
        return default(generation_config, model_kwargs, *args, **kwargs)

    model._prepare_cache_for_generation = prepare
    model._is_stateful = True


def _context(model: nn.Module) -> EngramRetrofit:
    context = getattr(model, "engram_retrofit", None)
    if not isinstance(context, EngramRetrofit):
        raise ValueError(f"{type(model).__name__} is not Engram-retrofitted; call retrofit() first")
    return context


def engram_modules(model: nn.Module) -> dict[int, Engram]:
    """``{layer_id: Engram}`` of a retrofitted model."""
    _context(model)
    return {
        layer.layer_id: layer.engram
        for layer in decoder_layers(model)
        if isinstance(layer, EngramDecoderLayer)
    }


def engram_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every Engram parameter of a retrofitted model (tables included)."""
    return [p for engram in engram_modules(model).values() for p in engram.parameters()]


# ---------------------------------------------------------------------------------------------
# Training


def encode_documents(docs: Sequence[Document], tokenizer: Any) -> np.ndarray:
    """Documents -> one flat token stream [num_tokens] (uint32), each followed by EOS if the
    tokenizer has one. Encodes with the model's own tokenizer (its ``backend_tokenizer``)."""
    backend = _backend(tokenizer)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    tail = [] if eos_id is None else [int(eos_id)]
    chunks = []
    for start in range(0, len(docs), 256):
        texts = [d.text for d in docs[start : start + 256]]
        for enc in backend.encode_batch(texts, add_special_tokens=False):
            chunks.append(np.asarray(enc.ids + tail, dtype=np.uint32))
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint32)


@torch.no_grad()
def evaluate_lm(model: nn.Module, batches: Iterable[Any], device: torch.device) -> float:
    """Token-weighted mean next-token cross-entropy (nats) of a HF causal LM."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        logits = model(input_ids=batch.input_ids.to(device), use_cache=False).logits  # [B, T, V]
        targets = batch.targets.to(device)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
        total += float(loss)
        count += targets.numel()
    model.train(was_training)
    return total / count


def _optimizers(
    model: nn.Module, lr: float, weight_decay: float, table_lr_mult: float
) -> dict[str, torch.optim.Optimizer]:
    """AdamW for dense trainables (decay on matrices), SparseAdam at ``table_lr_mult`` x lr
    for the Engram tables (SPEC §3), as in ``engramlm.train.build_optimizers``."""
    tables = []
    for engram in engram_modules(model).values():
        if isinstance(engram.table, DeviceTable) and engram.table.weight.requires_grad:
            engram.table.sparse_grad = True
            tables.append(engram.table.weight)
    table_ids = {id(p) for p in tables}
    dense = [p for p in model.parameters() if p.requires_grad and id(p) not in table_ids]
    decay = [p for p in dense if p.dim() >= 2]
    no_decay = [p for p in dense if p.dim() < 2]
    optimizers: dict[str, torch.optim.Optimizer] = {
        "dense": torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=lr,
            betas=(0.9, 0.95),
        )
    }
    if tables:
        optimizers["tables"] = torch.optim.SparseAdam(
            tables, lr=lr * table_lr_mult, betas=(0.9, 0.95)
        )
    return optimizers


RETROFIT_TRAIN = TrainConfig(steps=200, lr=1e-3, warmup_steps=20, log_every=50)
"""Defaults of :func:`train_retrofit`: fewer, gentler steps than from-scratch training."""


def train_retrofit(
    model: nn.Module,
    tokenizer: Any,
    config: TrainConfig = RETROFIT_TRAIN,
    *,
    documents: Sequence[Document] | None = None,
    split_seed: int = 0,
) -> dict[str, Any]:
    """Train a retrofitted model's trainable parameters (Engram only, by default) on real text.

    ``config`` is the :class:`~engramlm.train.TrainConfig` of from-scratch training (one
    place for defaults and validation); retrofitting uses its data, batch shape, steps, learning
    rate schedule, weight decay, table LR multiplier, clipping, evaluation size, ``seed`` (the
    training windows) and ``log_every``. Fields it cannot honour (gradient accumulation,
    bfloat16, table tiers, checkpoints) must keep their defaults: they are refused, not ignored.
    ``config.data`` (a named corpus or path) or ``documents`` is split by document
    (``split_documents(val_fraction, split_seed)``: with the defaults, the split
    ``prepare_corpus`` makes) and encoded with ``tokenizer``, which must be the retrofitted one.
    Validation loss is measured on ``eval_batches`` fixed windows before and after.
    Returns ``{"val_loss_before", "val_loss_after", "train_loss", "steps", "tokens",
    "seconds", "trainable_params"}``.
    """
    unsupported = {
        name: getattr(config, name)
        for name in ("grad_accum", "dtype", "table_storage", "ckpt_every")
        if getattr(config, name) != getattr(RETROFIT_TRAIN, name)
    }
    if unsupported:
        raise ValueError(
            f"train_retrofit does not support {unsupported}; keep these TrainConfig fields at "
            "their defaults (use engramlm.train for accumulation, bfloat16, tiers, checkpoints)"
        )
    cfg = config
    context = _context(model)
    context.check_tokenizer(tokenizer)
    docs = load_documents(cfg.data) if documents is None else list(documents)
    train_docs, val_docs = split_documents(docs, cfg.val_fraction, split_seed)
    train_tokens = encode_documents(train_docs, tokenizer)
    val_tokens = encode_documents(val_docs, tokenizer)
    device = next(model.parameters()).device
    batches = TrainBatches(train_tokens, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
    val = ValBatches(val_tokens, cfg.batch_size, cfg.seq_len, max_batches=cfg.eval_batches)

    optimizers = _optimizers(model, cfg.lr, cfg.weight_decay, cfg.table_lr_mult)
    trainable = [p for opt in optimizers.values() for g in opt.param_groups for p in g["params"]]
    dense = [p for g in optimizers["dense"].param_groups for p in g["params"]]
    val_before = evaluate_lm(model, val, device)
    logger.info("retrofit: validation loss before %.4f", val_before)
    model.train()
    start, losses = time.perf_counter(), []
    for step in range(cfg.steps):
        step_lr = lr_at(step, cfg)
        for name, opt in optimizers.items():
            for group in opt.param_groups:
                group["lr"] = step_lr * (cfg.table_lr_mult if name == "tables" else 1.0)
        batch = next(batches)
        logits = model(input_ids=batch.input_ids.to(device), use_cache=False).logits  # [B,T,V]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.to(device).flatten())
        loss.backward()
        if cfg.grad_clip:  # dense only: clip_grad_norm_ does not take the tables' sparse grads
            torch.nn.utils.clip_grad_norm_(dense, cfg.grad_clip)
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            logger.info("retrofit step %d/%d: train loss %.4f", step + 1, cfg.steps, losses[-1])
    seconds = time.perf_counter() - start
    val_after = evaluate_lm(model, val, device)
    logger.info("retrofit: validation loss after %d steps %.4f", cfg.steps, val_after)
    return {
        "val_loss_before": val_before,
        "val_loss_after": val_after,
        "train_loss": losses,
        "steps": cfg.steps,
        "tokens": cfg.steps * cfg.batch_size * cfg.seq_len,
        "seconds": seconds,
        "trainable_params": sum(p.numel() for p in trainable),
    }


# ---------------------------------------------------------------------------------------------
# Save / load


def save_retrofit(model: nn.Module, path: str | Path) -> Path:
    """Write the Engram parameters (safetensors), the Engram config, P: V -> V' and the layer
    placement to folder ``path``; the base model is not saved (it is unchanged)."""
    from safetensors.torch import save_file

    context = _context(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{layer_id}.{name}": t.detach().contiguous().cpu()
        for layer_id, engram in engram_modules(model).items()
        for name, t in engram.state_dict().items()
    }
    save_file(tensors, str(path / _WEIGHTS_FILE))
    meta = {
        "format": RETROFIT_FORMAT,
        "engram": context.config.to_dict(),
        "model_type": getattr(model.config, "model_type", None),
        "hidden_size": int(model.config.hidden_size),
        "num_layers": context.num_layers,
        "vocab_size": context.compressed_vocab.vocab_size,
    }
    (path / _CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    context.compressed_vocab.save(path / _VOCAB_FILE)
    return path


def load_retrofit(
    base_model: nn.Module, tokenizer: Any, path: str | Path, *, freeze_base: bool = True
) -> nn.Module:
    """Re-apply a saved retrofit to ``base_model`` (in place) and load its Engram weights.

    Refuses a tokenizer other than the one it was trained with (:class:`TokenizerMismatchError`)
    and a base model of another shape (``ValueError`` naming both values).
    """
    from safetensors.torch import load_file

    path = Path(path)
    meta = json.loads((path / _CONFIG_FILE).read_text())
    if meta.get("format") != RETROFIT_FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {RETROFIT_FORMAT}")
    CompressedVocab.load(path / _VOCAB_FILE).check_tokenizer(tokenizer)
    found = {
        "model_type": getattr(base_model.config, "model_type", None),
        "hidden_size": int(base_model.config.hidden_size),
        "num_layers": len(decoder_layers(base_model)),
        "vocab_size": int(base_model.get_input_embeddings().num_embeddings),
    }
    for key, value in found.items():
        if meta[key] != value:
            raise ValueError(
                f"{path} was saved for a model with {key}={meta[key]!r}, but the base model has "
                f"{key}={value!r}"
            )
    model = retrofit(
        base_model, tokenizer, EngramConfig.from_dict(meta["engram"]), freeze_base=freeze_base
    )
    tensors = load_file(str(path / _WEIGHTS_FILE))
    for layer_id, engram in engram_modules(model).items():
        prefix = f"{layer_id}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        engram.load_state_dict(state, strict=True)
    return model


# ---------------------------------------------------------------------------------------------
# The `engramlm retrofit` command


def retrofit_pretrained(
    model_dir: str | Path,
    out: str | Path,
    *,
    engram_overrides: dict[str, Any] | None = None,
    config: TrainConfig = RETROFIT_TRAIN,
) -> dict[str, Any]:
    """Load a local HF model folder, retrofit Engram, train only Engram, save it to ``out``.

    The Engram config is the ``tiny`` preset (``pad_id`` resolved by :func:`retrofit`: the
    tokenizer's pad, else EOS) with ``engram_overrides`` applied; ``config`` goes to
    :func:`train_retrofit`.
    Writes ``out/`` (:func:`save_retrofit`) and ``out/report.json``; returns the report.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} is not a Hugging Face model folder (no config.json): pass a local "
            "folder written by save_pretrained (nothing is downloaded)"
        )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    defaults = {**EngramConfig.preset("tiny").to_dict(), "pad_id": None}  # retrofit resolves
    engram = EngramConfig.from_dict({**defaults, **(engram_overrides or {})})
    retrofit(model, tokenizer, engram)
    report = train_retrofit(model, tokenizer, config)
    save_retrofit(model, out)
    summary = {k: v for k, v in report.items() if k != "train_loss"}
    summary |= {"model_dir": str(model_dir), "engram": engram.to_dict(), "train": config.to_dict()}
    (Path(out) / "report.json").write_text(json.dumps(summary, indent=2, default=str))
    return report


__all__ = [
    "EngramDecoderLayer",
    "EngramRetrofit",
    "decoder_layers",
    "encode_documents",
    "engram_modules",
    "engram_parameters",
    "evaluate_lm",
    "load_retrofit",
    "retrofit",
    "retrofit_pretrained",
    "save_retrofit",
    "train_retrofit",
]
