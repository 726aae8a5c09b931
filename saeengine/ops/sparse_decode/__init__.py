"""Sparse decode: out[n] = sum_j values[n, j] * W_dec[indices[n, j]] + b_dec.

Implementations (saeengine.backends): ``reference`` (torch embedding_bag,
:mod:`.reference`), ``cpu`` (embedding_bag and the sparse backward in torch ops, CPU
tensors, :mod:`.cpu`), ``triton`` (kernels/sparse_decode.py with the sparse backward,
:mod:`.triton`) and ``cuda`` (``torch.ops.saeengine.sparse_decode``, csrc/; a dense
backward, and it reads a compute-dtype copy of W_dec: it honours neither sparse_grad nor
master weights). :func:`plan_sparse_decode` says which runs a call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saeengine.backends import choose

from .. import _checks
from ..latent_index import LatentIndex
from .cpu import SparseDecodeCPU
from .reference import sparse_decode_backward_ref, sparse_decode_ref
from .triton import SparseDecodeTriton

__all__ = ["SparseDecodeCPU", "SparseDecodePlan", "SparseDecodeTriton", "compute_copy", "plan_sparse_decode",
           "sparse_decode", "sparse_decode_backward_ref", "sparse_decode_codes", "sparse_decode_ref"]


@dataclass(frozen=True)
class SparseDecodePlan:
    """What runs one decode call: the implementation ("reference", "cpu", "triton", "cuda"),
    whether W_dec's gradient is sparse rows, and how the weights are read ("as-is",
    "copy" or "master", as in the encoder's plan)."""

    implementation: str
    sparse_grad: bool = False
    weight_read: str = "as-is"

    def __str__(self) -> str:
        return f"sparse_decode({self.implementation}, weights={self.weight_read}, sparse_grad={self.sparse_grad})"


def plan_sparse_decode(backend: str, W_dec: torch.Tensor, dtype: torch.dtype, *, needs_grad: bool = False,
                       sparse_grad: bool = False, weight_copies: bool | None = None) -> SparseDecodePlan:
    """The plan of a decode computing in ``dtype`` with decoder ``W_dec`` [F, d].

    ``sparse_grad`` (with a gradient) and ``weight_copies=False`` (fp32 weights under a
    half-precision compute) are flags: "auto" takes only implementations that honour
    them, and a named one that does not raises BackendUnavailableError."""
    from ..topk_encode.plan import weight_read_for

    sparse = needs_grad and sparse_grad
    wants_master = W_dec.dtype != dtype and weight_copies is False
    flags = (("sparse_grad",) if sparse else ()) + (("master_weights",) if wants_master else ())
    impl = choose(backend, "sparse_decode", W_dec.device, dtype=dtype, flags=flags)
    return SparseDecodePlan(impl.name, sparse,
                            weight_read_for(W_dec, dtype, weight_copies, "master_weights" in impl.flags))


