"""Document masks for packed sequences: several examples share one row, and none sees another.

A packed row carries `document_ids` (B, T): a document is a run of equal consecutive ids, so ids may
restart per row or repeat in non-adjacent runs. A token attends to the earlier tokens of its own
document (and itself), within a sliding window if the model has one, and its position counts from 0
at its document's first token. The model builds one `DocumentMask` per forward and hands it to every
layer: a FlexAttention BlockMask on CUDA (blocks between documents are skipped, so a row of short
examples costs less than a causal row), a boolean mask for scaled_dot_product_attention elsewhere
(FlexAttention has no backward on CPU).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# FlexAttention sends fewer than 128 queries to its decoding kernel, which does not compile for
# these masks on torch 2.11 (NoValidChoicesError): shorter rows take the boolean mask
FLEX_MIN_LEN = 128


def document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: True at each document's first token."""
    first = torch.ones_like(document_ids[..., :1], dtype=torch.bool)
    return torch.cat([first, document_ids[..., 1:] != document_ids[..., :-1]], dim=-1)


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) int64 position of each token within its document: 0 at every document's first token."""
    return _positions(document_starts(document_ids))


def _positions(starts: torch.Tensor) -> torch.Tensor:
    index = torch.arange(starts.size(-1), device=starts.device).expand(starts.shape)
    return index - torch.where(starts, index, 0).cummax(dim=-1).values


def visible_mask(segments: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """(B, 1, T, T) bool, True where query i may see key j: same document, j <= i, i - j < window."""
    T = segments.size(-1)
    q_idx = torch.arange(T, device=segments.device)[:, None]
    k_idx = torch.arange(T, device=segments.device)[None, :]
    visible = (segments[:, :, None] == segments[:, None, :]) & (k_idx <= q_idx)
    if window is not None:
        visible = visible & (q_idx - k_idx < window)
    return visible[:, None]


def _block_mask(segments: torch.Tensor, window: int | None) -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    def same_document(b, h, q_idx, kv_idx):
        visible = (segments[b, q_idx] == segments[b, kv_idx]) & (kv_idx <= q_idx)
        return visible if window is None else visible & (q_idx - kv_idx < window)

    B, T = segments.shape
    # traced into a compiled model it is built in the graph; eager, _compile keeps it from
    # materialising the (B, T, T) mask to find the blocks
    return create_block_mask(same_document, B, None, T, T, device=segments.device,
                             _compile=not torch.compiler.is_compiling())


@dataclass
class DocumentMask:
    """What every attention layer of one forward needs to keep the documents of a packed row apart.

    positions: (B, T) per-token positions (for RoPE or a position table).
    segments: (B, T) document number of each token within its row (0, 1, ...).
    window: the sliding window folded into the mask, or None.
    block_mask: FlexAttention's BlockMask (CUDA), else None and `dense` holds the boolean mask."""
    positions: torch.Tensor
    segments: torch.Tensor
    window: int | None
    block_mask: Any = None
    dense: torch.Tensor | None = None

    def visible(self) -> torch.Tensor:
        """The (B, 1, T, T) boolean mask, built here when the layers use the BlockMask instead."""
        return self.dense if self.dense is not None else visible_mask(self.segments, self.window)


def document_mask(document_ids: torch.Tensor | None, kv_cache: Any = None, window: int | None = None,
                  allow_flex: bool = True) -> DocumentMask | None:
    """The mask of a forward over packed documents, or None without document_ids (plain causal).

    allow_flex=False forces the boolean mask (attention dropout, which FlexAttention lacks)."""
    if document_ids is None:
        return None
    if kv_cache is not None:
        raise ValueError("document_ids (packed training rows) cannot be combined with a KV cache (decoding)")
    if document_ids.dim() != 2:
        raise ValueError(f"document_ids must be (batch, seq_len), got shape {tuple(document_ids.shape)}")
    starts = document_starts(document_ids)
    segments = starts.cumsum(dim=-1) - 1
    positions = _positions(starts)
    if allow_flex and document_ids.is_cuda and document_ids.size(1) >= FLEX_MIN_LEN:
        return DocumentMask(positions, segments, window, block_mask=_block_mask(segments, window))
    return DocumentMask(positions, segments, window, dense=visible_mask(segments, window))
