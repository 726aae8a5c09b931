"""The by-latent index of one step's (token, slot) pairs, shared by both weight gradients.

Pairs are the N*k entries of an ``indices [N, k]`` tensor, numbered p = n*k + j. Sorting
them by latent (stably, so equal latents keep increasing p) gives, for every latent that
fired, a contiguous segment of pairs; a weight-gradient row is then a sum over one segment
in a fixed order: deterministic, with no float atomics and no [N, k, d] temporary.

Built with torch ops and no host sync: the number of distinct latents stays on the device
(``n_unique``, and ``unique_latents`` is padded with -1 past it), so kernels size their
loops from it without the host ever reading it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class LatentIndex(NamedTuple):
    order: torch.Tensor           # [P] int64: pair ids sorted by latent (stable)
    unique_latents: torch.Tensor  # [B] int64: u-th distinct latent, -1 past the last one; B = P or a smaller bound
    segment_starts: torch.Tensor  # [P + 1] int64: segment u is order[starts[u]:starts[u+1]]
    n_unique: torch.Tensor        # [1] int64: the number of distinct latents


def run_starts(ordered: torch.Tensor) -> torch.Tensor:
    """ordered [M] sorted -> [M] bool, True where a run of equal values begins."""
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    return starts


def build_latent_index(indices: torch.Tensor, max_distinct: int | None = None) -> LatentIndex:
    """indices [N, k] int64 -> :class:`LatentIndex` over its P = N*k pairs.

    ``max_distinct``: a bound on the number of distinct latents that the caller knows (F,
    or the size of the subset an AuxK code was chosen from); ``unique_latents`` then has
    min(P, max_distinct) entries, and so do the compact gradients sized from it."""
    flat = indices.reshape(-1)
    n_pairs = flat.numel()
    sorted_latents, order = torch.sort(flat, stable=True)
    is_start = run_starts(sorted_latents)
    segment_id = torch.cumsum(is_start, 0) - 1
    unique_latents = flat.new_full((min(n_pairs, max_distinct if max_distinct is not None else n_pairs),), -1)
    unique_latents.scatter_(0, segment_id, sorted_latents)  # equal values per segment: order-free
    segment_starts = torch.full((n_pairs + 1,), n_pairs, dtype=torch.int64, device=flat.device)
    positions = torch.arange(n_pairs, device=flat.device)
    segment_starts.scatter_reduce_(0, segment_id, positions, reduce="amin", include_self=True)
    n_unique = segment_id[-1:] + 1 if n_pairs else torch.zeros(1, dtype=torch.int64, device=flat.device)
    return LatentIndex(order, unique_latents, segment_starts, n_unique)


def latent_weighted_rowsum_ref(
    indices: torch.Tensor, coef: torch.Tensor, rows: torch.Tensor, n_latents: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for the by-latent segment sum used by both weight gradients.

    indices [N, k] int64, coef [N, k] (one coefficient per pair), rows [N, d] ->
    (out [n_latents, d] fp32 with out[f] = sum over pairs (n, j) with indices[n, j] = f of
    coef[n, j] * rows[n], sums [n_latents] fp32 with sums[f] = the same sum of coef).
    """
    n, k = indices.shape
    flat = indices.reshape(-1)
    contrib = coef.float().reshape(n, k, 1) * rows.float().reshape(n, 1, -1)
    out = torch.zeros(n_latents, rows.shape[1], dtype=torch.float32, device=rows.device)
    out.index_add_(0, flat, contrib.reshape(n * k, -1))
    sums = torch.zeros(n_latents, dtype=torch.float32, device=rows.device)
    sums.index_add_(0, flat, coef.float().reshape(-1))
    return out, sums


def sparse_row_gradient(pieces: list[tuple[torch.Tensor, torch.Tensor]], shape: tuple[int, int]) -> torch.Tensor:
    """A sparse COO gradient of shape [F, d] from (latents [R_i], rows [R_i, d]) pieces, one
    per code: the weight gradient with no [F, d] buffer. Uncoalesced: a latent may appear
    once per code, and padding entries (zero rows, see :func:`compact_rowsum`) repeat a
    latent; ``coalesce()`` or ``to_dense()`` adds them up."""
    latents = torch.cat([latents for latents, _ in pieces]) if len(pieces) > 1 else pieces[0][0]
    rows = torch.cat([rows for _, rows in pieces]) if len(pieces) > 1 else pieces[0][1]
    # The invariants hold by construction (in-range latents): no check.
    return torch.sparse_coo_tensor(latents.unsqueeze(0), rows, shape, is_coalesced=False, check_invariants=False)


def compact_rowsum(index: LatentIndex, coef: torch.Tensor, rows: torch.Tensor, n_latents: int,
                   out_dtype: torch.dtype, with_sums: bool = False):
    """The segment sum over ``index``'s distinct latents only: (latents [R], out [R, d],
    sums [R] or None) with R = min(len(index.unique_latents), n_latents), a bound on the
    distinct count U that the host knows, so nothing waits on the device. Entries past U
    are padding: latent 0 with a zero row and a zero sum, which add nothing wherever the
    rows are summed by latent."""
    from saeengine.kernels.latent_rowsum import latent_weighted_rowsum

    capacity = min(index.unique_latents.numel(), n_latents)
    out, sums = latent_weighted_rowsum(index, coef, rows, coef.shape[1], n_latents, out_dtype=out_dtype,
                                       with_sums=with_sums, compact_rows=capacity)
    return index.unique_latents[:capacity].clamp_min(0), out, sums
