"""Causal self-attention (MHA / GQA / MQA by `n_kv_heads`) through scaled_dot_product_attention,
optionally restricted to a sliding window or to the documents of a packed row (FlexAttention on CUDA)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from smolhub.layers.masks import DocumentMask
from smolhub.layers.positions import apply_rotary, per_row, rotary_qkv, token_positions


def write_rows(buffer: torch.Tensor, dim: int, positions: torch.Tensor, values: torch.Tensor) -> None:
    """buffer[b, .., positions[b, t], ..] = values[b, .., t, ..] along `dim`: every row of a batch
    written at its own positions (B, T), by one scatter (no per-row loop, nothing read back to the host)."""
    if positions.size(0) != values.size(0):
        raise ValueError(f"start_pos holds {positions.size(0)} positions for a batch of {values.size(0)} rows")
    shape = [1] * values.dim()
    shape[0], shape[dim] = positions.shape
    buffer.scatter_(dim, positions.view(shape).expand_as(values), values.to(buffer.dtype))


class KVCache:
    """Preallocated keys and values of one layer, (batch, n_kv_heads, max_len, head_dim).

    Preallocation keeps decoding free of reallocations (and its shapes static). The tensors in
    vars(cache), batch first, are the whole state: row r of one cache can be filled from a row of
    another with the same max_len by copying each (a request prefilled alone joins a running batch)."""

    static_positions = True  # takes start_pos as a device tensor: CUDA-graph decoding can use it

    def __init__(self, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def max_len(self) -> int:
        return self.k.size(2)

    def update(self, k: torch.Tensor, v: torch.Tensor, start_pos: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v for positions [start_pos, start_pos + T) and return all keys/values so far.

        With start_pos a device tensor (compiled CUDA-graph decoding, where shapes must not change)
        the whole buffer is returned and `attend` masks the positions not yet written. A (B,) start_pos
        writes each row at its own positions; what a row holds beyond them is masked too."""
        if per_row(start_pos):
            positions = token_positions(start_pos, k.size(2), k.device)
            write_rows(self.k, 2, positions, k)
            write_rows(self.v, 2, positions, v)
            return self.k, self.v
        if isinstance(start_pos, torch.Tensor):
            positions = start_pos + torch.arange(k.size(2), device=k.device)
            # in the cache's dtype, as the slice assignment below stores (autocast makes k/v bf16)
            self.k.index_copy_(2, positions, k.to(self.k.dtype))
            self.v.index_copy_(2, positions, v.to(self.v.dtype))
            return self.k, self.v
        end = start_pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class SlidingWindowKVCache(KVCache):
    """Keys/values of one layer's last `window` positions, in a ring buffer (slot = position % window).

    A windowed layer never looks further back, so memory stays (batch, n_kv_heads, window, head_dim)
    however long the generation. Positions are written in order from 0, as generation does, so slot
    s holds the newest position congruent to s: `key_positions` derives every key's position from
    start_pos alone, with no position state to mutate (which keeps decode steps CUDA-graph friendly).
    Keys are cached after RoPE, at their absolute positions, so their order in the buffer does not matter.
    With a (B,) start_pos each row is a ring of its own, at its own position.
    """

    @property
    def window(self) -> int:
        return self.k.size(2)

    def update(self, k: torch.Tensor, v: torch.Tensor,
               start_pos: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v of positions [start_pos, start_pos + T); return the keys/values those queries may need.

        One token at a time (decoding) keeps every shape static, start_pos a device tensor included."""
        T = k.size(2)
        if per_row(start_pos):
            if T == 1:  # the overwritten slot held start_pos - window, out of the query's reach
                keys, values = self.k, self.v
            else:  # as for a chunk below: the old ring and the chunk together
                keys, values = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
            keep = min(T, self.window)
            slots = token_positions(start_pos, T, k.device)[:, T - keep:] % self.window
            write_rows(self.k, 2, slots, k[:, :, T - keep:])
            write_rows(self.v, 2, slots, v[:, :, T - keep:])
            return keys, values
        if T == 1:  # the overwritten slot held start_pos - window, outside the query's window
            slot = torch.as_tensor(start_pos, device=self.k.device).view(1) % self.window
            self.k.index_copy_(2, slot, k.to(self.k.dtype))
            self.v.index_copy_(2, slot, v.to(self.v.dtype))
            return self.k, self.v
        # a chunk: its first queries may still need keys that its last positions evict, so attend to
        # the old buffer and the chunk together, then keep the newest `window` positions
        keys, values = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        keep = min(T, self.window)
        slots = torch.arange(start_pos + T - keep, start_pos + T, device=self.k.device) % self.window
        self.k[:, :, slots], self.v[:, :, slots] = k[:, :, -keep:], v[:, :, -keep:]
        return keys, values

    def key_positions(self, start_pos: int | torch.Tensor, q_len: int) -> torch.Tensor:
        """Absolute position of each key `update` returned for these queries, (S,) or per row (B, S)
        for a (B,) start_pos; negative = an empty slot."""
        slots = torch.arange(self.window, device=self.k.device)
        pos = start_pos[:, None] if per_row(start_pos) else start_pos
        if q_len == 1:  # the ring right after writing start_pos
            return pos - (pos - slots) % self.window
        last = pos - 1  # the ring before the chunk, then the chunk
        chunk = token_positions(start_pos, q_len, slots.device)
        return torch.cat([last - (last - slots) % self.window, chunk], dim=-1)


def causal_mask(q_len: int, k_len: int, start_pos: int | torch.Tensor, device) -> torch.Tensor:
    """Boolean (q_len, k_len) mask, True where query at start_pos + i may see key j (j <= start_pos + i).

    A (B,) start_pos gives every row its own mask, (B, 1, q_len, k_len): one per row, broadcast over heads."""
    q_pos = token_positions(start_pos, q_len, device)[..., None]
    visible = torch.arange(k_len, device=device) <= q_pos
    return visible[:, None] if per_row(start_pos) else visible


def window_mask(q_len: int, start_pos: int | torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean (q_len, S) mask for keys at positions key_pos (S,): query at position p sees key at
    position s iff 0 <= s <= p and p - s < window (the window counts the query itself).

    A (B,) start_pos gives every row its own mask, (B, 1, q_len, S), with key_pos (S,) or per row (B, S)."""
    q_pos = token_positions(start_pos, q_len, key_pos.device)[..., None]
    key_pos = key_pos.unsqueeze(-2)
    visible = (key_pos >= 0) & (key_pos <= q_pos)
    if window is not None:
        visible = visible & (q_pos - key_pos < window)
    return visible[:, None] if per_row(start_pos) else visible


_block_masks: dict = {}
_compiled_flex = None


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, scale: float | None) -> torch.Tensor:
    """FlexAttention with a block-sparse mask: blocks the mask rules out entirely are skipped."""
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled_flex

    gqa = q.size(1) != k.size(1)
    if torch.compiler.is_compiling():  # traced into the model's graph, and fused there
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    if _compiled_flex is None:  # eager flex_attention is an unfused reference; compiled it is one kernel
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)


