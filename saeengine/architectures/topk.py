"""TopK (Gao et al. 2024): the k largest relu pre-activations per token, by the fused
encoder (the [N, F] pre-activations never exist on the GPU paths), decoded sparsely; AuxK
selects a second code over the dead latents.

:func:`decode_sparse` is the decode of every sparse architecture (BatchTopK and Matryoshka
reuse it): the codes and the AuxK code in one decoder node, so W_dec gets one gradient
buffer (or one set of sparse rows).
"""

from __future__ import annotations

import torch

from .. import ops
from .base import Architecture, AuxK, Encoding, Kernels, Reconstruction, register


@register
class TopK(Architecture):
    name = "topk"
    selects_k = True
    uses_auxk = True

    def encode(self, sae, xn, *, k, auxk, kernels):
        # One plan for the call (saeengine.ops.topk_encode.plan): it decides, among the
        # rest, whether the AuxK code goes through dense GEMMs over the dead latents,
        # which this SAE runs when decoding (it has W_dec).
        plan = ops.plan_topk_encode(kernels.backend, xn.device, dtype=xn.dtype, k=k,
                                    k_aux=auxk.width if auxk is not None else 0,
                                    n_subset=auxk.latents.numel() if auxk is not None else 0,
                                    needs_grad=torch.is_grad_enabled() and sae.W_enc.requires_grad,
                                    sparse_grad=kernels.sparse_grad, weight=sae.W_enc,
                                    weight_copies=kernels.weight_copies, allow_dense_auxk=True)
        code = ops.topk_encode(xn, sae.W_enc, sae.b_enc, k, b_pre=sae.b_dec,
                               dead_latents=auxk.latents if auxk is not None else None,
                               k_aux=auxk.width if auxk is not None else 0, plan=plan, check=False)
        dense = plan.auxk == "dense"
        return Encoding(code, dense_auxk=auxk if dense else None, dense_auxk_select=plan.auxk_select or "auto")

    def reconstruct(self, sae, xn, encoding, kernels):
        return decode_sparse(sae, xn, encoding, [encoding.code.values], kernels)


def decode_sparse(sae, xn: torch.Tensor, encoding: Encoding, values: list[torch.Tensor],
                  kernels: Kernels) -> Reconstruction:
    """Decode each entry of ``values`` ([N, k] over ``encoding.code.indices``; the code's
    own values, or masked copies of them) plus b_dec, and the AuxK code (no bias).

    xn [N, d_in] is the normalized input (the dense AuxK path encodes it). Sets
    ``encoding.code.aux`` when the AuxK code is selected here (dense AuxK).
    """
    code = encoding.code
    codes = [(v, code.indices, code.latent_index) for v in values]
    if code.aux is not None:
        codes.append((code.aux.values, code.aux.indices, code.aux.latent_index))
    out = ops.sparse_decode_codes(codes, sae.W_dec, sae.b_dec, backend=kernels.backend,
                                  sparse_grad=kernels.sparse_grad, weight_copies=kernels.weight_copies)
    recons = out[:len(values)]
    # sparse_decode_codes adds b_dec to its first output only
    recons[1:] = [r + sae.b_dec.to(r.dtype) for r in recons[1:]]
    aux = out[len(values)] if code.aux is not None else None
    if encoding.dense_auxk is not None:
        dead = encoding.dense_auxk
        code.aux, aux = ops.auxk_dense(xn - sae.b_dec.to(xn.dtype), sae.W_enc, sae.b_enc, sae.W_dec,
                                       dead.latents, dead.width, select=encoding.dense_auxk_select)
    return Reconstruction(recons, aux)
