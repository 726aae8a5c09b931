"""The SAE module: parameters, normalization, encode / decode / forward.

Layout (rows of both weight matrices are latents): W_enc [F, d], b_enc [F],
W_dec [F, d] with unit-norm rows, b_dec [d]. The fast path never builds the [N, F]
pre-activation matrix for "topk"; the other architectures use the torch reference.

Codes of "relu", "jumprelu" and "batchtopk" have a variable number of active latents
per token; :meth:`SAE.encode` returns them as a padded :class:`SparseCode` whose width
is the largest count in the batch (padding slots have value 0), so every architecture
decodes through the same sparse path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import ops
from .backends import resolve_backend
from .config import SAEConfig
from .ops import _checks
from .ops.code import SparseCode
from .ops.jumprelu import jumprelu, step_l0

BATCHTOPK_THRESHOLD_MOMENTUM = 0.99


@dataclass
class ForwardOutput:
    """What :meth:`SAE.forward` returns.

    recon: [N, d_in] reconstruction in the raw (un-normalized) input space.
    code: the sparse code ([N, k]); ``code.aux`` is the AuxK code when computed.
    fvu: scalar, ||x~ - x^||^2 / ||x~ - mean(x~)||^2 over the batch (normalized space;
         defined for N >= 2).
    auxk_loss: scalar AuxK loss ||e - e^||^2 / ||x~ - mean(x~)||^2 (0 without dead latents).
    loss: fvu + aux_alpha * auxk_loss.
    sparsity: scalar sparsity penalty of "relu" (L1) and "jumprelu" (L0), else 0. Not in
         ``loss``: its coefficient (and warm-up) is a training setting.
    """

    recon: torch.Tensor
    code: SparseCode
    fvu: torch.Tensor
    auxk_loss: torch.Tensor
    loss: torch.Tensor
    sparsity: torch.Tensor | None = None

    @property
    def l0(self) -> torch.Tensor:
        """Mean number of active latents per token."""
        return (self.code.values > 0).sum(1).float().mean()


def _compute_dtype(param_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return param_dtype


def _padded_code(act: torch.Tensor, backend: str = "auto") -> SparseCode:
    """Dense non-negative activations [N, F] -> padded SparseCode (one host sync).

    The columns come from ops.topk_select (the CUDA radix select on GPUs); the values are
    gathered from ``act``, so gradients flow to it."""
    width = max(int((act > 0).sum(1).max()), 1)
    select_backend = backend if backend in ("torch", "cuda") else "auto"
    _, indices = ops.topk_select(act.detach(), width, backend=select_backend)
    return SparseCode(act.gather(1, indices), indices)


class SAE(nn.Module):
    """A sparse autoencoder. ``SAE(cfg)`` initializes; :meth:`load` reads a checkpoint.

    Example::

        sae = SAE(SAEConfig(d_in=768, d_sae=16384, k=32))
        out = sae(x)                        # x [N, 768]
        code = sae.encode(x)                # values, indices [N, 32]
        x_hat = sae.decode(code)            # [N, 768]
    """

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None, seed: int | None = None):
        super().__init__()
        self.cfg = cfg
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
        if cfg.architecture == "jumprelu":
            init = math.log(cfg.jumprelu_threshold)
            self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), init, device=device, dtype=torch.float32))
        if cfg.architecture == "batchtopk":
            # NaN until training has seen a batch; inference then uses batch top-k.
            self.register_buffer("threshold", torch.full((), float("nan"), device=device, dtype=torch.float32))

    # ----- normalization -------------------------------------------------------------
    @torch.no_grad()
    def fit_normalization(self, sample: torch.Tensor) -> None:
        """Estimate the "mean_norm" statistics from a sample [M, d_in] of activations."""
        if self.cfg.normalization == "none":
            return
        sample = sample.to(device=self.norm_mean.device, dtype=torch.float32)
        mean = sample.mean(0)
        scale = (sample - mean).norm(dim=1).mean() / math.sqrt(self.cfg.d_in)
        self.norm_mean.copy_(mean)
        self.norm_scale.copy_(scale.clamp_min(torch.finfo(torch.float32).tiny))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.normalization == "none":
            return x
        return ((x.float() - self.norm_mean) / self.norm_scale).to(x.dtype)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.normalization == "none":
            return x
        return (x.float() * self.norm_scale + self.norm_mean).to(x.dtype)

    # ----- encode / decode -------------------------------------------------------------
    def _check_input(self, x: torch.Tensor, check: bool) -> None:
        _checks.check_matrix("x", x, cols=self.cfg.d_in, what=f"[N, d_in={self.cfg.d_in}]")
        _checks.check_nonempty("x", x)
        _checks.check_float("x", x)
        if x.device != self.W_enc.device:
            raise ValueError(f"x is on {x.device} but the SAE is on {self.W_enc.device}; "
                             f"move one of them (x.to({str(self.W_enc.device)!r}) or sae.to(...))")
        if check:
            _checks.check_finite("x", x)

    def _cast(self, dtype: torch.dtype, *names: str):
        """The named parameters in the compute dtype (a no-op without autocast)."""
        return tuple(getattr(self, name).to(dtype) for name in names)

    def _encode_normalized(self, xn: torch.Tensor, dead_latents: torch.Tensor | None, backend: str,
                           k: int | None = None, sparse_grad: bool = False,
                           weight_copies: bool = True) -> SparseCode:
        """``dead_latents`` [S] ascending: AuxK's latents (topk, batchtopk), or None for no AuxK code."""
        cfg = self.cfg
        k = k or cfg.k
        if cfg.architecture == "topk":  # fp32 parameters go in as master weights (no cast copies' grads)
            return ops.topk_encode(xn, self.W_enc, self.b_enc, k, b_pre=self.b_dec, dead_latents=dead_latents,
                                   k_aux=cfg.effective_k_aux if dead_latents is not None else 0,
                                   backend=backend, sparse_grad=sparse_grad, check=False,
                                   weight_compute=None if weight_copies else self.W_enc.detach())
        W_enc, b_enc, b_dec = self._cast(xn.dtype, "W_enc", "b_enc", "b_dec")
        pre = (xn - b_dec) @ W_enc.T + b_enc  # dense [N, F]: reference path of these architectures
        if cfg.architecture == "relu":
            act = torch.relu(pre)
            code = _padded_code(act, backend)
            code.penalty = act.float().sum(1).mean()  # L1 (decoder rows have unit norm)
            return code
        if cfg.architecture == "jumprelu":
            threshold = self.log_threshold.exp().to(pre.dtype)
            code = _padded_code(jumprelu(pre, threshold, cfg.jumprelu_bandwidth), backend)
            code.penalty = step_l0(pre, threshold, cfg.jumprelu_bandwidth).float().sum(1).mean()
            return code
        act = torch.relu(pre)
        code = self._batchtopk(act, k)
        if dead_latents is not None:  # non-empty, with k_aux >= 1 (SAE.forward sees to it)
            values, positions = act[:, dead_latents].topk(min(cfg.effective_k_aux, dead_latents.numel()), dim=1)
            code.aux = SparseCode(values, dead_latents[positions])
        return code

    def _batchtopk(self, act: torch.Tensor, k: int) -> SparseCode:
        n = act.shape[0]
        if not self.training and not bool(torch.isnan(self.threshold)):
            return _padded_code(torch.where(act > self.threshold.to(act.dtype), act, torch.zeros_like(act)))
        flat = act.reshape(-1)
        values, positions = flat.topk(min(n * k, flat.numel()))
        kept = torch.zeros_like(flat).scatter(0, positions, values).reshape(act.shape)
        if self.training:
            with torch.no_grad():  # EMA of the smallest kept activation, with no host sync
                positive = torch.where(values > 0, values, torch.full_like(values, float("inf")))
                low, old = positive.min().float(), self.threshold
                m = BATCHTOPK_THRESHOLD_MOMENTUM
                updated = torch.where(torch.isnan(old), low, m * old + (1 - m) * low)
                self.threshold.copy_(torch.where(torch.isfinite(low), updated, old))
        return _padded_code(kept)

    def _dense_auxk(self, dead_latents: torch.Tensor | None, k_dead: int, backend: str, device: torch.device) -> bool:
        """Whether this step's AuxK code (width k_dead) goes through dense GEMMs over the dead
        latents (a TopK SAE on a GPU backend with few enough dead: see
        saeengine.ops.dense_auxk) rather than through the encoder's sparse kernels."""
        if dead_latents is None or self.cfg.architecture != "topk":
            return False
        if resolve_backend(backend, "topk_encode", device) == "torch":
            return False
        return ops.use_dense_auxk(dead_latents.numel(), k_dead)

    def _dead_list(self, x: torch.Tensor, dead_mask: torch.Tensor | None, dead_latents: torch.Tensor | None,
                   check: bool) -> torch.Tensor | None:
        """AuxK's dead latents [S] ascending (None when AuxK is off), from either form;
        ``check`` also checks a given list's shape, dtype and range (a host sync)."""
        if dead_mask is None and dead_latents is None:
            return None
        if self.cfg.architecture not in ("topk", "batchtopk"):
            raise ValueError(f"dead_mask/AuxK applies to topk and batchtopk SAEs, not {self.cfg.architecture!r}")
        if dead_mask is not None and dead_latents is not None:
            raise ValueError("give the dead latents as dead_mask or as dead_latents, not both")
        if dead_latents is not None:
            if dead_latents.device != x.device:
                raise ValueError(f"dead_latents is on {dead_latents.device} but x is on {x.device}; move one of them")
            if check:
                _checks.check_latent_list("dead_latents", dead_latents, self.cfg.d_sae)
            return dead_latents
        _checks.check_vector("dead_mask", dead_mask, self.cfg.d_sae)
        if dead_mask.dtype != torch.bool or dead_mask.device != x.device:
            raise ValueError(f"dead_mask must be a bool tensor on {x.device}; got {dead_mask.dtype} on {dead_mask.device}")
        return torch.nonzero(dead_mask).squeeze(1)  # the one host sync of AuxK: the list's length

    def encode(self, x: torch.Tensor, *, backend: str = "auto", check: bool = True) -> SparseCode:
        """x [N, d_in] raw activations -> SparseCode (values, indices [N, k]).

        ``check`` raises on non-finite activations (one host sync).
        """
        self._check_input(x, check)
        xn = self.normalize(x.to(_compute_dtype(self.W_enc.dtype, x.device)))
        return self._encode_normalized(xn, None, backend)

    def decode(self, code: SparseCode, *, backend: str = "auto") -> torch.Tensor:
        """SparseCode -> [N, d_in] reconstruction in the raw input space."""
        out = ops.sparse_decode(code.values, code.indices, self.W_dec, self.b_dec, backend=backend,
                                latent_index=code.latent_index)
        return self.denormalize(out)

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None, *,
                backend: str = "auto", check: bool = True, k: int | None = None,
                sparse_grad: bool = False, weight_copies: bool = True,
                dead_latents: torch.Tensor | None = None) -> ForwardOutput:
        """x [N, d_in]; dead_mask [d_sae] bool marks dead latents for AuxK (topk, batchtopk;
        listing them is one host sync), or ``dead_latents`` [S] int64 ascending lists them
        (no sync: the trainer lists them ahead, see saeengine.optim.dead_latents_later);
        ``k`` overrides cfg.k for this call (k annealing in the trainer); ``sparse_grad``
        makes W_enc's and W_dec's gradients sparse COO tensors of the chosen latents' rows
        on the GPU paths (for RowSparseAdam; no [d_sae, d_in] gradient buffers);
        ``weight_copies=False`` lets the GPU kernels read the fp32 W_enc and W_dec directly
        instead of one compute-dtype copy of each per call (under bf16 autocast: 2 bytes
        per weight less; slower where the gathers of wide AuxK codes dominate)."""
        self._check_input(x, check)
        if k is not None and (self.cfg.architecture not in ("topk", "batchtopk") or not 1 <= k <= self.cfg.d_sae):
            raise ValueError(f"k={k} applies to topk and batchtopk SAEs and must lie in [1, d_sae={self.cfg.d_sae}]"
                             f" (this SAE is {self.cfg.architecture!r})")
        # None when nothing is dead (or k_aux = 0): no AuxK code
        dead, k_dead = ops.auxk_latents(self._dead_list(x, dead_mask, dead_latents, check), self.cfg.effective_k_aux)
        dtype = _compute_dtype(self.W_enc.dtype, x.device)
        xn = self.normalize(x.to(dtype))
        dense_aux = self._dense_auxk(dead, k_dead, backend, x.device)
        code = self._encode_normalized(xn, None if dense_aux else dead, backend, k, sparse_grad, weight_copies)
        codes = [(code.values, code.indices, code.latent_index)]
        if code.aux is not None:  # one decode node for both codes: one W_dec gradient buffer
            codes.append((code.aux.values, code.aux.indices, code.aux.latent_index))
        x_hat, *aux_out = ops.sparse_decode_codes(codes, self.W_dec, self.b_dec, backend=backend,
                                                  sparse_grad=sparse_grad,
                                                  weight_compute=None if weight_copies else self.W_dec.detach())
        if dense_aux:
            code.aux, e_hat = ops.auxk_dense(xn - self.b_dec.to(xn.dtype), self.W_enc, self.b_enc, self.W_dec,
                                             dead, k_dead)
            aux_out = [e_hat]
        xn32 = xn.float()
        err = xn32 - x_hat.float()
        total_var = (xn32 - xn32.mean(0)).pow(2).sum().clamp_min(torch.finfo(torch.float32).tiny)
        fvu = err.pow(2).sum() / total_var
        auxk = torch.zeros((), device=x.device)
        if aux_out:
            e_hat = aux_out[0]
            # Scaled by min(#dead / k_aux, 1) (the aux width over k_aux): a handful of dead
            # latents should not carry the full weight of the loss.
            scale = code.aux.values.shape[1] / self.cfg.effective_k_aux
            auxk = scale * (err.detach() - e_hat.float()).pow(2).sum() / total_var
        loss = fvu + self.cfg.aux_alpha * auxk
        sparsity = code.penalty if code.penalty is not None else torch.zeros((), device=x.device)
        return ForwardOutput(self.denormalize(x_hat.to(x.dtype)), code, fvu, auxk, loss, sparsity)

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
    def save(self, directory: str | Path, provenance: dict | None = None) -> Path:
        """Write ``sae.safetensors`` and ``config.json`` to ``directory`` (atomically each)."""
        from .checkpoint import save_sae

        return save_sae(self, directory, provenance)

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str = "cpu") -> "SAE":
        """Read a checkpoint written by :meth:`save`; errors name the file and the field."""
        from .checkpoint import load_sae

        return load_sae(directory, device)
