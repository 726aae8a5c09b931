"""SAE architectures, one small strategy class per file (see :mod:`.base` for the protocol).

Registered by name, in this order: "topk", "batchtopk", "relu", "jumprelu", "matryoshka".
"""

from .base import (Architecture, AuxK, Code, Encoding, Kernels, Reconstruction, architecture_names, auxk_request,
                   check_k, decode_code, get_architecture, register)
from .dense import DenseCode, dense_decode
from . import topk, batchtopk, relu, jumprelu, matryoshka  # noqa: E402,F401  (registers them, in this order)

__all__ = [
    "Architecture",
    "AuxK",
    "Code",
    "DenseCode",
    "Encoding",
    "Kernels",
    "Reconstruction",
    "architecture_names",
    "auxk_request",
    "check_k",
    "decode_code",
    "dense_decode",
    "get_architecture",
    "register",
]
