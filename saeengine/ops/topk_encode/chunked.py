"""Chunked GEMM + top-k select: the forward selection of topk_encode's "chunked" implementation.

cuBLAS computes the pre-activations one column chunk at a time ([N, chunk], the bias added
in the GEMM's epilogue), :func:`saeengine.ops.topk_select` (the CUDA select) keeps
each chunk's top k per row, and one small top-k over the chunks' candidates gives the
answer. The [N, F] matrix never exists: at most one [N, chunk] buffer does (two with
``overlap``).

Why a second forward next to the fused Triton kernel: cuBLAS runs the GEMM at the roofline,
while the fused kernel's selection-friendly tile runs its GEMM at 1.4-2.1x cuBLAS
(benchmarks/results/NOTES.md). Here the selection is a separate, bandwidth-bound pass that
reads each chunk about twice; with ``overlap`` it runs on a side stream while the next
chunk's GEMM runs.
"""

from __future__ import annotations

import functools

import torch

from ..topk_select import topk_select

DEFAULT_CHUNK_BYTES = 256 * 2**20  # one [N, chunk] pre-activation buffer


def chunk_columns(n_rows: int, n_cols: int, element_size: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Columns per chunk so that one [n_rows, chunk] buffer takes at most chunk_bytes (>= 1)."""
    return max(1, min(n_cols, chunk_bytes // max(1, n_rows * element_size)))


@functools.lru_cache(maxsize=None)
def _side_stream(device_index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=device_index)


def chunked_topk_encode(x_centered: torch.Tensor, W: torch.Tensor, b_enc: torch.Tensor, k: int,
                        latent_subset: torch.Tensor | None = None, *, select_backend: str = "auto",
                        chunk_bytes: int = DEFAULT_CHUNK_BYTES, overlap: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of relu(x_centered @ W.T + b_enc) per row, chunk by chunk.

    Args:
        x_centered: [N, d]; b_enc: [F] in x's dtype; W: [F, d] in x's dtype, or fp32
            master weights (cast one chunk at a time, never whole).
        k: 1 <= k <= F (or <= F_sub).
        latent_subset: [F_sub] int64 latents to choose among (AuxK's dead latents), or None.
        select_backend: the implementation of the per-chunk :func:`topk_select`
            ("reference", "radix" or "auto"; the encoder's plan names one).
        chunk_bytes: size of one pre-activation buffer.
        overlap: select each chunk on a side stream while the next chunk's GEMM runs
            (CUDA only; two buffers).
    Returns:
        (values [N, k] relu'd, sorted descending; indices [N, k] int64 latents). Only
        values tied at the k-th place may pick different latents from the reference, and
        the choice is the same on every run.
    """
    if latent_subset is not None:
        W, b_enc = W[latent_subset], b_enc[latent_subset]
    n, f = x_centered.shape[0], W.shape[0]
    cols = chunk_columns(n, f, x_centered.element_size(), chunk_bytes)
    values, indices = _chunk_candidates(x_centered, W, b_enc, k, cols, select_backend,
                                        overlap and x_centered.is_cuda and cols < f)
    if len(values) == 1:
        top_values, top_indices = values[0], indices[0]
    else:
        candidates, where = torch.topk(torch.cat(values, 1), k, dim=1, sorted=True)
        top_values, top_indices = candidates, torch.cat(indices, 1).gather(1, where)
    if latent_subset is not None:
        top_indices = latent_subset[top_indices]
    # The selection ran on the raw pre-activations; relu is monotone, so only the values
    # change (entries <= 0 become 0 and pass no gradient).
    return top_values.clamp_min(0), top_indices


def _chunk_candidates(x, W, b_enc, k, cols, select_backend, overlap):
    """Per column chunk: (values [N, min(k, width)], global column indices), in chunk order."""
    n, f = x.shape[0], W.shape[0]
    main = torch.cuda.current_stream(x.device) if overlap else None
    side = _side_stream(x.device.index if x.device.index is not None else torch.cuda.current_device()) \
        if overlap else None
    buffers = [torch.empty(n * cols, dtype=x.dtype, device=x.device) for _ in range(2 if overlap else 1)]
    released: list[torch.cuda.Event | None] = [None] * len(buffers)  # the select reading each buffer is done
    values, indices = [], []
    for chunk, start in enumerate(range(0, f, cols)):
        stop = min(start + cols, f)
        slot = chunk % len(buffers)
        if released[slot] is not None:
            main.wait_event(released[slot])
        pre = buffers[slot][: n * (stop - start)].view(n, stop - start)
        torch.addmm(b_enc[start:stop], x, W[start:stop].to(x.dtype).T, out=pre)  # fp32 W: a chunk-sized cast
        width = min(k, stop - start)
        if not overlap:
            v, i = topk_select(pre, width, backend=select_backend)
            values.append(v)
            indices.append(i + start)
            continue
        side.wait_stream(main)  # this chunk's GEMM is done before its select starts
        with torch.cuda.stream(side):
            v, i = topk_select(pre, width, backend=select_backend)
            i = i + start
            released[slot] = side.record_event()
        # Allocated on the side stream, consumed on the main one after the final wait.
        v.record_stream(main)
        i.record_stream(main)
        values.append(v)
        indices.append(i)
    if overlap:
        main.wait_stream(side)
    return values, indices
