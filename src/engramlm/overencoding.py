"""Over-Encoding (arXiv 2501.16975): hashed n-gram embeddings averaged into the input embedding.

The baseline of the paper's infinite-memory experiment (§3.2, SPEC §4): the same kind of hashed
n-gram table as Engram, but read once, at the input, with no gate, no conv and no residual
placement. Shapes: B batch, T time, D model width, N max n-gram order, K heads per order,
H = (N-1)K hash heads, E = (N-1) * embed_dim_per_ngram (the concatenated heads).

Per position t, with the token embedding E_tok[x_t] [D]:

    z_{t,h}  = hash of the suffix n-gram of head h     (Engram's NgramHasher, SPEC §2.3)
    e_t      = concat_h T[offset_h + z_{t,h}]          [E]   (Engram's table layout, SPEC §2.4)
    h0_t     = ( E_tok[x_t] + sum_h P_h e_{t,h} ) / (1 + H)                            [D]

Each head's row (width E/H) is projected to D by its own P_h and the 1 + H vectors are averaged:
SPEC §4's "n-gram embeddings averaged into the input embedding", in the form of the public
Over-Encoding inference code (sglang's ``NgramEmbedding`` for LongCat-Flash: K slices per
order, each projected to D, mean over the token embedding and the slices). The H projections
side by side are one matrix W = [P_1 ... P_H] [D, E], so ``sum_h P_h e_{t,h}`` is one
bias-free ``Linear(E -> D)`` of the concatenated rows. The mean also scales the token
embedding by 1/(1 + H) (1/17 in the experiments' shape); nothing compensates for it.

Deviations from arXiv 2501.16975, so that the comparison with Engram isolates how the rows are
*used*: the n-gram index is Engram's multiplicative-XOR hash with a distinct prime per head
(the Over-Tokenized paper takes the n-gram's base-V number modulo a per-slice table size);
tables are Engram's (any :class:`~engramlm.tables.Table` backend) and train like Engram's
(Adam, LR x5, no weight decay, sparse rows; ``EngramLM.engram_tables()`` lists this table).
Hashing uses *raw* token ids (Over-Encoding has no tokenizer compression) with the raw
``pad_id`` before the sequence start, and the hasher's layer id is 0 (``layer_ids=(0,)``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from engramlm.config import EngramConfig
from engramlm.engram import head_offsets, head_table
from engramlm.hashing import NgramHasher, head_moduli
from engramlm.tables import Table

INIT_STD = 0.02  # the projection starts like the backbone's linear maps


def overencoding_moduli(config: EngramConfig) -> tuple[int, ...]:
    """The H distinct prime table sizes of Over-Encoding's heads (order 2's heads first)."""
    return head_moduli(
        layer_ids=(0,),
        table_sizes=config.table_sizes,
        heads_per_ngram=config.heads_per_ngram,
        max_ngram=config.max_ngram,
    )[0]


class OverEncoding(nn.Module):
    """The input embedding with hashed n-gram rows averaged in; see the module docstring.

    ``table`` holds all H heads contiguously (head h from row ``offsets[h]``); by default an
    in-memory :class:`DeviceTable`. ``forward`` takes the token embedding and the raw ids and
    returns the averaged embedding and the hashing prefix for the next decoding step.
    """

    def __init__(
        self,
        config: EngramConfig,
        hidden_size: int,
        vocab_size: int,
        table: Table | None = None,
    ) -> None:
        super().__init__()
        if config.layer_ids != (0,):
            raise ValueError(f"Over-Encoding needs layer_ids=(0,), got {config.layer_ids}")
        self.config, self.hidden_size, self.vocab_size = config, hidden_size, vocab_size
        moduli = overencoding_moduli(config)
        self.hasher = self._make_hasher()
        self.register_buffer("offsets", head_offsets(moduli), persistent=False)
        self.table = head_table(moduli, config.head_dim, table, "Over-Encoding's heads")
        self.proj = nn.Linear(config.memory_dim, hidden_size, bias=False)  # [P_1 ... P_H]

    def _make_hasher(self) -> NgramHasher:
        with torch.device("cpu"):  # constants, also when the model is built on "meta"
            return NgramHasher.from_config(
                self.config, pad_id=self.config.pad_id, compressed_vocab_size=self.vocab_size
            )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Table rows N(0, 0.02^2) (the backend's init), projection N(0, 0.02); rebuilds the
        non-saved hash constants and row offsets (needed after ``to_empty``)."""
        reset = getattr(self.table, "reset_parameters", None)
        if callable(reset):
            reset()
        nn.init.normal_(self.proj.weight, std=INIT_STD)
        device = self.offsets.device
        self.hasher = self._make_hasher().to(device)
        self.offsets.copy_(head_offsets(self.hasher.moduli[0]))

    def hash_ids(self, input_ids: Tensor, prefix: Tensor | None = None) -> Tensor:
        """[B, T] raw ids (+ the [B, N-1] raw ids before them) -> [B, T, H] head-local rows."""
        return self.hasher(input_ids, 0, prefix)

    def forward(
        self, token_embed: Tensor, input_ids: Tensor, prefix: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """([B, T, D], [B, T] raw ids) -> (h0 [B, T, D], next hashing prefix [B, N-1])."""
        rows = self.hash_ids(input_ids, prefix) + self.offsets  # [B, T, H] global rows
        e = self.table.lookup(rows).flatten(-2).to(token_embed.dtype)  # [B, T, E]
        h0 = (token_embed + self.proj(e)) / (1 + self.config.num_heads)  # mean of 1 + H
        return h0, self.hasher.next_prefix(prefix, input_ids)
