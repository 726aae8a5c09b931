"""Functional ops, one folder each: the torch reference, the implementations' launchers and
autograd, and the plan that says which implementation runs each part of a call.

``backend=`` takes "auto", an implementation name or a family (saeengine.backends). Each
op's torch reference sits beside it (``*_ref``): CPU path, test oracle, baseline.
"""

from .code import SparseCode
from .latent_index import LatentIndex, build_latent_index, latent_weighted_rowsum_ref
from .sparse_decode import (SparseDecodePlan, compute_copy, plan_sparse_decode, sparse_decode,
                            sparse_decode_backward_ref, sparse_decode_codes, sparse_decode_ref)
from .topk_encode import (TopKEncodePlan, auxk_dense, auxk_latents, dead_latent_list, plan_topk_encode, topk_encode,
                          topk_encode_ref, use_dense_auxk)
from .topk_select import topk_select, topk_select_ref

__all__ = [
    "LatentIndex",
    "SparseCode",
    "SparseDecodePlan",
    "TopKEncodePlan",
    "auxk_dense",
    "auxk_latents",
    "build_latent_index",
    "compute_copy",
    "dead_latent_list",
    "latent_weighted_rowsum_ref",
    "plan_sparse_decode",
    "plan_topk_encode",
    "sparse_decode",
    "sparse_decode_backward_ref",
    "sparse_decode_codes",
    "sparse_decode_ref",
    "topk_encode",
    "topk_encode_ref",
    "topk_select",
    "topk_select_ref",
    "use_dense_auxk",
]
