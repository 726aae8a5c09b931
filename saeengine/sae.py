"""The SAE module: parameters, normalization, and encode / decode / forward through its
architecture.

Layout (rows of both weight matrices are latents): W_enc [F, d], b_enc [F],
W_dec [F, d] with unit-norm rows, b_dec [d]. What differs between architectures (their
extra state, encoder, penalty and training decode) is one class each in
:mod:`saeengine.architectures`; the losses are :mod:`saeengine.losses`.

Codes: "topk", "batchtopk" and "matryoshka" give a :class:`SparseCode` ([N, k] values
and latent indices; "batchtopk" pads each batch to its largest count, one host sync);
"relu" and "jumprelu" give a :class:`~saeengine.architectures.DenseCode` ([N, F]
activations, decoded by one matmul, no host sync). :meth:`SAE.decode` takes either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import losses
from .architectures import Code, DenseCode, Kernels, auxk_request, check_k, decode_code, get_architecture
from .config import SAEConfig
from .errors import DataError, NonFiniteError
from .ops import _checks
from .ops.code import SparseCode


@dataclass
class ForwardOutput:
    """What :meth:`SAE.forward` returns.

    recon: [N, d_in] reconstruction in the raw (un-normalized) input space.
    code: the code (SparseCode [N, k] or DenseCode [N, F]); ``code.aux`` is the AuxK code
         when computed.
    fvu: scalar, ||x~ - x^||^2 / ||x~ - mean(x~)||^2 over the batch (normalized space;
         defined for N >= 2), of the full reconstruction.
    auxk_loss: scalar AuxK loss ||e - e^||^2 / ||x~ - mean(x~)||^2 (0 without dead latents).
    loss: fvu + aux_alpha * auxk_loss; for "matryoshka" the mean FVU of its prefixes
         replaces fvu (saeengine.losses).
    sparsity: scalar sparsity penalty of "relu" (L1) and "jumprelu" (L0), else 0. Not in
         ``loss``: its coefficient (and warm-up) is a training setting.
    """

    recon: torch.Tensor
    code: Code
    fvu: torch.Tensor
    auxk_loss: torch.Tensor
    loss: torch.Tensor
    sparsity: torch.Tensor | None = None

    @property
    def l0(self) -> torch.Tensor:
        """Mean number of active latents per token."""
        return (self.code.values > 0).sum(1).float().mean()


MIN_RELATIVE_SPREAD = 1e-5  # fit_normalization: a smaller spread (relative to the mean) counts as none


def _compute_dtype(param_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return param_dtype


class SAE(nn.Module):
    """A sparse autoencoder. ``SAE(cfg)`` initializes; :meth:`load` reads a checkpoint.

    ``sae.architecture`` is the strategy object of ``cfg.architecture``
    (saeengine.architectures), with ``selects_k`` and ``uses_auxk`` telling whether a k
    and dead latents apply.

    Example::

        sae = SAE(SAEConfig(d_in=768, d_sae=16384, k=32))
        out = sae(x)                        # x [N, 768]
        code = sae.encode(x)                # values, indices [N, 32]
        x_hat = sae.decode(code)            # [N, 768]
    """

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None, seed: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.architecture = get_architecture(cfg.architecture)(cfg)
        dtype = cfg.torch_dtype
        if device is not None and torch.device(device).type == "meta":
            w_dec = torch.empty(cfg.d_sae, cfg.d_in, device="meta")  # shapes only (checkpoint loading)
        else:
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            w_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=gen, dtype=torch.float32)
            w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec.to(device=device, dtype=dtype))
        # Encoder starts as the decoder's transpose (rows are latents in both).
        self.W_enc = nn.Parameter(w_dec.clone().to(device=device, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, device=device, dtype=dtype))
        self.register_buffer("norm_mean", torch.zeros(cfg.d_in, device=device, dtype=torch.float32))
        self.register_buffer("norm_scale", torch.ones((), device=device, dtype=torch.float32))
        self.architecture.add_state(self, device)

    # ----- normalization -------------------------------------------------------------
    @torch.no_grad()
    def fit_normalization(self, sample: torch.Tensor) -> None:
        """Estimate the "mean_norm" statistics from a sample [M, d_in] of activations.

        The sample is checked whatever the normalization (the same data feeds training):
        a non-finite value (also one that overflows float32) raises NonFiniteError naming
        its first row; an empty sample raises DataError. For "mean_norm", fewer than 2
        rows, or rows without spread (a scale under MIN_RELATIVE_SPREAD of the mean's RMS:
        normalizing would divide by ~0), raise DataError too.
        """
        _checks.check_matrix("sample", sample, cols=self.cfg.d_in, what=f"[M, d_in={self.cfg.d_in}]")
        _checks.check_float("sample", sample)
        sample = sample.to(device=self.norm_mean.device, dtype=torch.float32)
        _checks.check_finite("sample", sample, "clean the activations before fitting the normalization")
        needed = 1 if self.cfg.normalization == "none" else 2
        if sample.shape[0] < needed:
            raise DataError(f"sample has {sample.shape[0]} rows; fit_normalization needs at least {needed} rows of "
                            "activations (a few thousand give stable statistics)")
        if self.cfg.normalization == "none":
            return
        mean = sample.mean(0)
        scale = (sample - mean).norm(dim=1).mean() / math.sqrt(self.cfg.d_in)
        if not bool(torch.isfinite(scale)):
            raise NonFiniteError(f"sample's spread overflows float32 (max |value| {float(sample.abs().max()):.3g}); "
                                 "rescale the activations before fitting the normalization")
        # Equal rows leave float32 rounding (~1e-7 of their size) as spread, not 0.
        rms_mean = float(mean.norm()) / math.sqrt(self.cfg.d_in)
        floor = max(MIN_RELATIVE_SPREAD * rms_mean, torch.finfo(torch.float32).tiny)
        if not float(scale) > floor:
            raise DataError(f"sample's {sample.shape[0]} rows are all equal (spread {float(scale):.3g}): "
                            "normalization='mean_norm' would divide by that scale; fit it on varied activations, "
                            "or use normalization='none'")
        self.norm_mean.copy_(mean)
        self.norm_scale.copy_(scale)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.normalization == "none":
            return x
        return ((x.float() - self.norm_mean) / self.norm_scale).to(x.dtype)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.normalization == "none":
            return x
        return (x.float() * self.norm_scale + self.norm_mean).to(x.dtype)

    def _normalized(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, d_in] raw -> (x~ [N, d_in] in fp32, for the losses; x~ cast once to the
        compute dtype, for the encoder)."""
        x32 = x.float()
        if self.cfg.normalization != "none":
            x32 = (x32 - self.norm_mean) / self.norm_scale
        return x32, x32.to(_compute_dtype(self.W_enc.dtype, x.device))

    # ----- encode / decode / forward ---------------------------------------------------
    def _check_input(self, x: torch.Tensor, check: bool) -> None:
        _checks.check_matrix("x", x, cols=self.cfg.d_in, what=f"[N, d_in={self.cfg.d_in}]")
        _checks.check_nonempty("x", x)
        _checks.check_float("x", x)
        if x.device != self.W_enc.device:
            raise ValueError(f"x is on {x.device} but the SAE is on {self.W_enc.device}; "
                             f"move one of them (x.to({str(self.W_enc.device)!r}) or sae.to(...))")
        if check:
            _checks.check_finite("x", x)

    def encode(self, x: torch.Tensor, *, backend: str = "auto", check: bool = True) -> Code:
        """x [N, d_in] raw activations -> the code: SparseCode (values, indices [N, k]) or
        DenseCode (values [N, F]; "relu", "jumprelu").

        ``check`` raises on non-finite activations (one host sync).
        """
        self._check_input(x, check)
        _, xn = self._normalized(x)
        return self.architecture.encode(self, xn, k=self.cfg.k, auxk=None, kernels=Kernels(backend)).code

    def decode(self, code: Code, *, backend: str = "auto") -> torch.Tensor:
        """A SparseCode or a DenseCode -> [N, d_in] reconstruction in the raw input space
        (the full dictionary, for every architecture)."""
        if not isinstance(code, (SparseCode, DenseCode)):
            raise TypeError(f"decode takes the code that encode returns (a SparseCode or a DenseCode), got "
                            f"{type(code).__name__}; wrap dense activations [N, d_sae] as DenseCode(values)")
        if isinstance(code, DenseCode):  # a SparseCode's layout is checked by ops.sparse_decode
            _checks.check_matrix("code.values", code.values, cols=self.cfg.d_sae, what=f"[N, d_sae={self.cfg.d_sae}]")
        return self.denormalize(decode_code(self, code, backend))

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None, *,
                backend: str = "auto", check: bool = True, k: int | None = None,
                sparse_grad: bool = False, weight_copies: bool | None = None,
                dead_latents: torch.Tensor | None = None) -> ForwardOutput:
        """Normalize (fp32, cast once to the compute dtype) -> encode -> decode -> losses.

        Args:
            x: [N, d_in] raw activations, N >= 2 (the FVU is over the batch; DataError otherwise).
            dead_mask: [d_sae] bool, True for dead latents: AuxK over them (architectures
                with ``uses_auxk``); listing them is one host sync.
            backend: op backend (see saeengine.backends).
            check: raise on non-finite x, and validate ``dead_latents`` (host syncs).
            k: overrides cfg.k for this call (k annealing in the trainer; architectures
                with ``selects_k``), in [1, d_sae].
            sparse_grad: W_enc's and W_dec's gradients become sparse COO tensors of the
                chosen latents' rows on the GPU and CPU paths of the sparse codes (for
                RowSparseAdam; no [d_sae, d_in] gradient buffers). Dense codes give
                dense gradients.
            weight_copies: under mixed precision, True gives the GPU kernels one
                compute-dtype copy of W_enc and W_dec per call (fastest), False lets them
                read the fp32 weights directly (2 bytes per weight less; slower where the
                gathers of wide AuxK codes dominate), None (default) lets the op plans
                choose from the GPU's memory.
            dead_latents: [S] int64 ascending, the dead latents listed instead of
                ``dead_mask`` (no sync: the trainer lists them ahead, see
                saeengine.optim.dead_latents_later).
        Returns:
            :class:`ForwardOutput` (recon [N, d_in] in x's dtype, the code, scalar fvu,
            auxk_loss, loss and sparsity).
        """
        self._check_input(x, check)
        if x.shape[0] < 2:
            raise DataError(f"forward computes the batch's FVU, which needs N >= 2 rows, got {x.shape[0]}; for the "
                            "reconstruction of single rows use sae.decode(sae.encode(x))")
        check_k(self.architecture, k)
        # None when AuxK is off, or nothing is dead (or k_aux = 0)
        auxk = auxk_request(self.architecture, x, dead_mask, dead_latents, check)
        kernels = Kernels(backend, sparse_grad, weight_copies)
        x32, xn = self._normalized(x)
        encoding = self.architecture.encode(self, xn, k=k or self.cfg.k, auxk=auxk, kernels=kernels)
        rec = self.architecture.reconstruct(self, xn, encoding, kernels)
        aux_width = encoding.code.aux.values.shape[1] if rec.aux is not None else 0
        terms = losses.sae_losses(x32, rec.recons, rec.aux, aux_width, self.cfg.effective_k_aux, self.cfg.aux_alpha)
        sparsity = encoding.penalty if encoding.penalty is not None else torch.zeros((), device=x.device)
        return ForwardOutput(self.denormalize(rec.recons[-1].to(x.dtype)), encoding.code, terms.fvu, terms.auxk,
                             terms.loss, sparsity)

    # ----- parameter roles (what optimizers and resampling read) -------------------------
    def parameter_roles(self) -> dict[str, str]:
        """Each parameter's role, by name, for optimizers and resampling (none of them
        hard-codes parameter names):

        - ``"encoder_rows"``: indexed by latent in dim 0 (W_enc [F, d], b_enc [F],
          log_threshold [F]); a latent that did not fire gets no gradient there.
        - ``"decoder_rows"``: W_dec [F, d]; rows kept at unit norm, the gradient component
          parallel to each row removed.
        - ``"dense"``: everything else (b_dec [d]), updated every step.
        """
        roles = {}
        for name, _ in self.named_parameters():
            roles[name] = ("decoder_rows" if name == "W_dec" else
                           "encoder_rows" if name in ("W_enc", "b_enc", "log_threshold") else "dense")
        return roles

    # ----- decoder constraints (used by the trainer) -------------------------------------
    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Project every decoder row back to unit norm."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).tiny)

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Remove from W_dec.grad the component parallel to each (unit) decoder row."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(1, keepdim=True)
        self.W_dec.grad -= parallel * self.W_dec

    # ----- checkpoints ------------------------------------------------------------------
    def save(self, directory: str | Path, provenance: dict | None = None, *, format: str = "saeengine") -> Path:
        """Write ``sae.safetensors`` and ``config.json`` to ``directory`` (atomically each,
        with the weights' SHA-256; a poisoned SAE raises NonFiniteError: see
        :mod:`saeengine.checkpoint`). ``format="saelens"`` or ``"sparsify"`` writes that
        library's layout instead (:mod:`saeengine.interop`; CheckpointError when it
        cannot hold this SAE exactly)."""
        if format != "saeengine":
            from . import interop

            return interop.save(self, directory, format)
        from .checkpoint import save_sae

        return save_sae(self, directory, provenance)

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str = "cpu") -> "SAE":
        """Read a checkpoint written by :meth:`save`, verified (checksum, every field, the
        tensors' shapes, finiteness: :mod:`saeengine.checkpoint`); a CheckpointError names
        the file and the field."""
        from .checkpoint import load_sae

        return load_sae(directory, device)

    @classmethod
    def from_pretrained(cls, path_or_repo: str | Path, *, format: str = "auto", hookpoint: str | None = None,
                        device: torch.device | str = "cpu", allow_download: bool = False) -> "SAE":
        """An SAE saved by saeengine or another library (SAELens, sparsify, saev,
        dictionary_learning, overcomplete), converted exactly or refused with a
        CheckpointError naming the file and field: :func:`saeengine.interop.from_pretrained`.
        ``path_or_repo`` may be a Hugging Face id, read from the local cache only unless
        ``allow_download=True``."""
        from . import interop

        return interop.from_pretrained(path_or_repo, format=format, hookpoint=hookpoint, device=device,
                                       allow_download=allow_download)
