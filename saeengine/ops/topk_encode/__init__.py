"""TopK encoding: (values, indices) = top-k of relu((x - b_pre) W_enc^T + b_enc) per row.

Implementations (saeengine.backends; the plan of a call, :mod:`.plan`, says which runs
each part):
- ``reference`` (:mod:`.reference`): torch, materializes [N, F]; the oracle.
- ``cpu`` (:mod:`.cpu`): torch ops on CPU tensors, row blocks of the GEMM and a two-level
  top-k, and the sparse backward of the kernels from the chosen pairs ("auto" on CPU).
- ``fused``: the Triton kernel (kernels/topk_encode.py), GEMM tiles and the selection in
  one kernel.
- ``chunked`` (:mod:`.chunked`): cuBLAS GEMM chunks + a topk_select per chunk.
Both kernel forwards share one sparse backward (:mod:`.autograd`). The AuxK code (top
min(k_aux, #dead) over the dead latents only) is a second selection of the same call over
the dead rows of W_enc alone, or dense GEMMs over them (:mod:`.dense_auxk`, run by the
SAE, which decodes too). Listing the dead latents from a mask costs one host sync per
call, none when the caller gives them listed (``dead_latents``).
"""

from __future__ import annotations

import torch

from .. import _checks
from ..code import SparseCode
from .autograd import Selection, TopKEncodeFunction, encode_selections
from .dense_auxk import auxk_dense, use_dense_auxk
from .chunked import chunked_topk_encode
from .cpu import TopKEncodeCPU, cpu_topk_select, encode_selections_cpu
from .plan import TopKEncodePlan, plan_topk_encode
from .reference import topk_encode_ref, topk_encode_ref_sparse_grad

__all__ = ["Selection", "TopKEncodeCPU", "TopKEncodeFunction", "TopKEncodePlan", "auxk_dense", "auxk_latents", "chunked_topk_encode",
           "cpu_topk_select", "dead_latent_list", "plan_topk_encode", "run_plan", "topk_encode", "topk_encode_ref",
           "topk_encode_ref_sparse_grad", "use_dense_auxk"]


def auxk_latents(dead: torch.Tensor | None, k_aux: int) -> tuple[torch.Tensor | None, int]:
    """dead [S] ascending dead latent ids or None -> (dead, the AuxK width min(k_aux, S)),
    or (None, 0) when AuxK is off or nothing is dead: there is then no AuxK code."""
    if dead is None or k_aux <= 0 or dead.numel() == 0:
        return None, 0
    return dead, min(k_aux, dead.numel())


def dead_latent_list(dead_mask: torch.Tensor | None, k_aux: int) -> tuple[torch.Tensor | None, int]:
    """:func:`auxk_latents` of the mask's True positions. One host sync (their number)."""
    if dead_mask is None or k_aux <= 0:
        return None, 0
    return auxk_latents(torch.nonzero(dead_mask).squeeze(1), k_aux)


def run_plan(plan: TopKEncodePlan, x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int,
             b_pre: torch.Tensor | None, dead: torch.Tensor | None, k_dead: int,
             weight_compute: torch.Tensor | None = None) -> SparseCode:
    """Run ``plan`` on validated inputs: the main code, and the AuxK code over ``dead``
    [S] (width k_dead) in ``code.aux`` unless the plan runs it densely (auxk="dense": the
    caller's part) or has none. b_enc and b_pre are in x's dtype."""
    if plan.main == "reference":
        encode = topk_encode_ref_sparse_grad if plan.sparse_grad else topk_encode_ref
        W = W_enc if plan.sparse_grad else W_enc.to(x.dtype)  # the sparse reference rounds the rows it gathers
        code = SparseCode(*encode(x, W, b_enc, k, b_pre=b_pre))
        if plan.auxk == "reference":
            code.aux = SparseCode(*encode(x, W, b_enc, k_dead, b_pre=b_pre, latent_subset=dead))
        return code
    x_centered = x - b_pre if b_pre is not None else x
    if plan.main == "cpu":
        if weight_compute is None:
            weight_compute = W_enc.detach() if W_enc.dtype == x.dtype else W_enc.detach().to(x.dtype)
        selections = [(k, None)] + ([(k_dead, dead)] if plan.auxk == "cpu" else [])
        code, *aux = encode_selections_cpu(x_centered, W_enc, weight_compute, b_enc, selections, plan.sparse_grad)
        code.aux = aux[0] if aux else None
        return code
    if weight_compute is None:  # one read shared by the main and the AuxK selection
        weight_compute = W_enc.detach() if plan.weight_read in ("as-is", "master") else W_enc.detach().to(x.dtype)
    selections = [Selection(k, None, plan.main, plan.main_select)]
    if plan.auxk in ("fused", "chunked"):
        selections.append(Selection(k_dead, dead, plan.auxk, plan.auxk_select))
    code, *aux = encode_selections(x_centered, W_enc, weight_compute, b_enc, selections, plan.sparse_grad)
    code.aux = aux[0] if aux else None
    return code


