"""CPU primitives over a code's (token, slot) pairs: the torch-op counterparts of the
Triton segment sum (kernels/latent_rowsum.py) and sparse decode (kernels/sparse_decode.py)
that the "cpu" implementations of topk_encode and sparse_decode are built from.

The by-latent index (:class:`saeengine.ops.latent_index.LatentIndex`) is read as a
sparse CSR matrix A [latents, N] with A[f, n] = coef[n, j] for the pair (n, j) choosing
latent f (a token chooses a latent at most once per code, so no entry repeats). A weight
gradient is then one sparse-dense product A @ rows: each output row is a sum over its
latent's segment in the index's order, computed by one thread, so the result is the same
on every run; nothing of size [N, k, d] or [N, F] exists. The pair dot products of the
decoder's backward are a sampled product (``torch.sparse.sampled_addmm``) at the code's
pattern. Math in fp32 (fp64 for fp64 inputs).

No op here reads a tensor value on the host (:mod:`saeengine.syncs` counts none): the
compact gradients are sized min(P, n_latents), as on the GPU path.
"""

from __future__ import annotations

import warnings

import torch

from .latent_index import LatentIndex


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the CPU primitives: fp64 for fp64, else fp32 (MKL's
    sparse products take no half precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _csr(crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the ops used here are the stable core
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


def latent_rowsum_cpu(index: LatentIndex, coef: torch.Tensor, rows: torch.Tensor, n_latents: int, *,
                      compact: bool = False, with_sums: bool = False, out: torch.Tensor | None = None,
                      sums: torch.Tensor | None = None):
    """The by-latent segment sum of both weight gradients, on CPU.

    index: the LatentIndex of a code's indices [N, k]; coef [N, k] (one coefficient per
    pair); rows [N, d]. Returns (latents, out, sums):
    - dense (``compact=False``): latents None, out [n_latents, d] with out[f] = sum over
      the pairs (n, j) choosing f of coef[n, j] * rows[n], sums [n_latents] the same sum of
      coef (or None without ``with_sums``). ``out``/``sums``: a previous call's result to
      add into, in place.
    - compact: latents [R] and out [R, d] (sums [R]) for R = min(P, n_latents) rows, row u
      holding latent ``index.unique_latents[u]``; rows past the distinct count are zero
      with latent 0 (padding that adds nothing wherever rows are summed by latent).
    Accumulates in :func:`math_dtype`; out and sums are in that dtype.
    """
    n, k = coef.shape
    dtype = math_dtype(coef.dtype)
    capacity = min(index.unique_latents.numel(), n_latents)
    starts = index.segment_starts[: capacity + 1]
    latents = index.unique_latents[:capacity].clamp_min(0)
    if compact:
        crow, shape = starts, (capacity, n)
    else:  # rows for every latent: counts per latent, scattered (distinct latents, integer adds)
        counts = starts[1:] - starts[:-1]
        crow = torch.zeros(n_latents + 1, dtype=torch.int64).index_add_(0, latents + 1, counts).cumsum_(0)
        shape = (n_latents, n)
    A = _csr(crow, index.order // k, coef.reshape(-1).to(dtype)[index.order], shape)
    rows = rows.to(dtype)
    out = torch.addmm(out, A, rows) if out is not None else A @ rows
    if with_sums:
        ones = torch.ones(n, dtype=dtype)
        sums = torch.addmv(sums, A, ones) if sums is not None else torch.mv(A, ones)
    else:
        sums = None
    return (latents if compact else None), out, sums


def pair_dots_cpu(grad_out: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad_out [N, d], indices [N, k], weight [F, d] -> [N, k] with entry (n, j) =
    <grad_out[n], weight[indices[n, j]]>, each one dot product (in :func:`math_dtype`)."""
    n, k = indices.shape
    dtype = math_dtype(grad_out.dtype)
    pattern = _csr(torch.arange(0, n * k + 1, k), indices.reshape(-1), torch.zeros(n * k, dtype=dtype),
                   (n, weight.shape[0]))
    dots = torch.sparse.sampled_addmm(pattern, grad_out.to(dtype), weight.to(dtype).T, beta=0)
    return dots.values().view(n, k)


def pairs_decode_cpu(values: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """values [N, k], indices [N, k], weight [F, d] -> [N, d] = sum_j values[n, j]
    weight[indices[n, j]] (``embedding_bag``, in :func:`math_dtype`)."""
    dtype = math_dtype(values.dtype)
    return torch.nn.functional.embedding_bag(indices, weight.to(dtype), per_sample_weights=values.to(dtype),
                                             mode="sum")

