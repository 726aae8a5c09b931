"""Sparse decode in Triton: out[n] = sum_j values[n, j] * W[indices[n, j]] + bias.

Forward and the gradient of the values; the weight gradient is a by-latent segment sum
(kernels/latent_rowsum.py). Accumulation is fp32 whatever the storage dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting, next_pow2


@triton.jit
def _sparse_decode_kernel(
    values_ptr, indices_ptr, weight_ptr, bias_ptr, out_ptr,
    k, d, stride_vn, stride_in, stride_wf, stride_on,
    HAS_BIAS: tl.constexpr, UNROLL: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (row, column block). Each thread accumulates its own columns over
    # the row's k latents (no cross-thread reduction); UNROLL independent row gathers are
    # issued back to back so several loads are in flight. Fixed order: deterministic.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < d
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j0 in range(0, k, UNROLL):
        for u in tl.static_range(UNROLL):
            j = j0 + u
            ok = j < k
            latent = tl.load(indices_ptr + row * stride_in + j, mask=ok, other=0)
            val = tl.load(values_ptr + row * stride_vn + j, mask=ok, other=0.0).to(tl.float32)
            w = tl.load(weight_ptr + latent * stride_wf + cols, mask=col_mask & ok, other=0.0)
            acc += val * w.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_on + cols, acc.to(out_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _sparse_decode_grad_values_kernel(
    grad_out_ptr, indices_ptr, weight_ptr, grad_values_ptr,
    k, d, stride_gn, stride_in, stride_wf, stride_vn,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grad_values[n, j] = <grad_out[n], W[indices[n, j]]>, BLOCK_K pairs per program.
    row = tl.program_id(0).to(tl.int64)
    js = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    j_mask = js < k
    latents = tl.load(indices_ptr + row * stride_in + js, mask=j_mask, other=0)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < d
        g = tl.load(grad_out_ptr + row * stride_gn + cols, mask=col_mask, other=0.0).to(tl.float32)
        w = tl.load(weight_ptr + latents[:, None] * stride_wf + cols[None, :],
                    mask=j_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * g[None, :], axis=1)
    tl.store(grad_values_ptr + row * stride_vn + js, acc.to(grad_values_ptr.dtype.element_ty), mask=j_mask)


def _block_d(d: int) -> int:
    return min(next_pow2(d), 64 if interpreting() else 256)


def sparse_decode_forward(values: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                          unroll: int = 8, block_d: int | None = None, num_warps: int = 2) -> torch.Tensor:
    """values [N, k], indices [N, k] int64, weight [F, d], bias [d] or None -> out [N, d].

    ``out_dtype`` defaults to weight's dtype. Inputs are assumed validated by the caller.
    ``unroll``, ``block_d`` (default: all of d up to 512) and ``num_warps`` are launch
    options; the defaults were the fastest of benchmarks/tune_topk_encode.py's sweep on an
    H100 (bf16, d=1024, k=32 and 512), on par with the CUDA kernel at k=32.
    """
    values, indices, weight = values.contiguous(), indices.contiguous(), weight.contiguous()
    n, k = indices.shape
    d = weight.shape[1]
    out = torch.empty(n, d, dtype=out_dtype or weight.dtype, device=weight.device)
    if n == 0:
        return out
    block_d = block_d or min(next_pow2(d), 64 if interpreting() else 512)
    grid = (n, triton.cdiv(d, block_d))
    _sparse_decode_kernel[grid](
        values, indices, weight, bias if bias is not None else weight, out,
        k, d, values.stride(0), indices.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, UNROLL=min(unroll, next_pow2(k)), BLOCK_D=block_d, num_warps=num_warps,
    )
    return out


def sparse_decode_grad_values(grad_out: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor,
                              out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """grad_out [N, d], indices [N, k] int64, weight [F, d] -> grad_values [N, k]."""
    grad_out, indices, weight = grad_out.contiguous(), indices.contiguous(), weight.contiguous()
    n, k = indices.shape
    d = weight.shape[1]
    grad_values = torch.empty(n, k, dtype=out_dtype, device=weight.device)
    if n == 0:
        return grad_values
    block_k = min(next_pow2(k), 16)
    grid = (n, triton.cdiv(k, block_k))
    _sparse_decode_grad_values_kernel[grid](
        grad_out, indices, weight, grad_values,
        k, d, grad_out.stride(0), indices.stride(0), weight.stride(0), grad_values.stride(0),
        BLOCK_K=block_k, BLOCK_D=_block_d(d),
    )
    return grad_values