def topk_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, *,
                b_pre: torch.Tensor | None = None, dead_mask: torch.Tensor | None = None,
                k_aux: int = 0, dead_latents: torch.Tensor | None = None, backend: str = "auto",
                sparse_grad: bool = False, weight_copies: bool | None = None,
                weight_compute: torch.Tensor | None = None, select: str = "auto",
                plan: TopKEncodePlan | None = None, check: bool = True) -> SparseCode:
    """Top-k of ``relu((x - b_pre) @ W_enc.T + b_enc)`` per row.

    Computes in x's dtype. W_enc, b_enc and b_pre are in that dtype too, or float32 master
    weights (mixed precision): the triton and cuda paths then return W_enc's gradient in float32
    directly, with no gradient buffer for a cast copy.

    Args:
        x: [N, d] activations.
        W_enc: [F, d] encoder rows; b_enc: [F]; b_pre: [d] subtracted from x (the
            decoder bias in an SAE), or None.
        k: latents kept per row, 1 <= k <= F.
        dead_mask: [F] bool, True for dead latents; with ``k_aux > 0`` and any latent
            dead, the result's ``aux`` holds the top-min(k_aux, #dead) over the dead
            latents only (AuxK); one host sync lists them.
        dead_latents: [S] int64 ascending dead latent ids, instead of ``dead_mask`` (no
            host sync: the caller has listed them).
        backend: "auto", an implementation ("reference", "cpu", "fused", "chunked") or a family
            ("torch", "triton", "cuda"); see saeengine.backends. The call's plan
            (:func:`plan_topk_encode`) says what runs each part.
        sparse_grad: W_enc's gradient is a sparse COO tensor holding the rows of the
            chosen latents only, as ``nn.Embedding(sparse=True)`` gives (for
            :class:`saeengine.optim.RowSparseAdam`). On the kernel and cpu paths it is
            uncoalesced and sized min(N*k, F) rows per code (zero padding rows past the
            distinct latents), so no host sync sizes it.
        weight_copies: under mixed precision (fp32 W_enc, half-precision x): True reads
            one compute-dtype copy per call (fastest), False the fp32 master weights
            directly (the kernels round as they load; 2 bytes per weight less), None
            (default) lets the plan choose from the GPU's memory.
        weight_compute: what the kernels read, when the caller has it already (a
            compute-dtype copy, or ``W_enc.detach()``); overrides weight_copies.
        select: the topk_select implementation of chunked parts ("auto", "reference",
            "radix").
        plan: run this plan as it is (from :func:`plan_topk_encode`) instead of
            planning the call; ``backend``, ``select`` and ``weight_copies`` are then unused.
        check: validate shapes, devices, dtypes and finiteness (one host sync).
    Returns:
        :class:`SparseCode` with values [N, k] (x's dtype, sorted descending) and
        indices [N, k] int64. Differentiable in x, W_enc, b_enc and b_pre.
    """
    if check:
        _checks.check_matrix("x", x, what="[N, d]")
        _checks.check_matrix("W_enc", W_enc, cols=x.shape[1], what="([F, d] with d = x.shape[1])")
        _checks.check_vector("b_enc", b_enc, W_enc.shape[0])
        _checks.check_vector("b_pre", b_pre, x.shape[1])
        _checks.check_vector("dead_mask", dead_mask, W_enc.shape[0])
        _checks.check_latent_list("dead_latents", dead_latents, W_enc.shape[0])
        _checks.check_nonempty("x", x)
        _checks.check_float("x", x)
        _checks.check_k(k, W_enc.shape[0])
        if k_aux:
            _checks.check_k(k_aux, W_enc.shape[0], name="k_aux")
        _checks.check_same_device(x=x, W_enc=W_enc, b_enc=b_enc, b_pre=b_pre, dead_mask=dead_mask,
                                  dead_latents=dead_latents)
        _checks.check_compute_dtype("x", x, W_enc=W_enc, b_enc=b_enc, b_pre=b_pre)
        _checks.check_finite("x", x)
    if dead_mask is not None and dead_mask.dtype != torch.bool:
        raise TypeError(f"dead_mask must be a bool tensor [F], got {dead_mask.dtype}")
    if dead_latents is not None and dead_mask is not None:
        raise ValueError("give the dead latents as dead_mask or as dead_latents, not both")
    dead, k_dead = auxk_latents(dead_latents, k_aux) if dead_latents is not None else dead_latent_list(dead_mask, k_aux)
    if plan is None:
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, W_enc, b_enc, b_pre))
        plan = plan_topk_encode(backend, x.device, dtype=x.dtype, k=k, k_aux=k_dead,
                                n_subset=0 if dead is None else dead.numel(), needs_grad=needs_grad,
                                sparse_grad=sparse_grad, weight=W_enc, weight_copies=weight_copies, select=select)
    b_enc = b_enc.to(x.dtype)
    b_pre = b_pre.to(x.dtype) if b_pre is not None else None
    return run_plan(plan, x, W_enc, b_enc, k, b_pre, dead, k_dead, weight_compute)