def _sliding_window_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                         scale: float | None) -> torch.Tensor:
    """FlexAttention over a fresh sequence with a sliding-window mask: the cost grows with T * window
    instead of T^2."""
    from torch.nn.attention.flex_attention import create_block_mask

    def sliding_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    T = q.size(2)
    if torch.compiler.is_compiling():  # built in the model's graph
        return _flex(q, k, v, create_block_mask(sliding_causal, None, None, T, T, device=q.device), scale)
    key = (T, window, q.device)
    if key not in _block_masks:
        _block_masks[key] = create_block_mask(sliding_causal, None, None, T, T, device=q.device)
    return _flex(q, k, v, _block_masks[key], scale)


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                        scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v for a single query per row over a masked cache (a decode step).

    SDPA's fused kernels are built for many queries: with one query and a mask, the memory-efficient
    kernel walks the keys serially (a quarter slower decoding), and cuDNN costs ~2 s of set-up and
    planning at its first use in a process. Here it is two small batched matmuls and a softmax.
    The query heads that share a key/value head (GQA/MQA) are stacked as rows of one matmul, so the
    cache is never repeated per head. `visible` broadcasts against the scores (B, n_kv, H/n_kv, S):
    (1, S) for every row alike, (B, 1, 1, S) for one mask per row."""
    B, H, _, D = q.shape
    n_kv = k.size(1)
    q = q.reshape(B, n_kv, H // n_kv, D) * (scale if scale is not None else D ** -0.5)
    scores = q @ k.transpose(-1, -2)  # (B, n_kv, H/n_kv, S)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)).masked_fill(~visible, float("-inf"))
    return (scores.softmax(dim=-1).to(v.dtype) @ v).reshape(B, H, 1, v.size(-1))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int | torch.Tensor, dropout_p: float = 0.0,
           scale: float | None = None, window: int | None = None,
           key_pos: torch.Tensor | None = None, documents: DocumentMask | None = None) -> torch.Tensor:
    """Causal SDPA for queries at positions start_pos.. over keys at positions 0.. (or `key_pos`).

    The cases keep the fast kernels where possible: a fresh sequence uses is_causal, one new token
    sees every cached key (no mask), one new token over a masked cache (a CUDA-graph decode step or
    a sliding window) takes `one_query_attention`, and only a chunk appended to a cache needs a
    masked SDPA. With a sliding `window`, a query sees only the last `window` positions up to
    itself: FlexAttention trains it on CUDA, a boolean mask on CPU (FlexAttention has no CPU
    backward) and in decoding. With `documents` (a packed row, no cache) a query sees only its own
    document, within the window the mask was built with: its BlockMask or its boolean mask.
    A (B,) start_pos (rows at different positions, over the whole cache buffer) masks each row alone.
    """
    q_len, k_len = q.size(2), k.size(2)
    gqa = q.size(1) != k.size(1)
    if documents is not None:
        if window != documents.window:
            raise ValueError(f"the document mask folds in window {documents.window}, this layer has {window}")
        if documents.block_mask is not None and dropout_p == 0.0:
            return _flex(q, k, v, documents.block_mask, scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=documents.visible(), dropout_p=dropout_p,
                                              scale=scale, enable_gqa=gqa)
    if window is not None and key_pos is None and k_len <= window:
        window = None  # no key is ever out of reach: plain causal attention and its fastest kernels
    if window is not None or key_pos is not None:
        # FlexAttention sends fewer than 128 queries to its decoding kernel, which does not compile
        # for this mask on torch 2.11 (NoValidChoicesError); short sequences take the SDPA mask
        if q.is_cuda and key_pos is None and q_len == k_len >= 128 and dropout_p == 0.0:
            return _sliding_window_flex(q, k, v, window, scale)
        if key_pos is None:
            key_pos = torch.arange(k_len, device=q.device)
        mask = window_mask(q_len, start_pos, key_pos, window)
    elif isinstance(start_pos, torch.Tensor):  # a static-shape decode step over the whole cache buffer
        mask = causal_mask(q_len, k_len, start_pos, q.device)
    elif q_len == k_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, scale=scale,
                                              enable_gqa=gqa)
    else:
        mask = None if q_len == 1 else causal_mask(q_len, k_len, start_pos, q.device)
    if q_len == 1 and mask is not None and dropout_p == 0.0:
        return one_query_attention(q, k, v, mask, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                          enable_gqa=gqa)


class CausalSelfAttention(nn.Module):
    """Multi-head attention with n_kv_heads key/value heads shared by groups of query heads.

    n_kv_heads == n_head is MHA, 1 is MQA, anything dividing n_head in between is GQA. q, k and v
    come from one fused projection; RoPE is applied when the caller passes (cos, sin), per position
    (T, D) or per token (B, T, D). A `window` limits each query to the last `window` positions, itself
    included (Mistral's sliding window); a DocumentMask, built with that window, keeps the documents
    of a packed row apart.
    """

    def __init__(self, dim: int, n_head: int, n_kv_heads: int | None = None, dropout: float = 0.0,
                 window: int | None = None):
        super().__init__()
        n_kv_heads = n_kv_heads or n_head
        if n_head % n_kv_heads:
            raise ValueError(f"n_head ({n_head}) must be divisible by n_kv_heads ({n_kv_heads})")
        if window is not None and window <= 0:
            raise ValueError(f"the attention window must be positive, got {window}")
        self.window = window
        self.n_head, self.n_kv_heads, self.head_dim = n_head, n_kv_heads, dim // n_head
        self.qkv = nn.Linear(dim, (n_head + 2 * n_kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(n_head * self.head_dim, dim, bias=False)
        self.out.residual_init = True
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                kv_cache: KVCache | SlidingWindowKVCache | None = None, start_pos: int | torch.Tensor = 0,
                documents: DocumentMask | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv(x)
        if rope is not None and kv_cache is None:
            # training and cache-free calls: split + RoPE as one op, one pass each way (a Triton
            # kernel on CUDA); its backward is the point, inductor's took 3 ms of StoryLlama's step
            q, k, v = rotary_qkv(qkv, *rope, self.n_head, self.n_kv_heads)
        else:  # decoding: the rotation of a few tokens is left to fuse with the step's other kernels
            q, k, v = qkv.split([self.n_head * self.head_dim, self.n_kv_heads * self.head_dim,
                                 self.n_kv_heads * self.head_dim], dim=-1)
            q = q.view(B, T, self.n_head, self.head_dim)
            k = k.view(B, T, self.n_kv_heads, self.head_dim)
            v = v.view(B, T, self.n_kv_heads, self.head_dim)
            if rope is not None:  # rotated in the projection's (B, T, H, D) layout: no transposed reads
                cos, sin = (t.unsqueeze(-2) for t in rope)  # (T, 1, D), or (B, T, 1, D) per row
                q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v, start_pos)
        key_pos = kv_cache.key_positions(start_pos, T) if isinstance(kv_cache, SlidingWindowKVCache) else None
        y = attend(q, k, v, start_pos, dropout_p=self.dropout if self.training else 0.0, window=self.window,
                   key_pos=key_pos, documents=documents)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.out(y))
