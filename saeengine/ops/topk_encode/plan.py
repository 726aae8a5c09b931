"""The plan of one topk_encode call: which implementation runs each part.

Every special case of the encoder lives here and nowhere else: which implementation
selects the main code and the AuxK code, which select the chunked parts use, which
backward runs, and whether the kernels read a compute-dtype copy of the weights or the
fp32 master weights. :func:`plan_topk_encode` is a pure function of the request, the
device and the call's shape; the plan it returns prints, logs once per shape at INFO
(logger ``saeengine``), and can be asserted on. ``ops.topk_encode(..., plan=...)`` runs a
given plan as it is.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import torch

from saeengine.backends import BackendUnavailableError, choose

from .dense_auxk import use_dense_auxk

log = logging.getLogger("saeengine")

# A wide code over a subset (AuxK: k_aux = d/2 = 512 over the dead latents) is selected
# densely, chunk by chunk, when the main code runs fused: the fused selection cost grows
# with k (k=512 over 26k dead latents took 10.3 ms on an H100, 3x the full F=2^18 GEMM),
# while the subset's GEMM is small. The backward stays sparse either way.
FUSED_MAX_SUBSET_K = 128

# With weight_copies=None the plan reads the fp32 master weights directly once the two
# compute-dtype copies (W_enc and W_dec) would take more than this share of the GPU.
MASTER_WEIGHTS_MEMORY_SHARE = 0.10
WEIGHT_COPIES_ENV = "SAEENGINE_WEIGHT_COPIES"


@dataclass(frozen=True)
class TopKEncodePlan:
    """What runs one topk_encode call.

    main: the main code's implementation: "reference", "cpu", "fused" or "chunked".
    main_select: the topk_select implementation of a chunked main code ("reference" or
        "radix"), else None.
    auxk: the AuxK code's implementation ("reference", "cpu", "fused", "chunked", or "dense":
        GEMMs over the dead latents, run by the caller with the decoder, see
        ops.auxk_dense), or None without an AuxK code.
    auxk_select: the topk_select implementation of a chunked or dense AuxK code, else None.
    backward: "autograd" (through the reference), "segment-sum" (the sparse by-latent
        backward: Triton kernels, or torch ops for main="cpu"), or None when no gradient
        is needed.
    weight_read: "as-is" (the weights are in the compute dtype), "copy" (one
        compute-dtype copy per call) or "master" (the kernels read fp32 master weights,
        rounding as they load).
    sparse_grad: W_enc's gradient is a sparse COO tensor of the chosen rows.
    """

    main: str
    main_select: str | None = None
    auxk: str | None = None
    auxk_select: str | None = None
    backward: str | None = None
    weight_read: str = "as-is"
    sparse_grad: bool = False

    def __str__(self) -> str:
        def part(name, select):
            return f"{name}[select={select}]" if select else str(name)

        return (f"topk_encode(main={part(self.main, self.main_select)}, auxk={part(self.auxk, self.auxk_select)}, "
                f"backward={self.backward}, weights={self.weight_read}, sparse_grad={self.sparse_grad})")

    @property
    def uses_kernels(self) -> bool:
        return self.main != "reference"


def weight_read_for(weight: torch.Tensor, dtype: torch.dtype, weight_copies: bool | None,
                    honours_master: bool = True) -> str:
    """How kernels read ``weight`` [F, d] for compute in ``dtype``: "as-is", "copy" or
    "master". ``weight_copies``: True/False forces copy/master (SAEENGINE_WEIGHT_COPIES=1/0
    does too, for the automatic choice); None chooses master only where two compute-dtype
    copies of this weight's size would pass MASTER_WEIGHTS_MEMORY_SHARE of the GPU."""
    if weight.dtype == dtype:
        return "as-is"
    if weight_copies is None:
        env = os.environ.get(WEIGHT_COPIES_ENV, "").strip()
        if env not in ("", "0", "1"):
            raise ValueError(f"{WEIGHT_COPIES_ENV}={env!r}; use 1 (copies), 0 (read the fp32 weights) or unset")
        if env:
            weight_copies = env == "1"
        elif weight.is_cuda:
            total = _device_memory(weight.device)
            weight_copies = 2 * weight.numel() * torch.finfo(dtype).bits // 8 <= MASTER_WEIGHTS_MEMORY_SHARE * total
        else:
            weight_copies = True
    if not weight_copies and not honours_master:
        return "copy"
    return "copy" if weight_copies else "master"


