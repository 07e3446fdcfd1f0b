"""The model's fast path (sections 3.2-3.3): encoders on real tokens only, decoder key/value work on its queries.

Two regroupings of stock PyTorch calls that compute the same function with
most of the work gone, each pinned by an equality test against the call it
replaces (tests/test_batching.py; whole models in tests/test_model.py) and
selected by ``ModelConfig.fast_path``:

- :func:`packed_encoder` is ``encoder(x, src_key_padding_mask=~mask)`` of an
  ``nn.TransformerEncoder`` run on the N real tokens of a padded (B, S) grid;
- :func:`folded_cross_attention` is ``attn(x, memory, memory,
  key_padding_mask=pad)[0]`` of an ``nn.MultiheadAttention`` with the key and
  value projections moved from the S memory tokens to the C class queries;
  its per-head products go through :func:`head_matmul`, an einsum without
  layout copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Inference batches go through the folded cross-attention in pieces of memes whose folded queries
# (C rows x h heads x D each) are at most this many floats, 4 MB, about a core's cache: 17 MAMI memes
# at the paper's sizes (10 rows) where a batch of 64 would make 16 MB.
CROSS_PIECE_NUMEL = 1 << 20


def folded_cross_attention(attn: nn.MultiheadAttention, x, memory, memory_pad):
    """``attn(x, memory, memory, key_padding_mask=memory_pad)[0]`` with the key/value projections moved to the queries.

    Head h scores q_h . (W_k,h m_s + b_k,h) and returns sum_s a_s (W_v,h m_s + b_v,h).
    Regrouped, the scores are (W_k,h^T q_h) . m_s (b_k,h adds the same number to
    every score of a query, which the softmax removes) and the output is
    W_v,h (sum_s a_s m_s) + (sum_s a_s) b_v,h. The projections then act on the C
    class queries instead of the S memory tokens (C = 6, S = 100-225 at the
    paper's sizes): the same function with most of the decoder's work gone.

    The folded queries are laid out query-major, (B, C, h, D), so that the
    per-head products (`head_matmul`) write straight into the rows the score
    and mixing products read: no permuted copies of these (B, C, h, D) arrays.
    Dropout on the weights draws its mask in the stock module's (B, h, C, S)
    order. Queries that are one (C, D) set expanded over the batch (stride 0,
    as the decoder's first layer gets them at inference) are projected and
    folded once, and scored against every meme's memory in one product.

    Args:
        attn: a batch-first ``nn.MultiheadAttention`` with one packed in-projection.
        x: (B, C, D) queries; memory: (B, S, D); memory_pad: (B, S) True = padding.
    Returns:
        (B, C, D), as the module's attention output (dropout on the weights included).
    """
    bsz, c, d = x.shape
    h = attn.num_heads
    dh = d // h
    w_q, w_k, w_v = attn.in_proj_weight.view(3, h, dh, d).unbind(0)  # each (h, dh, D)
    b_q = b_v = None
    if attn.in_proj_bias is not None:
        b_q, _, b_v = attn.in_proj_bias.view(3, d).unbind(0)  # each (D,)
    dropout = attn.dropout if attn.training else 0.0
    shared = bsz > 1 and x.stride(0) == 0
    q = F.linear(x[:1] if shared else x, w_q.reshape(d, d), b_q) * dh**-0.5  # (B or 1, C, D)
    folded = _fold(q, w_k) if shared else None
    piece = bsz
    if x.device.type == "cpu" and not torch.is_grad_enabled() and dropout == 0:
        # Inference: a few memes at a time, so that their folded queries stay in the cache from
        # product to product (the same numbers; dropout draws would come in another order).
        piece = max(1, CROSS_PIECE_NUMEL // (c * h * d))

    def attend(a: int, b: int):
        f = folded if shared else _fold(q[a:b], w_k)
        return _folded_attention(f, memory[a:b], memory_pad[a:b], w_v, b_v, h, dropout)

    if piece >= bsz:  # one piece: the whole tensors, no slices of them
        out = _folded_attention(folded if shared else _fold(q, w_k), memory, memory_pad, w_v, b_v, h, dropout)
    else:
        out = torch.cat([attend(a, a + piece) for a in range(0, bsz, piece)])
    return attn.out_proj(out)


def _fold(q, w_k):
    """(n, C, D) scaled queries -> (n, C*h, D) folded queries W_k,h^T q_h, query-major."""
    n, c, d = q.shape
    h, dh = w_k.shape[:2]
    return head_matmul(q.reshape(n * c, h, dh), w_k).view(n, c * h, d)


def _folded_attention(folded, memory, memory_pad, w_v, b_v, heads: int, dropout: float):
    """Scores, softmax, dropout and mixing of folded queries (B or 1, C*h, D) -> (B, C, D) before the out
    projection."""
    bsz, s, d = memory.shape
    c = folded.shape[1] // heads
    if folded.shape[0] == 1 and bsz > 1:
        # One set of folded queries for every meme: one product over all the memory tokens.
        scores = torch.matmul(memory, folded[0].t()).transpose(1, 2)  # (B, C*h, S)
    else:
        scores = torch.bmm(folded, memory.transpose(1, 2))  # (B, C*h, S)
    weights = scores.masked_fill(memory_pad.unsqueeze(1), float("-inf")).softmax(-1)
    if dropout > 0:
        keep = weights.new_empty(bsz, heads, c, s).bernoulli_(1 - dropout)  # F.dropout's draws
        weights = weights * keep.div_(1 - dropout).transpose(1, 2).reshape(weights.shape)
    mixed = torch.bmm(weights, memory).view(bsz * c, heads, d)  # (B*C, h, D): sum_s a_s m_s
    out = head_matmul(mixed, w_v.transpose(1, 2))  # (B*C, h, dh)
    if b_v is not None and dropout > 0:
        out = out + weights.sum(-1).view(bsz * c, heads, 1) * b_v.view(heads, d // heads)  # (sum_s a_s) b_v,h
    elif b_v is not None:
        out = out + b_v.view(heads, d // heads)  # without dropout a query's weights sum to 1
    return out.view(bsz, c, d)


class _HeadMatmul(torch.autograd.Function):
    """Y[:, i] = X[:, i] @ W[i]: one batched product over the heads, written in place into the strided output."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return _per_head(x, w)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _per_head(grad, w.transpose(1, 2))
        if ctx.needs_input_grad[1]:
            grad_w = torch.bmm(x.transpose(0, 1).transpose(1, 2), grad.transpose(0, 1))  # (h, a, b)
        return grad_x, grad_w


def _per_head(x, w):
    """(N, h, a) @ (h, a, b) per head -> (N, h, b); BLAS reads and writes the head slices in place (row stride h*a)."""
    out = x.new_empty(x.shape[0], w.shape[0], w.shape[2])
    torch.bmm(x.transpose(0, 1), w, out=out.transpose(0, 1))
    return out


def head_matmul(x, w):
    """(N, h, a) @ (h, a, b) per head -> (N, h, b): ``torch.einsum("nha,hab->nhb", x, w)`` without layout copies.

    One batched product over the heads reads each head's (N, a) slice in place
    and writes its (N, b) slice of the output in place (strided rows, as BLAS
    takes them), where an einsum moves the head axis to the front and back
    (two copies of the larger side). Differentiable in both arguments.
    """
    if x.device.type != "cpu" or x.dtype != w.dtype or torch.compiler.is_compiling():
        # GPUs run the einsum's batched product well; under autocast the two sides' dtypes differ and
        # the einsum casts as the autocast does; torch.compile (train.compiled_step) cannot trace a
        # product written into a strided `out=` and lays out the einsum itself.
        return torch.einsum("nha,hab->nhb", x, w).contiguous()
    return _HeadMatmul.apply(x, w)


def dropped(dropout: nn.Dropout, x):
    """``dropout(x)``, with no call where it would return `x` (eval mode, or p = 0): in eval mode an
    ``nn.Dropout`` still dispatches an operator that returns its input, one launch's overhead on a GPU."""
    return dropout(x) if dropout.training and dropout.p > 0 else x


def packed_encoder(encoder: nn.TransformerEncoder, x, mask, full: bool | None = None):
    """``encoder(x, src_key_padding_mask=~mask)`` on the real tokens only; padded positions come back as zeros.

    The per-token work (in/out projections, feed-forward, LayerNorms: nearly
    all of it) runs on the N real tokens gathered into (N, D); only the
    attention sees the (B, S) grid, through PyTorch's fused
    ``scaled_dot_product_attention``. Layer for layer the same function as
    ``nn.TransformerEncoderLayer`` (post- or pre-norm, its dropouts included).

    Args:
        encoder: a batch-first ``nn.TransformerEncoder``.
        x: (B, S, D) tokens; mask: (B, S) bool, True = real token.
        full: whether every token is real, where the caller knows it (CLIP's five); None reads it from
            `mask`, a host synchronisation on a GPU; False takes the gathered path, right either way.
    Returns:
        (B, S, D), real tokens encoded, padding zero.
    """
    bsz, seq, d = x.shape
    if bool(mask.all()) if full is None else full:
        index, attn_mask, flat = None, None, x.reshape(bsz * seq, d)
    else:
        index = mask.reshape(-1).nonzero().squeeze(1)  # (N,) positions of the real tokens in the grid
        attn_mask = mask[:, None, None, :]  # (B, 1, 1, S) True = may be attended
        flat = x.reshape(bsz * seq, d).index_select(0, index)  # (N, D)
    # Without autograd the layers add their residuals in place and share one zeroed (B*S, 3D) grid
    # for their q/k/v: each overwrites the real rows, and the padding rows stay zero.
    in_place = not torch.is_grad_enabled()
    grid = x.new_zeros(bsz * seq, 3 * d) if in_place and index is not None else None
    for layer in encoder.layers:
        if layer.norm_first:
            block = _packed_self_attention(layer, layer.norm1(flat), index, bsz, seq, attn_mask, grid)
            flat = residual(block, flat, in_place)
            flat = residual(_feed_forward(layer, layer.norm2(flat), in_place), flat, in_place)
        else:
            block = _packed_self_attention(layer, flat, index, bsz, seq, attn_mask, grid)
            flat = layer.norm1(residual(block, flat, in_place))
            flat = layer.norm2(residual(_feed_forward(layer, flat, in_place), flat, in_place))
    if encoder.norm is not None:
        flat = encoder.norm(flat)
    if index is None:
        return flat.view(bsz, seq, d)
    return flat.new_zeros(bsz * seq, d).index_copy_(0, index, flat).view(bsz, seq, d)


def _packed_self_attention(layer: nn.TransformerEncoderLayer, flat, index, bsz: int, seq: int, attn_mask, grid=None):
    """The layer's self-attention block (with dropout1) for real tokens (N, D) -> (N, D).

    `grid`: a (B*S, 3D) buffer whose padding rows are zero, to take the q/k/v (None: a new one).
    """
    attn = layer.self_attn
    d = flat.shape[-1]
    h = attn.num_heads
    qkv = F.linear(flat, attn.in_proj_weight, attn.in_proj_bias)  # (N, 3D)
    if index is not None:
        if grid is None:
            grid = qkv.new_zeros(bsz * seq, 3 * d)
        qkv = grid.index_copy_(0, index, qkv)  # (B*S, 3D), padding rows zero
    q, k, v = qkv.view(bsz, seq, 3, h, d // h).permute(2, 0, 3, 1, 4)  # each (B, h, S, dh)
    dropout = attn.dropout if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)  # (B, h, S, dh)
    out = out.transpose(1, 2).reshape(bsz * seq, d)  # (B*S, D)
    if index is not None:
        out = out.index_select(0, index)  # (N, D)
    return dropped(layer.dropout1, attn.out_proj(out))


def _feed_forward(layer: nn.TransformerEncoderLayer, flat, in_place: bool = False):
    """The layer's feed-forward block (with its dropouts); `in_place`: a ReLU into the first product (no autograd)."""
    hidden = layer.linear1(flat)
    hidden = torch.relu_(hidden) if in_place and layer.activation is F.relu else layer.activation(hidden)
    return dropped(layer.dropout2, layer.linear2(dropped(layer.dropout, hidden)))


def residual(block_out, x, in_place: bool):
    """``x + block_out``; `in_place` adds into `block_out`, an array its block just made (for use without autograd)."""
    return block_out.add_(x) if in_place else x + block_out
