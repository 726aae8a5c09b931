"""The architecture protocol, what its calls return, and the registry by name.

An architecture is one small class in one file of this package:

- ``check_config(cfg)``: its own SAEConfig fields, with errors that name them;
- ``add_state(sae, device)``: the parameters and buffers it keeps on the SAE (saved in
  checkpoints: JumpReLU's ``log_threshold``, BatchTopK's ``threshold``, ...);
- ``encode(sae, xn, ...)``: the code of normalized inputs, and the sparsity penalty of the
  penalized architectures (:class:`Encoding`);
- ``reconstruct(sae, xn, encoding, ...)``: how a training forward decodes: the
  reconstructions whose FVUs make the loss, and AuxK's (:class:`Reconstruction`).

:class:`saeengine.SAE` owns the shared parameters, the normalization and the losses
(:mod:`saeengine.losses`) and calls these in that order. Every method gets the SAE module
to read its parameters; an architecture object holds no tensors. Add one with
``@register`` and an import in ``saeengine/architectures/__init__.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Union

import torch

from .. import ops
from ..ops import _checks
from ..ops.code import SparseCode
from .dense import DenseCode, dense_decode

if TYPE_CHECKING:
    from ..config import SAEConfig

Code = Union[SparseCode, DenseCode]


@dataclass(frozen=True)
class Kernels:
    """How the ops of one call run (the SAE.forward arguments of the same names)."""

    backend: str = "auto"
    sparse_grad: bool = False
    weight_copies: bool | None = None  # None: the op plans choose the weight reads


@dataclass
class AuxK:
    """The AuxK code a training forward asks for: ``latents`` [S] int64 ascending (the
    dead ones, S >= 1) and its ``width`` min(k_aux, S)."""

    latents: torch.Tensor
    width: int


@dataclass
class Encoding:
    """What ``encode`` returns.

    code: the code ([N, k] SparseCode, or [N, F] DenseCode); ``code.aux`` holds the AuxK
        code when the encoder selected it.
    penalty: scalar sparsity penalty of the batch ("relu": L1, "jumprelu": L0), else None.
    dense_auxk: the AuxK code still to select, by dense GEMMs over the dead latents when
        decoding (saeengine.ops.auxk_dense), or None.
    dense_auxk_select: the topk_select implementation of that selection (from the plan).
    """

    code: Code
    penalty: torch.Tensor | None = None
    dense_auxk: AuxK | None = None
    dense_auxk_select: str = "auto"


@dataclass
class Reconstruction:
    """What ``reconstruct`` returns, in the normalized space and the compute dtype.

    recons: [N, d_in] reconstructions whose FVUs are averaged into the loss; the last is
        the full dictionary's (the SAE's output).
    aux: [N, d_in] AuxK's reconstruction of the residual (no bias), or None.
    """

    recons: list[torch.Tensor]
    aux: torch.Tensor | None = None


class Architecture:
    """Base of the architectures (see the module docstring)."""

    name: ClassVar[str]
    selects_k: ClassVar[bool] = False  # k latents per token (or per batch): cfg.k and forward's k apply
    uses_auxk: ClassVar[bool] = False  # takes dead latents for an AuxK code

    def __init__(self, cfg: "SAEConfig"):
        self.cfg = cfg

    @classmethod
    def check_config(cls, cfg: "SAEConfig") -> None:
        """Raise ValueError naming a field of ``cfg`` this architecture cannot use."""

    def add_state(self, sae: torch.nn.Module, device) -> None:
        """Register this architecture's own parameters and buffers on ``sae``."""

    def encode(self, sae, xn: torch.Tensor, *, k: int, auxk: AuxK | None, kernels: Kernels) -> Encoding:
        """xn [N, d_in] normalized inputs in the compute dtype -> :class:`Encoding`.
        ``k`` is cfg.k or forward's override; ``auxk`` is None at inference."""
        raise NotImplementedError

    def reconstruct(self, sae, xn: torch.Tensor, encoding: Encoding, kernels: Kernels) -> Reconstruction:
        """The reconstructions of a training forward (default: the code decoded once)."""
        return Reconstruction([decode_code(sae, encoding.code, kernels.backend)])


