"""Fused top-k encoder in Triton: top-k of relu(x W^T + b) per row, without the [N, F] matrix.

Stage 1 (``_topk_encode_partial_kernel``): the grid is (row blocks, F splits). A program
computes pre-activation tiles [BLOCK_N, BLOCK_F] with tl.dot, applies bias, ReLU and the
optional latent mask, and keeps a running top-K_PAD per row in registers. Splitting F
across programs fills the GPU when N is small. Candidates go to a small buffer
[N, splits, K_PAD].

Stage 2 (``_topk_merge_kernel``): one program per row merges its splits' candidates and
writes the final top-k values and latent indices.

Selection works on packed int64 keys: the high 32 bits are the fp32 bits of the
(non-negative) activation, which order like the floats; the low 32 bits are
0x7FFFFFFF - latent, so equal activations prefer the lower latent. The result is exact
and deterministic, ties included. Padding slots hold the key -1, below every real key.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dot_options, interpreting, next_pow2, target_programs

MAX_K = 4096  # K_PAD rows of int64 keys live in registers; beyond this use backend="torch"


@triton.jit
def _pack_keys(pre, latents):
    bits = pre.to(tl.int32, bitcast=True).to(tl.int64)
    return (bits << 32) | (0x7FFFFFFF - latents).to(tl.int64)


@triton.jit
def _topk_encode_partial_kernel(
    x_ptr, w_ptr, b_ptr, mask_ptr, keys_ptr,
    n_rows, n_latents, d, latents_per_split,
    stride_xn, stride_wf, stride_kn, stride_ks,
    K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    split = tl.program_id(1)
    f_begin = split * latents_per_split
    f_end = tl.minimum(f_begin + latents_per_split, n_latents)
    best = tl.full([BLOCK_N, K_PAD], -1, dtype=tl.int64)
    for f0 in range(f_begin, f_end, BLOCK_F):
        latents = f0 + tl.arange(0, BLOCK_F)
        lat_mask = latents < f_end
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
            acc = tl.dot(xt, tl.trans(wt), acc, input_precision=INPUT_PRECISION)
        bias = tl.load(b_ptr + latents, mask=lat_mask, other=0.0).to(tl.float32)
        pre = acc + bias[None, :]
        pre = tl.where(pre > 0.0, pre, 0.0)  # ReLU; also maps -0.0 to +0.0 for the key order
        if HAS_MASK:
            keep = tl.load(mask_ptr + latents, mask=lat_mask, other=0) != 0
            pre = tl.where(keep[None, :], pre, 0.0)
        keys = _pack_keys(pre, latents[None, :])
        keys = tl.where(lat_mask[None, :], keys, -1)
        # Merge only when some row has a key above its current K_PAD-th best.
        improves = tl.max(keys, axis=1) > tl.min(best, axis=1)
        if tl.max(improves.to(tl.int32), axis=0) > 0:
            tile_best = tl.topk(keys, K_PAD, dim=1)
            both = tl.reshape(tl.join(best, tile_best), [BLOCK_N, 2 * K_PAD])
            best = tl.topk(both, K_PAD, dim=1)
    slots = tl.arange(0, K_PAD)
    tl.store(keys_ptr + rows[:, None].to(tl.int64) * stride_kn + split * stride_ks + slots[None, :],
             best, mask=row_mask[:, None])


@triton.jit
def _topk_merge_kernel(
    keys_ptr, values_ptr, indices_ptr,
    n_candidates, k, stride_kn, stride_vn, stride_in,
    C_PAD: tl.constexpr, K_PAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cs = tl.arange(0, C_PAD)
    keys = tl.load(keys_ptr + row * stride_kn + cs, mask=cs < n_candidates, other=-1)
    top = tl.topk(keys, K_PAD)
    js = tl.arange(0, K_PAD)
    j_mask = js < k
    values = (top >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    latents = 0x7FFFFFFF - (top & 0xFFFFFFFF)
    tl.store(values_ptr + row * stride_vn + js, values.to(values_ptr.dtype.element_ty), mask=j_mask)
    tl.store(indices_ptr + row * stride_in + js, latents, mask=j_mask)


def _block_sizes(k_pad: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_F, BLOCK_D, num_warps); BLOCK_F >= K_PAD so a tile's top-K_PAD exists."""
    if interpreting():
        return 16, max(32, k_pad), 32, 4
    return 64, max(128, k_pad), 64, 8


def topk_encode_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int,
                        latent_mask: torch.Tensor | None = None, splits: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of relu(x @ weight.T + bias) per row, never materializing the [N, F] matrix.

    x [N, d], weight [F, d] (same dtype), bias [F], latent_mask [F] bool or None (latents
    outside the mask count as 0) -> (values [N, k] in x's dtype, indices [N, k] int64),
    each row sorted by decreasing value; equal values prefer the lower latent.
    ``splits`` forces the number of F-splits (tests); by default the grid fills the GPU.
    """
    if k > MAX_K:
        raise ValueError(f"k={k} is larger than the Triton top-k supports ({MAX_K}); use backend='torch'")
    x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()
    n, d = x.shape
    n_latents = weight.shape[0]
    if n == 0:
        return x.new_empty(0, k), torch.empty(0, k, dtype=torch.int64, device=x.device)
    k_pad = max(2, next_pow2(k))  # tl.topk needs a candidate width of at least 2
    block_n, block_f, block_d, num_warps = _block_sizes(k_pad)
    block_d = min(block_d, max(16, next_pow2(d)))
    row_blocks = triton.cdiv(n, block_n)
    f_tiles = triton.cdiv(n_latents, block_f)
    if splits is None:
        splits = triton.cdiv(target_programs(x.device), row_blocks)
    splits = max(1, min(int(splits), f_tiles))
    latents_per_split = triton.cdiv(f_tiles, splits) * block_f
    splits = triton.cdiv(n_latents, latents_per_split)

    keys = torch.empty(n, splits, k_pad, dtype=torch.int64, device=x.device)
    mask = latent_mask.to(torch.int8).contiguous() if latent_mask is not None else keys
    dot_fp32, precision = dot_options(x.dtype)
    _topk_encode_partial_kernel[(row_blocks, splits)](
        x, weight, bias, mask, keys,
        n, n_latents, d, latents_per_split,
        x.stride(0), weight.stride(0), keys.stride(0), keys.stride(1),
        K_PAD=k_pad, BLOCK_N=block_n, BLOCK_F=block_f, BLOCK_D=block_d,
        HAS_MASK=latent_mask is not None, DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
        num_warps=num_warps,
    )
    values = torch.empty(n, k, dtype=x.dtype, device=x.device)
    indices = torch.empty(n, k, dtype=torch.int64, device=x.device)
    n_candidates = splits * k_pad
    _topk_merge_kernel[(n,)](
        keys, values, indices, n_candidates, k, keys.stride(0), values.stride(0), indices.stride(0),
        C_PAD=next_pow2(n_candidates), K_PAD=k_pad,
    )
    return values, indices
