"""By-latent segment sum: the one kernel behind both weight gradients of the sparse path.

out[f] = sum over pairs p of latent f of coef[p] * rows[p // k]   (and sums[f] = sum coef[p])

- decoder:  coef = values,  rows = grad of the reconstruction  -> grad W_dec
- encoder:  coef = grad of the pre-activations at the chosen pairs,
            rows = x - b_pre                                    -> grad W_enc, grad b_enc

Each latent's segment (from saeengine.ops.latent_index) is summed by one program in a
fixed order, so the result is bitwise repeatable; latents that never fired keep a zero row.
Given a previous call's output, the kernel adds into it instead: several codes of one
step (the main and the AuxK code) then share one gradient buffer, with no [F, d]
temporary per code and no sum of them.
With ``compact_rows`` the output holds one row per distinct latent instead, in ascending
latent order (row u belongs to ``index.unique_latents[u]``): the rows of a sparse
gradient, with no [F, d] buffer at all. Its row count is a bound the host knows
(min(pairs, F), or the size of the subset an AuxK code was chosen from), not the distinct
count, which lives on the device: the kernel writes zeros past it, and the host never
waits to size the output.
The grid is persistent: a fixed number of programs walks the distinct latents, whose count
is read on the device, so the launch does not scale with the number of pairs (AuxK has
N * k_aux of them) and the host never syncs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting, next_pow2, target_programs


@triton.jit
def _latent_rowsum_kernel(
    order_ptr, unique_ptr, starts_ptr, n_unique_ptr, coef_ptr, rows_ptr, out_ptr, sums_ptr,
    k, d, stride_rn, stride_of, n_rows_out,
    HAS_SUMS: tl.constexpr, ACCUMULATE: tl.constexpr, COMPACT: tl.constexpr, UNROLL: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Each thread accumulates its own columns pair after pair (no cross-thread reduction);
    # UNROLL independent row gathers are issued back to back to keep loads in flight.
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < d
    n_unique = tl.load(n_unique_ptr)
    for slot in range(tl.program_id(0), n_unique, tl.num_programs(0)):
        latent = slot if COMPACT else tl.load(unique_ptr + slot)  # the output row
        start = tl.load(starts_ptr + slot)
        end = tl.load(starts_ptr + slot + 1)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        coef_sum = 0.0
        for p0 in range(start, end, UNROLL):
            for u in tl.static_range(UNROLL):
                p = p0 + u
                ok = p < end
                pair = tl.load(order_ptr + p, mask=ok, other=0)
                coef = tl.load(coef_ptr + pair, mask=ok, other=0.0).to(tl.float32)
                r = tl.load(rows_ptr + (pair // k) * stride_rn + cols, mask=col_mask & ok, other=0.0)
                acc += coef * r.to(tl.float32)
                coef_sum += coef
        if ACCUMULATE:  # this segment's sum first, then the earlier code's: a fixed order
            acc += tl.load(out_ptr + latent * stride_of + cols, mask=col_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + latent * stride_of + cols, acc.to(out_ptr.dtype.element_ty), mask=col_mask)
        if HAS_SUMS:
            if tl.program_id(1) == 0:
                if ACCUMULATE:
                    coef_sum += tl.load(sums_ptr + latent).to(tl.float32)
                tl.store(sums_ptr + latent, coef_sum.to(sums_ptr.dtype.element_ty))
    if COMPACT:  # the padding rows past the distinct latents: zeros, so the buffer can be empty
        zeros = tl.zeros([BLOCK_D], dtype=out_ptr.dtype.element_ty)
        for slot in range(n_unique + tl.program_id(0), n_rows_out, tl.num_programs(0)):
            tl.store(out_ptr + slot * stride_of + cols, zeros, mask=col_mask)
            if HAS_SUMS:
                if tl.program_id(1) == 0:
                    tl.store(sums_ptr + slot, 0.0)


def latent_weighted_rowsum(index, coef: torch.Tensor, rows: torch.Tensor, k: int, n_latents: int,
                           out_dtype: torch.dtype = torch.float32, with_sums: bool = False,
                           out: torch.Tensor | None = None, sums: torch.Tensor | None = None,
                           compact_rows: int | None = None):
    """index: LatentIndex over P = N*k pairs; coef [N, k]; rows [N, d] ->
    (out [n_latents, d] of out_dtype, sums [n_latents] of out_dtype or None).

    ``out`` (and ``sums`` with ``with_sums``): a previous call's result, contiguous, to add
    this call's sums into, in place; out_dtype is then theirs.
    ``compact_rows``: at least the number of distinct latents (min(P, n_latents) is
    always enough); out is then [compact_rows, d] and sums [compact_rows], row u for latent
    index.unique_latents[u], and zeros past the distinct count."""
    coef, rows = coef.contiguous(), rows.contiguous()
    n_pairs = coef.numel()
    d = rows.shape[1]
    accumulate = out is not None
    if compact_rows is not None:
        if accumulate:
            raise ValueError("compact_rows and out= do not combine: each code's distinct latents differ")
        n_latents = compact_rows
    if accumulate:
        if not out.is_contiguous() or tuple(out.shape) != (n_latents, d) or (with_sums and sums is None):
            raise ValueError(f"out must be a contiguous [{n_latents}, {d}] buffer (and sums given with with_sums)")
    else:  # compact rows are all written by the kernel; full ones keep the unfired rows' zeros
        alloc = torch.empty if compact_rows is not None and n_pairs else torch.zeros
        out = alloc(n_latents, d, dtype=out_dtype, device=rows.device)
        sums = alloc(n_latents, dtype=out_dtype, device=rows.device) if with_sums else None
    if n_pairs == 0:
        return out, sums
    block_d = min(next_pow2(d), 64 if interpreting() else 512)
    col_blocks = triton.cdiv(d, block_d)
    programs = max(1, min(n_pairs, n_latents, 4 * target_programs(rows.device) // col_blocks))
    _latent_rowsum_kernel[(programs, col_blocks)](
        index.order, index.unique_latents, index.segment_starts, index.n_unique, coef, rows, out,
        sums if sums is not None else out,
        k, d, rows.stride(0), out.stride(0), n_latents,
        HAS_SUMS=with_sums, ACCUMULATE=accumulate, COMPACT=compact_rows is not None, UNROLL=8, BLOCK_D=block_d, num_warps=2,
    )
    return out, sums
