"""Autoregressive generation with the KV cache and Engram's decode state.

Each step feeds only the new token: attention reads its cached keys and values, and every
Engram layer keeps the last ``max_ngram - 1`` compressed ids (its hash prefix) and its short
conv's receptive field, so a step costs O(1) in context length for Engram. The table rows of
the new token are prefetched inside ``EngramLM.forward`` before layer 0 runs (SPEC §5).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from engramlm.model import EngramLM


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """[B, V] logits with everything outside the top-k and the top-p nucleus set to -inf.

    The nucleus keeps the smallest set of most likely tokens whose probability reaches ``top_p``
    (always at least the most likely one).
    """
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
        drop_sorted = before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def generate_tokens(
    model: EngramLM,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    stop: Callable[[Tensor], bool] | None = None,
) -> Iterator[Tensor]:
    """Yield [B] new token ids one step at a time; ``temperature == 0`` is greedy.

    ``prompt`` is [B, T0] raw ids (T0 >= 1). Stops after ``max_new_tokens`` or when ``stop``
    returns True for the tokens just produced. Raises a ``ValueError`` when prompt plus new
    tokens would exceed the model's ``max_seq_len``.
    """
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be [B, T] with T >= 1, got shape {list(prompt.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    limit = model.config.max_seq_len
    if prompt.shape[1] + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({prompt.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's max_seq_len={limit}; shorten the prompt or ask for fewer tokens"
        )
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache()
        logits = model(prompt, cache=cache).logits[:, -1]  # [B, V]
        for _ in range(max_new_tokens):
            if temperature == 0:
                token = logits.argmax(dim=-1)  # [B]
            else:
                probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
                token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [B]
            yield token
            if stop is not None and stop(token):
                return
            logits = model(token[:, None], cache=cache).logits[:, -1]
    finally:
        model.train(was_training)


def generate_text(
    run_dir: str,
    prompt: str,
    *,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = 0.95,
    seed: int = 0,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """Continue ``prompt`` with the model of a training run; streams pieces to ``on_text``."""
    from engramlm.data import EOS_TOKEN, special_token_id
    from engramlm.train import load_run

    model, tokenizer = load_run(run_dir)
    ids = tokenizer.encode(prompt).ids
    if not ids:
        raise ValueError("the prompt encodes to no tokens; give some text")
    eos = special_token_id(tokenizer, EOS_TOKEN)
    max_new_tokens = min(max_new_tokens, model.config.max_seq_len - len(ids))
    if max_new_tokens < 1:
        raise ValueError(
            f"the prompt is {len(ids)} tokens, the model's context is "
            f"{model.config.max_seq_len}: no room to generate"
        )
    generator = torch.Generator().manual_seed(seed)
    out: list[int] = []
    shown = ""
    for token in generate_tokens(
        model,
        torch.tensor([ids]),
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=generator,
        stop=lambda t: int(t[0]) == eos,
    ):
        if int(token[0]) == eos:
            break
        out.append(int(token[0]))
        text = tokenizer.decode(out)
        # Byte-level BPE may end mid-character: hold back until the piece decodes cleanly.
        if on_text is not None and not text.endswith("\ufffd"):
            on_text(text[len(shown) :])
            shown = text
    text = tokenizer.decode(out)
    if on_text is not None and len(text) > len(shown):
        on_text(text[len(shown) :])
    return text