_REGISTRY: dict[str, type[Architecture]] = {}


def register(cls: type[Architecture]) -> type[Architecture]:
    """Class decorator: make ``cls`` available as ``SAEConfig(architecture=cls.name)``."""
    _REGISTRY[cls.name] = cls
    return cls


def architecture_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_architecture(name: str) -> type[Architecture]:
    if name not in _REGISTRY:
        raise ValueError(f"architecture={name!r}; choose one of {architecture_names()}")
    return _REGISTRY[name]


def _names_where(flag: str) -> str:
    return ", ".join(name for name, cls in _REGISTRY.items() if getattr(cls, flag))


def check_k(architecture: Architecture, k: int | None) -> None:
    """forward's ``k`` override: only for the architectures that select k, in [1, d_sae]."""
    d_sae = architecture.cfg.d_sae
    if k is not None and (not architecture.selects_k or not isinstance(k, int) or isinstance(k, bool)
                          or not 1 <= k <= d_sae):
        raise ValueError(f"k={k!r} applies to {_names_where('selects_k')} SAEs and must be an int in "
                         f"[1, d_sae={d_sae}] (this SAE is {architecture.name!r})")


def auxk_request(architecture: Architecture, x: torch.Tensor, dead_mask: torch.Tensor | None,
                 dead_latents: torch.Tensor | None, check: bool) -> AuxK | None:
    """forward's dead latents, given as ``dead_mask`` [F] bool (listing them is one host
    sync) or as ``dead_latents`` [S] int64 ascending (none; ``check`` validates the list,
    one sync) -> the AuxK code to select, or None when AuxK is off or nothing is dead."""
    if dead_mask is None and dead_latents is None:
        return None
    cfg = architecture.cfg
    if not architecture.uses_auxk:
        raise ValueError(f"dead_mask/AuxK applies to {_names_where('uses_auxk')} SAEs, not {architecture.name!r}")
    if dead_mask is not None and dead_latents is not None:
        raise ValueError("give the dead latents as dead_mask or as dead_latents, not both")
    if dead_latents is not None:
        if dead_latents.device != x.device:
            raise ValueError(f"dead_latents is on {dead_latents.device} but x is on {x.device}; move one of them")
        if check:
            _checks.check_latent_list("dead_latents", dead_latents, cfg.d_sae)
    else:
        _checks.check_vector("dead_mask", dead_mask, cfg.d_sae)
        if dead_mask.dtype != torch.bool or dead_mask.device != x.device:
            raise ValueError(f"dead_mask must be a bool tensor on {x.device}; got {dead_mask.dtype} on {dead_mask.device}")
        dead_latents = torch.nonzero(dead_mask).squeeze(1)  # the one host sync of AuxK: the list's length
    latents, width = ops.auxk_latents(dead_latents, cfg.effective_k_aux)
    return AuxK(latents, width) if latents is not None else None


def pre_activations(sae, xn: torch.Tensor) -> torch.Tensor:
    """Dense pre-activations (xn - b_dec) W_enc^T + b_enc [N, F] in xn's dtype: the
    encoder of the architectures that look at every latent (batchtopk, relu, jumprelu)."""
    W_enc, b_enc, b_dec = (p.to(xn.dtype) for p in (sae.W_enc, sae.b_enc, sae.b_dec))
    return (xn - b_dec) @ W_enc.T + b_enc


def decode_code(sae, code: Code, backend: str = "auto") -> torch.Tensor:
    """A code of any architecture -> [N, d_in] in the normalized space: a DenseCode by one
    matmul, a SparseCode by the sparse decoder."""
    if isinstance(code, DenseCode):
        return dense_decode(code.values, sae.W_dec, sae.b_dec)
    return ops.sparse_decode(code.values, code.indices, sae.W_dec, sae.b_dec, backend=backend,
                             latent_index=code.latent_index)