@functools.lru_cache(maxsize=None)
def _device_memory(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).total_memory


def _select_for(select: str, encoder_named: bool, device: torch.device, k: int, dtype: torch.dtype) -> str:
    """The topk_select implementation of a chunked part. A named chunked encoder takes
    the radix kernel wherever it can run this selection (named, so not gated), else the
    reference; "auto" chooses as topk_select does."""
    if select == "auto" and encoder_named:
        try:
            return choose("radix", "topk_select", device, k=k, dtype=dtype).name
        except BackendUnavailableError:
            return "reference"
    return choose(select, "topk_select", device, k=k, dtype=dtype).name


def plan_topk_encode(backend: str, device: torch.device | str, *, dtype: torch.dtype, k: int,
                     k_aux: int = 0, n_subset: int = 0, needs_grad: bool = False, sparse_grad: bool = False,
                     weight: torch.Tensor | None = None, weight_copies: bool | None = None,
                     allow_dense_auxk: bool = False, select: str = "auto") -> TopKEncodePlan:
    """The plan of a topk_encode call.

    Args:
        backend: "auto", an implementation ("reference", "fused", "chunked") or a family
            ("torch", "triton", "cuda").
        device, dtype: where and in which dtype the call computes.
        k: the main code's width. k_aux: the AuxK code's width (0: no AuxK code), chosen
            among n_subset latents.
        needs_grad: a gradient will be taken. sparse_grad: W_enc's gradient must be a
            sparse COO tensor of the chosen rows.
        weight: W_enc (its dtype and size decide the weight read), or None.
        weight_copies: True/False forces a compute-dtype copy / the fp32 master weights;
            None lets the plan choose (see :func:`weight_read_for`).
        allow_dense_auxk: the caller decodes too and can run the AuxK code as dense
            GEMMs over the subset (the SAE does): the plan may then say auxk="dense".
        select: the topk_select request of chunked parts ("auto" or a topk_select name).
    Raises:
        BackendUnavailableError: a named implementation cannot run this call or honour
            one of its flags.
    """
    device = torch.device(device)
    flags = ("sparse_grad",) if (needs_grad and sparse_grad) else ()
    wants_master = weight is not None and weight.dtype != dtype and weight_copies is False
    main_flags = flags + (("master_weights",) if wants_master else ())
    main_impl = choose(backend, "topk_encode", device, k=k, dtype=dtype, flags=main_flags)
    override = os.environ.get("SAEENGINE_BACKEND", "").strip().lower()
    named = backend.strip().lower() != "auto" or override not in ("", "auto")
    main = main_impl.name
    weight_read = (weight_read_for(weight, dtype, weight_copies, "master_weights" in main_impl.flags)
                   if weight is not None else "as-is")
    auxk = None
    if k_aux:
        if allow_dense_auxk and main != "reference" and use_dense_auxk(n_subset, k_aux):
            auxk = "dense"
        elif main == "fused" and k_aux > FUSED_MAX_SUBSET_K:
            auxk = "chunked"  # the plan's rule for this part, named fused or not: shown in the plan
        else:
            auxk = choose(main, "topk_encode", device, k=k_aux, dtype=dtype, flags=main_flags).name
    main_select = _select_for(select, named, device, k, dtype) if main == "chunked" else None
    auxk_select = _select_for(select, named, device, k_aux, dtype) if auxk in ("chunked", "dense") else None
    backward = None if not needs_grad else ("autograd" if main == "reference" else "segment-sum")
    plan = TopKEncodePlan(main, main_select, auxk, auxk_select, backward, weight_read, bool(flags))
    _log_plan(plan, device.type, k, k_aux, n_subset)  # a cache hit formats nothing
    return plan


@functools.lru_cache(maxsize=1024)
def _log_plan(plan: TopKEncodePlan, device: str, k: int, k_aux: int, n_subset: int) -> None:
    log.info("saeengine: %s on %s for k=%d, k_aux=%d over %d latents", plan, device, k, k_aux, n_subset)
