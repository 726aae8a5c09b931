"""Fused top-k encoder in Triton: top-k of relu(x W^T + b) per row, without the [N, F] matrix.

Stage 1, the partial kernel. The grid is (row blocks, F splits). A program computes
pre-activation tiles [BLOCK_N, BLOCK_F] with tl.dot, adds the bias and applies ReLU.
Splitting F across programs fills the GPU when N is small.

Selection, ``_topk_encode_filter_kernel``: each row keeps in registers the value of its
current K_PAD-th best. Only elements above that threshold are appended to the row's
candidate list in global memory. A full list is compacted to its top K_PAD, which raises
the threshold, so a tile costs about one compare per element once the threshold has
settled. (A running top-k merged with every tile by bitonic sorts was 2.5x slower on an
H100 and was removed: benchmarks/results/NOTES.md.)

Stage 2, ``_topk_merge_kernel``. One program per row merges the K_PAD candidates of each
split and writes the final values and latent indices.

Selection works on packed int64 keys:
- The high 32 bits are the fp32 bits of the activation, which is non-negative, so the
  keys order like the floats.
- The low 32 bits are 0x7FFFFFFF - latent, so equal activations prefer the lower latent.
- Padding slots hold the key -1, below every real key.

The result is exact and deterministic, ties included. With ``latent_subset`` (AuxK over
the dead latents) the columns are the subset's rows of W. The keys carry the global
latent id.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import dot_options, interpreting, next_pow2, target_programs

MAX_K = 4096  # K_PAD rows of int64 keys live in registers; beyond this use backend="torch"
MERGE_WIDTH = 4096  # at most this many candidate keys per row reach the merge kernel (unless k is larger)


@triton.jit
def _pack_keys(pre, latents):
    bits = pre.to(tl.int32, bitcast=True).to(tl.int64)
    return (bits << 32) | (0x7FFFFFFF - latents).to(tl.int64)


@triton.jit
def _key_values(keys):
    return (keys >> 32).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _tile_latents(subset_ptr, f0, f_end, BLOCK_F: tl.constexpr, HAS_SUBSET: tl.constexpr):
    """(latent ids of the tile's columns, column mask): columns f0.. of the candidate list,
    which is weight's rows themselves or the (ascending) subset."""
    cols = f0 + tl.arange(0, BLOCK_F)
    col_mask = cols < f_end
    latents = cols
    if HAS_SUBSET:
        latents = tl.load(subset_ptr + cols, mask=col_mask, other=0).to(tl.int32)
    return latents, col_mask


@triton.jit
def _preactivation_tile(x_ptr, w_ptr, b_ptr, rows, row_mask, latents, lat_mask, d,
                        stride_xn, stride_wf, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
                        BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """relu(x[rows] @ w[latents]^T + b[latents]) as fp32 [BLOCK_N, BLOCK_F]."""
    acc = tl.zeros([BLOCK_N, BLOCK_F], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_mask = dd < d
        xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xn + dd[None, :],
                     mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        wt = tl.load(w_ptr + latents[:, None].to(tl.int64) * stride_wf + dd[None, :],
                     mask=lat_mask[:, None] & d_mask[None, :], other=0.0)
        if DOT_FP32:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        else:  # fp32 master weights read directly (no bf16 copy): round the tile like x
            wt = wt.to(xt.dtype)
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision=INPUT_PRECISION)
    bias = tl.load(b_ptr + latents, mask=lat_mask, other=0.0).to(tl.float32)
    pre = acc + bias[None, :]
    return tl.where(pre > 0.0, pre, 0.0)  # ReLU; also maps -0.0 to +0.0 for the key order


@triton.jit
def _compact_candidates(buf_ptr, count_ptr, thr_ptr, block_row0, n_rows, split, n_splits, stride_bn,
                        K_PAD: tl.constexpr, CAP: tl.constexpr, BLOCK_N: tl.constexpr, SUB_N: tl.constexpr):
    """Shrink every row's candidate list (count_ptr[row] packed keys at buf) to its top
    K_PAD, kept in the list's first K_PAD slots, and store the row's new threshold (the
    value of its K_PAD-th key; -1 while it has fewer) at thr_ptr. SUB_N rows at a time
    bound the registers. The barriers publish the block's global stores to all its threads."""
    tl.debug_barrier()
    slots = tl.arange(0, CAP)
    for r0 in range(0, BLOCK_N, SUB_N):
        rows = block_row0 + r0 + tl.arange(0, SUB_N)
        row_mask = rows < n_rows
        state = rows.to(tl.int64) * n_splits + split
        count = tl.load(count_ptr + state, mask=row_mask, other=0)
        lists = buf_ptr + rows[:, None].to(tl.int64) * stride_bn + split * CAP
        keys = tl.load(lists + slots[None, :], mask=row_mask[:, None] & (slots[None, :] < count[:, None]),
                       other=-1)
        best = tl.topk(keys, K_PAD, dim=1)
        tl.store(lists + tl.arange(0, K_PAD)[None, :], best, mask=row_mask[:, None])
        kth = tl.min(best, axis=1)
        tl.store(thr_ptr + state, tl.where(kth >= 0, _key_values(kth), -1.0), mask=row_mask)
    tl.debug_barrier()


@triton.jit
def _topk_encode_filter_kernel(
    x_ptr, w_ptr, b_ptr, subset_ptr, buf_ptr, count_ptr, thr_ptr,
    n_rows, n_candidates, d, latents_per_split,
    stride_xn, stride_wf, stride_bn,
    K_PAD: tl.constexpr, CAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
    BLOCK_D: tl.constexpr, SUB_N: tl.constexpr,
    HAS_SUBSET: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Threshold filter: each row keeps the value of its current K_PAD-th best (thr) in
    registers; a tile costs one compare per element, and only elements above thr are
    appended (positions from a prefix sum) to the row's candidate list in global memory.
    When a list would overflow CAP (>= K_PAD + BLOCK_F) it is compacted to its top K_PAD,
    which raises thr; after a few compactions almost nothing passes the filter.
    Strict ``> thr`` is exact: latents arrive in increasing order within a split, so a
    later latent with an equal value loses the tie anyway."""
    block_row0 = tl.program_id(0) * BLOCK_N
    rows = block_row0 + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    state = rows.to(tl.int64) * n_splits + split
    lists = buf_ptr + rows.to(tl.int64) * stride_bn + split * CAP
    f_begin = split * latents_per_split
    f_end = tl.minimum(f_begin + latents_per_split, n_candidates)
    thr = tl.full([BLOCK_N], -1.0, dtype=tl.float32)
    count = tl.zeros([BLOCK_N], dtype=tl.int32)
    for f0 in range(f_begin, f_end, BLOCK_F):
        latents, lat_mask = _tile_latents(subset_ptr, f0, f_end, BLOCK_F, HAS_SUBSET)
        pre = _preactivation_tile(x_ptr, w_ptr, b_ptr, rows, row_mask, latents, lat_mask, d,
                                  stride_xn, stride_wf, BLOCK_N, BLOCK_F, BLOCK_D, DOT_FP32, INPUT_PRECISION)
        pre = tl.where(lat_mask[None, :], pre, -2.0)  # never passes the filter
        hit = pre > thr[:, None]
        n_hit = tl.sum(hit.to(tl.int32), axis=1)
        if tl.max(count + n_hit, axis=0) > CAP:
            tl.store(count_ptr + state, count, mask=row_mask)
            _compact_candidates(buf_ptr, count_ptr, thr_ptr, block_row0, n_rows, split, n_splits, stride_bn,
                                K_PAD, CAP, BLOCK_N, SUB_N)
            thr = tl.load(thr_ptr + state, mask=row_mask, other=-1.0)
            count = tl.minimum(count, K_PAD)
            hit = pre > thr[:, None]
            n_hit = tl.sum(hit.to(tl.int32), axis=1)
        if tl.max(n_hit, axis=0) > 0:
            pos = count[:, None] + tl.cumsum(hit.to(tl.int32), axis=1) - 1
            tl.store(lists[:, None] + pos, _pack_keys(pre, latents[None, :]), mask=hit & row_mask[:, None])
            count += n_hit
    tl.store(count_ptr + state, count, mask=row_mask)
    _compact_candidates(buf_ptr, count_ptr, thr_ptr, block_row0, n_rows, split, n_splits, stride_bn,
                        K_PAD, CAP, BLOCK_N, SUB_N)


@triton.jit
def _topk_merge_kernel(
    keys_ptr, values_ptr, indices_ptr,
    n_splits, k, stride_kn, stride_ks, stride_vn, stride_in,
    C_PAD: tl.constexpr, K_PAD: tl.constexpr,
):
    """One row: the top-k of its n_splits lists of K_PAD candidate keys (list s at
    s * stride_ks) -> values (sorted descending) and latent indices."""
    row = tl.program_id(0).to(tl.int64)
    cs = tl.arange(0, C_PAD)
    keys = tl.load(keys_ptr + row * stride_kn + (cs // K_PAD) * stride_ks + cs % K_PAD,
                   mask=cs < n_splits * K_PAD, other=-1)
    top = tl.topk(keys, K_PAD)
    js = tl.arange(0, K_PAD)
    j_mask = js < k
    latents = 0x7FFFFFFF - (top & 0xFFFFFFFF)
    tl.store(values_ptr + row * stride_vn + js, _key_values(top).to(values_ptr.dtype.element_ty), mask=j_mask)
    tl.store(indices_ptr + row * stride_in + js, latents, mask=j_mask)


class EncodeTiling(NamedTuple):
    """Tile shape and launch options of the partial kernel."""

    block_n: int = 64
    block_f: int = 128
    block_d: int = 64
    num_warps: int = 4
    num_stages: int = 3


def default_tiling(k_pad: int) -> EncodeTiling:
    if interpreting():
        return EncodeTiling(16, 32, 32, 4, 1)
    return EncodeTiling()


def _split_latents(n_candidates: int, row_blocks: int, block_f: int, k_pad: int, splits: int | None,
                   device: torch.device) -> tuple[int, int]:
    """(number of F-splits, candidates per split, a multiple of block_f). Enough splits to
    fill the GPU, but at most MERGE_WIDTH // k_pad so the merge of a row's lists stays small."""
    f_tiles = triton.cdiv(n_candidates, block_f)
    if splits is None:
        splits = min(triton.cdiv(target_programs(device), row_blocks), max(1, MERGE_WIDTH // k_pad))
    splits = max(1, min(int(splits), f_tiles))
    per_split = triton.cdiv(f_tiles, splits) * block_f
    return triton.cdiv(n_candidates, per_split), per_split


def topk_encode_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int,
                        latent_subset: torch.Tensor | None = None, splits: int | None = None,
                        tiling: EncodeTiling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of relu(x @ weight.T + bias) per row, never materializing the [N, F] matrix.

    x [N, d], weight [F, d] (x's dtype, or fp32 rounded to x's dtype tile by tile), bias
    [F], latent_subset [F_sub] int64 ascending
    or None (choose among these rows of weight only; AuxK passes the dead latents) ->
    (values [N, k] in x's dtype, indices [N, k] int64 rows of weight), each row sorted by
    decreasing value; equal values prefer the lower latent. k <= F_sub.
    ``splits`` forces the number of F-splits (tests); by default the grid fills the GPU.
    ``tiling`` overrides the tile shape (benchmarks/tune_topk_encode.py).
    """
    if k > MAX_K:
        raise ValueError(f"k={k} is larger than the Triton top-k supports ({MAX_K}); use backend='torch'")
    x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()
    n, d = x.shape
    n_candidates = weight.shape[0] if latent_subset is None else latent_subset.numel()
    if n == 0:
        return x.new_empty(0, k), torch.empty(0, k, dtype=torch.int64, device=x.device)
    k_pad = max(2, next_pow2(k))  # tl.topk needs a candidate width of at least 2
    tiling = tiling or default_tiling(k_pad)
    block_n, block_f, block_d, num_warps, num_stages = tiling
    block_d = min(block_d, max(16, next_pow2(d)))
    row_blocks = triton.cdiv(n, block_n)
    splits, per_split = _split_latents(n_candidates, row_blocks, block_f, k_pad, splits, x.device)

    subset = latent_subset.contiguous() if latent_subset is not None else x
    dot_fp32, precision = dot_options(x.dtype)
    common = dict(HAS_SUBSET=latent_subset is not None, DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
                  BLOCK_N=block_n, BLOCK_F=block_f, BLOCK_D=block_d, K_PAD=k_pad,
                  num_warps=num_warps, num_stages=num_stages)
    cap = next_pow2(k_pad + block_f)
    keys = torch.empty(n, splits, cap, dtype=torch.int64, device=x.device)
    count = torch.empty(n, splits, dtype=torch.int32, device=x.device)
    thr = torch.empty(n, splits, dtype=torch.float32, device=x.device)
    _topk_encode_filter_kernel[(row_blocks, splits)](
        x, weight, bias, subset, keys, count, thr, n, n_candidates, d, per_split,
        x.stride(0), weight.stride(0), keys.stride(0),
        CAP=cap, SUB_N=max(1, min(block_n, 2048 // cap)), **common)
    values = torch.empty(n, k, dtype=x.dtype, device=x.device)
    indices = torch.empty(n, k, dtype=torch.int64, device=x.device)
    _topk_merge_kernel[(n,)](
        keys, values, indices, splits, k, keys.stride(0), keys.stride(1), values.stride(0), indices.stride(0),
        C_PAD=next_pow2(splits * k_pad), K_PAD=k_pad,
    )
    return values, indices
