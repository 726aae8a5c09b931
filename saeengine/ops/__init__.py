"""Functional ops with backend dispatch (``backend="auto" | "torch" | "triton" | "cuda"``).

Each op's torch reference sits beside it (``*_ref``): CPU path, test oracle, baseline.
"""

from .code import SparseCode
from .dense_auxk import auxk_dense, use_dense_auxk
from .latent_index import LatentIndex, build_latent_index, latent_weighted_rowsum_ref
from .sparse_decode import (compute_copy, sparse_decode, sparse_decode_backward_ref, sparse_decode_codes,
                            sparse_decode_ref)
from .topk_encode import auxk_latents, dead_latent_list, topk_encode, topk_encode_ref
from .topk_select import topk_select, topk_select_ref

__all__ = [
    "LatentIndex",
    "SparseCode",
    "auxk_dense",
    "build_latent_index",
    "compute_copy",
    "auxk_latents",
    "dead_latent_list",
    "latent_weighted_rowsum_ref",
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