def compute_copy(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` detached, in ``dtype`` (a view when it already is): what the kernels read."""
    return weight.detach() if weight.dtype == dtype else weight.detach().to(dtype)


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor,
                  b_dec: torch.Tensor | None = None, *, backend: str = "auto",
                  latent_index: LatentIndex | None = None, weight_compute: torch.Tensor | None = None,
                  sparse_grad: bool = False, weight_copies: bool | None = None,
                  plan: SparseDecodePlan | None = None, check: bool = True) -> torch.Tensor:
    """Decode sparse codes: ``out[n] = sum_j values[n, j] * W_dec[indices[n, j]] + b_dec``.

    Computes in values' dtype. W_dec and b_dec are in that dtype too, or float32 master
    weights (mixed precision): the Triton path then returns W_dec's gradient in float32
    directly, with no gradient buffer for a cast copy.

    Args:
        values: [N, k] activations (float32, float16 or bfloat16).
        indices: [N, k] int64 latent ids in [0, F).
        W_dec: [F, d] decoder rows; b_dec: [d] bias, or None.
        backend: "auto", "reference", "cpu", "triton" or "cuda" (or the family "torch"; see
            saeengine.backends and :func:`plan_sparse_decode`).
        latent_index: the by-latent index of ``indices`` if already built (saves a sort
            in the backward).
        weight_compute: what the kernels read: W_dec detached in values' dtype, when the
            caller already made one (see :func:`compute_copy`), or W_dec's fp32 master
            weights themselves (no copy; the rows are gathered in fp32). Triton only.
        sparse_grad: W_dec's gradient is a sparse COO tensor of the decoded rows.
        weight_copies: True/False/None: a compute-dtype copy, the fp32 master weights, or
            the plan's choice (see ``ops.topk_encode``).
        plan: run this plan (:func:`plan_sparse_decode`) as it is.
        check: validate shapes, devices, dtypes and index range (one host sync).
    Returns:
        [N, d] in values' dtype, accumulated in fp32. Differentiable in values, W_dec, b_dec.
    """
    if check:
        _checks.check_matrix("values", values, what="[N, k]")
        _checks.check_matrix("indices", indices, cols=values.shape[1], what="[N, k] like values")
        _checks.check_matrix("W_dec", W_dec, what="[F, d]")
        if indices.shape[0] != values.shape[0]:
            raise ValueError(f"values has {values.shape[0]} rows but indices has {indices.shape[0]}")
        _checks.check_vector("b_dec", b_dec, W_dec.shape[1])
        _checks.check_nonempty("values", values)
        _checks.check_float("W_dec", W_dec)
        _checks.check_same_device(values=values, indices=indices, W_dec=W_dec, b_dec=b_dec)
        _checks.check_compute_dtype("values", values, W_dec=W_dec, b_dec=b_dec)
        _checks.check_indices(indices, W_dec.shape[0])
    return sparse_decode_codes([(values, indices, latent_index)], W_dec, b_dec, backend=backend,
                               weight_compute=weight_compute, sparse_grad=sparse_grad,
                               weight_copies=weight_copies, plan=plan)[0]


def sparse_decode_codes(codes: list, W_dec: torch.Tensor, b_dec: torch.Tensor | None = None, *,
                        backend: str = "auto", weight_compute: torch.Tensor | None = None,
                        sparse_grad: bool = False, weight_copies: bool | None = None,
                        plan: SparseDecodePlan | None = None) -> list[torch.Tensor]:
    """Decode several codes with one decoder (the main and the AuxK code of a step).

    ``codes``: (values [N, k_i], indices [N, k_i], LatentIndex or None) per code, all in
    one dtype and already validated (see :func:`sparse_decode`). b_dec is added to the
    first code's output only. On the triton and cpu implementations the codes share one
    autograd node, so W_dec's gradient is summed in place, with no [F, d] buffer per code; with
    ``sparse_grad`` it is a sparse COO tensor of the decoded latents' rows (uncoalesced,
    min(N*k_i, F) rows per code, no host sync). ``plan``: run this plan as it is.
    Returns one [N, d] tensor per code.
    """
    dtype = codes[0][0].dtype
    if plan is None:
        needs_grad = torch.is_grad_enabled() and (W_dec.requires_grad or any(v.requires_grad for v, _, _ in codes))
        plan = plan_sparse_decode(backend, W_dec, dtype, needs_grad=needs_grad, sparse_grad=sparse_grad,
                                  weight_copies=weight_copies)
    b = b_dec.to(dtype) if b_dec is not None else None
    if plan.implementation == "triton":
        if weight_compute is None:
            weight_compute = W_dec.detach() if plan.weight_read in ("as-is", "master") else W_dec.detach().to(dtype)
        flat = [t for values, indices, _ in codes for t in (values, indices)]
        return list(SparseDecodeTriton.apply(W_dec, weight_compute, b, tuple(index for _, _, index in codes),
                                             plan.sparse_grad, *flat))
    if plan.implementation == "cpu":
        W_compute = compute_copy(W_dec, dtype) if weight_compute is None else weight_compute
        flat = [t for values, indices, _ in codes for t in (values, indices)]
        return list(SparseDecodeCPU.apply(W_dec, W_compute, b, tuple(index for _, _, index in codes),
                                          plan.sparse_grad, *flat))
    if plan.implementation == "cuda":
        W = W_dec.to(dtype)
        return [torch.ops.saeengine.sparse_decode(values, indices, W, b if i == 0 else None)
                for i, (values, indices, _) in enumerate(codes)]
    return [sparse_decode_ref(values, indices, W_dec, b if i == 0 else None, sparse_grad=plan.sparse_grad, dtype=dtype)
            for i, (values, indices, _) in enumerate(codes)]
