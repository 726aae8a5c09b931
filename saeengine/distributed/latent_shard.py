"""A TopK SAE whose latents are split across the latent axis of a :class:`Mesh`.

Latent rank r owns the latents [lo, hi) (:func:`~saeengine.distributed.mesh.latent_slice`):
rows lo..hi of W_enc, b_enc and W_dec, their optimizer state and dead-latent counters;
b_dec and the normalization statistics are replicated. A forward on the N tokens of one
data rank (the same N on every rank of a latent group):

1. local top-k over the slice: relu((x~ - b_dec) W_enc[lo:hi]^T + b_enc[lo:hi]), k
   (value, global latent) pairs per token, packed into one int64 key each (below);
2. one all_gather of the N x k keys over the latent group (N x (k + k_aux) with AuxK);
3. the exact global top-k of the P x k candidates per token: a top-k of the keys;
4. each rank decodes the winners it owns (its local candidates whose key reaches the
   token's k-th winning key; the others are zeroed) and one all_reduce sums the N x d
   partial reconstructions (stacked with AuxK's); b_dec is added once, after the sum.

Keys and ties. A key is ``(fp32 bits of the value) << 32 | (0x7FFFFFFF - latent)``: the
values are >= +0, so their bits order like the floats, and on equal values the lower
global latent wins. This is the rule of saeengine's fused GPU encoder
(kernels/topk_encode.py), applied by both stages here, so the sharded selection is
exactly the single-device one on the GPU paths. (saeengine's CPU and torch encoders leave
the order of equal values open, so there the single-device code may pick other latents
among equal values, in practice the zero padding of tokens with fewer than k positive
pre-activations, which decode to nothing; the sharded code asks those encoders for one
candidate more and re-chooses the rows tied at the cut by keys, :func:`_retie`.) Keys are
unique per token, so "a winner" is exactly "a key >= the token's k-th winning key".

Backward (autograd through saeengine's own ops, plus two collectives written as autograd
Functions, the pattern of Megatron's tensor-parallel regions): the all_reduce of the
partial reconstructions passes the (replicated) gradient through unchanged, so each rank
gets the gradients of its own rows from the winners it owns; the input of the encoder
(x~ - b_dec) is the one place where the slices' contributions must be summed: an
all_reduce of b_dec's encoder gradient ([d]) when x needs no gradient (training), of the
N x d input gradient when it does.

Data axis: each data rank has its own tokens; the FVU's denominator is the global
batch's total variance (float64 sums all_reduced over the data group), so each rank's
loss is its share of the global-batch loss and :func:`allreduce_data_grads_` *sums* the
gradients over the data group: the result is the single-process gradient of the global
batch, up to the order of float sums.

AuxK: each rank's dead latents are its own slice's (a [hi - lo] mask); the global number
of dead latents S (an all_reduce of one count over the latent group) sets the width
min(k_aux, S); each rank offers its best min(width, S_r) dead candidates (padded with the
key -1, below every real key) in the same all_gather as the main code; the winners are
decoded without bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import losses, ops
from ..config import SAEConfig
from ..errors import ConfigError, DataError
from ..ops import _checks
from ..ops.code import SparseCode
from ..sae import SAE
from . import comm
from .mesh import Mesh

PAD_KEY = -1
_LOW = 0x7FFFFFFF
INIT_BLOCK_ROWS = 4096  # rows of W_dec drawn from one generator at init (mesh-independent)


# ----- keys -----------------------------------------------------------------------------------

def pack_keys(values: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """values [N, m] >= +0 (any float dtype), latents [N, m] global ids < 2^31 -> int64 keys
    ordered by (value descending, latent ascending)."""
    bits = values.detach().float().contiguous().view(torch.int32).to(torch.int64)
    return (bits << 32) | (_LOW - latents.to(torch.int64))


def unpack_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 keys -> (values fp32, latents int64); padding keys (< 0) give (0, 0)."""
    real = keys >= 0
    values = (keys >> 32).to(torch.int32).view(torch.float32)
    latents = _LOW - (keys & 0xFFFFFFFF)
    return torch.where(real, values, 0.0), torch.where(real, latents, 0)


def topk_keys(keys: torch.Tensor, k: int) -> torch.Tensor:
    """keys [N, m] -> the k largest per row [N, k], descending (keys are unique per row,
    so this is exact whatever torch.topk's tie handling)."""
    return keys.topk(k, dim=1, sorted=True).values


def _pad_keys(keys: torch.Tensor, width: int) -> torch.Tensor:
    if keys.shape[1] == width:
        return keys
    pad = torch.full((keys.shape[0], width - keys.shape[1]), PAD_KEY, dtype=keys.dtype, device=keys.device)
    return torch.cat([keys, pad], 1)


# ----- the two collectives as autograd Functions --------------------------------------------

class _SumOverGroup(torch.autograd.Function):
    """Forward: all_reduce (sum) over the group; backward: the gradient as it is (every
    rank computes the same loss from the summed tensor)."""

    @staticmethod
    def forward(ctx, tensor, group, what):
        return comm.all_reduce(tensor.clone(), group, axis="latent", what=what)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class _GradSumOverGroup(torch.autograd.Function):
    """Forward: identity (the tensor is replicated over the group); backward: all_reduce
    of the gradient (each rank's encoder slice contributed part of it)."""

    @staticmethod
    def forward(ctx, tensor, group, what):
        ctx.group, ctx.what = group, what
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_reduce(grad.contiguous().clone(), ctx.group, axis="latent", what=ctx.what), None, None


# ----- local selection -------------------------------------------------------------------------

@dataclass
class LocalCandidates:
    """One rank's candidates: ``values`` [N, m] differentiable (x's dtype), ``local`` [N, m]
    int64 rows of the slice, ``keys`` [N, m] int64 (PAD_KEY past the real ones)."""

    values: torch.Tensor
    local: torch.Tensor
    keys: torch.Tensor


def _exact_topk(scores: torch.Tensor, k: int, lo: int) -> torch.Tensor:
    """scores [N, F_r] (>= 0 where eligible, -1 where not) -> [N, k] positions of the k
    best by (score descending, latent ascending). A float top-(k+1) picks them; only the
    rows whose k-th and (k+1)-th scores are equal (a tie straddling the cut: rare but for
    zero padding) are chosen again by keys, the tie rule made exact."""
    f_r = scores.shape[1]
    if k == f_r:
        return torch.arange(f_r, device=scores.device).expand(scores.shape[0], f_r).clone()
    values, pos = scores.topk(k + 1, dim=1)
    pos = pos[:, :k].clone()
    tied = values[:, k] == values[:, k - 1]
    if bool(tied.any()):
        rows = torch.nonzero(tied).squeeze(1)
        sub = scores[rows]
        latents = torch.arange(lo, lo + f_r, device=scores.device).expand_as(sub)
        keys = torch.where(sub >= 0, pack_keys(sub.clamp_min(0), latents), PAD_KEY)
        pos[rows] = (_LOW - (topk_keys(keys, k) & 0xFFFFFFFF)) - lo
    return pos


def _select_reference(xc, W_enc, b_enc, lo, k, dead_local, width):
    """The torch path (CPU; the oracle): pre [N, F_r] materialized once for the main and
    the AuxK selection, both with the keys' tie rule."""
    pre = torch.relu(xc @ W_enc.to(xc.dtype).T + b_enc.to(xc.dtype))
    n, f_r = pre.shape
    scores = pre.detach()
    out = []

    def cands(pos, width_total):
        chosen = scores.gather(1, pos)
        chosen = torch.where(chosen > 0, chosen, 0.0)  # -0.0 -> +0.0 for the key order
        return LocalCandidates(pre.gather(1, pos), pos, _pad_keys(pack_keys(chosen, pos + lo), width_total))

    out.append(cands(_exact_topk(scores, min(k, f_r), lo), k))
    if width:
        w_r = min(width, int(dead_local.sum()))
        if w_r:
            out.append(cands(_exact_topk(torch.where(dead_local[None, :], scores, -1.0), w_r, lo), width))
        else:
            out.append(_no_candidates(xc, n, width))
    return out


def _no_candidates(xc, n, width):
    zeros = torch.zeros(n, 1, dtype=xc.dtype, device=xc.device)
    return LocalCandidates(zeros, torch.zeros(n, 1, dtype=torch.int64, device=xc.device),
                           torch.full((n, width), PAD_KEY, dtype=torch.int64, device=xc.device))


# The implementation whose selection is documented to break ties towards the lower
# latent (the keys' rule): the fused Triton encoder. The others get the +1 and _retie.
_TIE_EXACT = ("fused",)


def _select_op(xc, W_enc, b_enc, lo, k, dead_local, width, backend):
    """saeengine's encoder (ops.topk_encode) on the slice; its sparse backward gives the
    slice's gradients. An implementation that leaves the order of tied values open (the
    CPU and torch paths) is asked for one candidate more: the rows whose k-th and
    (k+1)-th values are equal (a tie straddling the cut) are chosen again, exactly
    (:func:`_retie`)."""
    f_r = W_enc.shape[0]
    k_r = min(k, f_r)
    dead = torch.nonzero(dead_local).squeeze(1) if width else None
    s_r = int(dead.numel()) if dead is not None else 0
    w_r = min(width, s_r)
    b_enc = b_enc.to(xc.dtype)
    plan = ops.plan_topk_encode(backend, xc.device, dtype=xc.dtype, k=k_r, k_aux=w_r, n_subset=s_r,
                                needs_grad=torch.is_grad_enabled(), weight=W_enc)
    extra = 0 if plan.main in _TIE_EXACT and (plan.auxk is None or plan.auxk in _TIE_EXACT) else 1
    ask, ask_aux = min(k_r + extra, f_r), min(w_r + extra, s_r)
    code = ops.topk_encode(xc, W_enc, b_enc, ask, dead_latents=dead if w_r else None, k_aux=ask_aux,
                           backend=backend, check=False)
    out = [_cands(*_retie(code.values, code.indices, k_r, xc, W_enc, b_enc, lo, None), lo, k)]
    if width:
        out.append(_cands(*_retie(code.aux.values, code.aux.indices, w_r, xc, W_enc, b_enc, lo, dead_local), lo,
                          width) if w_r else _no_candidates(xc, xc.shape[0], width))
    return out


def _cands(values, local, lo, width_total):
    chosen = values.detach().float()
    chosen = torch.where(chosen > 0, chosen, 0.0)  # -0.0 -> +0.0 for the key order
    return LocalCandidates(values, local, _pad_keys(pack_keys(chosen, local + lo), width_total))


def _retie(values, local, k, xc, W_enc, b_enc, lo, eligible):
    """(values [N, m], local [N, m]) with m = k or k + 1 -> the k best by the keys' rule.
    Rows with a tie at the cut are recomputed densely (their pre-activations over the
    slice; ``eligible`` [F_r] bool restricts to the dead latents) and their values
    regathered differentiably."""
    if values.shape[1] == k:
        return values, local
    tied = values[:, k].detach() == values[:, k - 1].detach()
    values, local = values[:, :k], local[:, :k]
    if not bool(tied.any()):
        return values, local
    rows = torch.nonzero(tied).squeeze(1)
    with torch.no_grad():
        scores = torch.relu(xc[rows] @ W_enc.to(xc.dtype).T + b_enc)
        if eligible is not None:
            scores = torch.where(eligible[None, :], scores, -1.0)
        pos = _exact_topk(scores, k, lo)
    w = W_enc.to(xc.dtype)[pos]                                               # [R, k, d]
    regathered = torch.relu(torch.einsum("rd,rkd->rk", xc[rows], w) + b_enc[pos])
    return values.index_put((rows,), regathered), local.index_put((rows,), pos)


def _uses_reference(backend: str) -> bool:
    return backend == "reference"


# ----- the sharded forward -------------------------------------------------------------------

@dataclass
class ShardedCode:
    """The global code, replicated on the latent group: ``values`` [N, k] (fp32, no
    gradient), ``indices`` [N, k] global latent ids; ``aux`` the AuxK code or None."""

    values: torch.Tensor
    indices: torch.Tensor
    aux: "ShardedCode | None" = None

    def as_sparse_code(self) -> SparseCode:
        return SparseCode(self.values, self.indices, None if self.aux is None else self.aux.as_sparse_code())


def sharded_topk_decode(xn: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
                        b_dec: torch.Tensor, k: int, mesh: Mesh, lo: int, *, dead_local: torch.Tensor | None = None,
                        k_aux: int = 0, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None,
                                                                        ShardedCode, int]:
    """The latent-sharded TopK encode + decode of one rank (module docstring).

    Args:
        xn: [N, d] normalized input in the compute dtype, the same on every latent rank.
        W_enc, W_dec: [F_r, d] this slice's rows; b_enc [F_r]; b_dec [d] (replicated).
        k: latents per token (<= F). lo: the slice's first global latent.
        dead_local: [F_r] bool, the slice's dead latents (AuxK), or None.
        k_aux: AuxK's k (0: no AuxK).
    Returns:
        (recon [N, d] with b_dec, AuxK's decode e_hat [N, d] or None, the global
        :class:`ShardedCode`, the AuxK width min(k_aux, S)).
    """
    group = mesh.latent_group
    n = xn.shape[0]
    # The encoder's input: replicated forward, its gradient summed over the slices.
    if xn.requires_grad:
        xc = _GradSumOverGroup.apply(xn - b_dec.to(xn.dtype), group, "input_grad")
    else:
        xc = xn - _GradSumOverGroup.apply(b_dec, group, "b_dec_grad").to(xn.dtype)
    width = 0
    if dead_local is not None and k_aux > 0:
        count = dead_local.sum().reshape(1).to(torch.int64)
        width = min(k_aux, int(comm.all_reduce(count, group, axis="latent", what="dead_count")))
    if _uses_reference(backend):
        cands = _select_reference(xc, W_enc, b_enc, lo, k, dead_local, width)
    else:
        cands = _select_op(xc, W_enc, b_enc, lo, k, dead_local, width, backend)
    widths = [k] + ([width] if width else [])
    gathered = comm.all_gather(torch.cat([c.keys for c in cands], 1), group, axis="latent",
                               what="topk_candidates")                                   # [P, N, k + width]
    partials, codes, start = [], [], 0
    for c, w in zip(cands, widths):
        winners = topk_keys(gathered[:, :, start:start + w].permute(1, 0, 2).reshape(n, -1), w)  # [N, w]
        start += w
        kth = winners[:, -1:]
        real = c.keys[:, :c.values.shape[1]]
        owned = (real >= kth) & (real >= 0)
        values = torch.where(owned, c.values, torch.zeros((), dtype=c.values.dtype, device=c.values.device))
        partials.append(ops.sparse_decode(values, c.local, W_dec, None, backend=backend, check=False))
        v, i = unpack_keys(winners)
        codes.append(ShardedCode(v, i))
    summed = _SumOverGroup.apply(torch.stack(partials).float(), group, "partial_recon")
    recon = summed[0] + b_dec.float()
    e_hat = summed[1] if width else None
    code = codes[0]
    code.aux = codes[1] if width else None
    return recon, e_hat, code, width


# ----- the module ------------------------------------------------------------------------------

@dataclass
class ShardedForwardOutput:
    """What :meth:`LatentShardedSAE.forward` returns (the fields of SAE.forward's output).

    recon: [N, d_in] reconstruction in the raw input space (replicated on the latent group).
    code: :class:`ShardedCode`, the global code.
    fvu, auxk_loss, loss: scalars; with a data axis, this data rank's share (sum over
        the data group = the global batch's value).
    """

    recon: torch.Tensor
    code: ShardedCode
    fvu: torch.Tensor
    auxk_loss: torch.Tensor
    loss: torch.Tensor

    @property
    def l0(self) -> torch.Tensor:
        return (self.code.values > 0).sum(1).float().mean()


def _init_rows(lo: int, hi: int, d: int, seed: int | None) -> torch.Tensor:
    """Unit-norm random rows lo..hi of W_dec, each block of INIT_BLOCK_ROWS rows from its own
    generator: the same full matrix whatever the mesh (not SAE(cfg, seed)'s matrix; use
    :meth:`LatentShardedSAE.from_sae` for that)."""
    out = torch.empty(hi - lo, d)
    for block in range(lo // INIT_BLOCK_ROWS, (hi - 1) // INIT_BLOCK_ROWS + 1):
        gen = torch.Generator().manual_seed((seed or 0) * 1_000_003 + block)
        rows = torch.randn(INIT_BLOCK_ROWS, d, generator=gen)
        b0 = block * INIT_BLOCK_ROWS
        a, b = max(lo, b0), min(hi, b0 + INIT_BLOCK_ROWS)
        out[a - lo:b - lo] = rows[a - b0:b - b0]
    return out / out.norm(dim=1, keepdim=True)


class LatentShardedSAE(nn.Module):
    """This rank's slice of a TopK SAE (module docstring).

    ``cfg`` is the full SAE's config (d_sae = F); the slice is ``[lo, hi)``. Parameters:
    W_enc [F_r, d_in], b_enc [F_r], W_dec [F_r, d_in] (unit rows), b_dec [d_in]
    (replicated); buffers norm_mean [d_in], norm_scale [] (replicated).

    Example (under torchrun, 4 processes)::

        mesh = init_mesh("data=2,latent=2")
        sae = LatentShardedSAE.from_sae(SAE(cfg, seed=0), mesh)    # or LatentShardedSAE(cfg, mesh, seed=0)
        out = sae(x_local)                  # x_local: this data rank's tokens [N, d_in]
        out.loss.backward(); allreduce_data_grads_(sae)
    """

    def __init__(self, cfg: SAEConfig, mesh: Mesh, *, device: torch.device | str | None = None,
                 seed: int | None = None):
        super().__init__()
        if cfg.architecture != "topk":
            raise ConfigError(f"architecture={cfg.architecture!r}: latent sharding supports 'topk' only; train other "
                              "architectures with saeengine.train, or one SAE per rank (--per-rank)")
        self.cfg, self.mesh = cfg, mesh
        self.lo, self.hi = mesh.latent_slice(cfg.d_sae)
        device = torch.device(device) if device is not None else mesh.device
        dtype = cfg.torch_dtype
        w_dec = (torch.empty(self.hi - self.lo, cfg.d_in) if device.type == "meta"  # shapes only (from_sae)
                 else _init_rows(self.lo, self.hi, cfg.d_in, seed))
        self.W_dec = nn.Parameter(w_dec.to(device=device, dtype=dtype))
        self.W_enc = nn.Parameter(w_dec.clone().to(device=device, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(self.hi - self.lo, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, device=device, dtype=dtype))
        self.register_buffer("norm_mean", torch.zeros(cfg.d_in, device=device, dtype=torch.float32))
        self.register_buffer("norm_scale", torch.ones((), device=device, dtype=torch.float32))

    @property
    def d_slice(self) -> int:
        return self.hi - self.lo

    @classmethod
    @torch.no_grad()
    def from_sae(cls, sae, mesh: Mesh, device: torch.device | str | None = None) -> "LatentShardedSAE":
        """This rank's slice of a full :class:`saeengine.SAE` (weights and normalization copied)."""
        out = cls(sae.cfg, mesh, device="meta")
        lo, hi = out.lo, out.hi
        device = torch.device(device) if device is not None else mesh.device
        out.W_enc = nn.Parameter(sae.W_enc[lo:hi].detach().clone().to(device))
        out.b_enc = nn.Parameter(sae.b_enc[lo:hi].detach().clone().to(device))
        out.W_dec = nn.Parameter(sae.W_dec[lo:hi].detach().clone().to(device))
        out.b_dec = nn.Parameter(sae.b_dec.detach().clone().to(device))
        out.norm_mean = sae.norm_mean.detach().clone().to(device)
        out.norm_scale = sae.norm_scale.detach().clone().to(device)
        return out

    # ----- forward -----------------------------------------------------------------------------
    # The full SAE's fit, with its checks: it reads cfg and writes the replicated buffers
    # norm_mean, norm_scale only, so trainer.init.init_from_sample runs on a slice (the
    # same sample on every rank gives the same statistics everywhere).
    fit_normalization = SAE.fit_normalization

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.normalization == "none":
            return x.float()
        return (x.float() - self.norm_mean) / self.norm_scale

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.normalization == "none":
            return x
        return x.float() * self.norm_scale + self.norm_mean

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None, *, backend: str = "auto",
                check: bool = True, k: int | None = None) -> ShardedForwardOutput:
        """x [N, d_in] raw, this data rank's tokens (the same on every rank of its latent
        group), N >= 2; dead_mask [hi - lo] bool, this slice's dead latents (AuxK); k
        overrides cfg.k for this call (k annealing; in [1, d_sae], the same on every rank)."""
        cfg = self.cfg
        if k is not None and not (isinstance(k, int) and 1 <= k <= cfg.d_sae):
            raise ValueError(f"k={k!r}: it must be a whole number in [1, d_sae={cfg.d_sae}] (or None: cfg.k)")
        _checks.check_matrix("x", x, cols=cfg.d_in, what=f"[N, d_in={cfg.d_in}]")
        _checks.check_float("x", x)
        if x.shape[0] < 2:
            raise DataError(f"forward computes the batch's FVU, which needs N >= 2 rows, got {x.shape[0]}")
        if check:
            _checks.check_finite("x", x)
        if dead_mask is not None:
            _checks.check_vector("dead_mask", dead_mask, self.d_slice)
            if dead_mask.dtype != torch.bool:
                raise ValueError(f"dead_mask must be a bool tensor [{self.d_slice}] (this slice's latents), "
                                 f"got {dead_mask.dtype}")
        x32 = self.normalize(x)
        xn = x32.to(self.W_enc.dtype)
        recon, e_hat, code, width = sharded_topk_decode(
            xn, self.W_enc, self.b_enc, self.W_dec, self.b_dec, k or cfg.k, self.mesh, self.lo,
            dead_local=dead_mask, k_aux=cfg.effective_k_aux if dead_mask is not None else 0, backend=backend)
        total_var = global_total_variance(x32, self.mesh)
        fvu = losses.fvu(x32, recon, total_var)
        auxk = (losses.auxk_loss(x32, recon, e_hat, width, cfg.effective_k_aux, total_var) if e_hat is not None
                else torch.zeros((), device=x.device))
        return ShardedForwardOutput(self.denormalize(recon).to(x.dtype), code, fvu, auxk, fvu + cfg.aux_alpha * auxk)

    # ----- what optimizers and the trainer read ------------------------------------------------
    def parameter_roles(self) -> dict[str, str]:
        """As :meth:`saeengine.SAE.parameter_roles` (the slice's rows are latent rows)."""
        return {name: ("decoder_rows" if name == "W_dec" else "encoder_rows" if name in ("W_enc", "b_enc")
                       else "dense") for name, _ in self.named_parameters()}

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).tiny)

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        if self.W_dec.grad is not None:
            self.W_dec.grad -= (self.W_dec.grad * self.W_dec).sum(1, keepdim=True) * self.W_dec

    def fired_counts(self, code: ShardedCode) -> torch.Tensor:
        """[hi - lo] int64: how many tokens of this batch fired each latent of the slice
        (sum it over the data group for the dead-latent counters of the global batch)."""
        owned = (code.indices >= self.lo) & (code.indices < self.hi) & (code.values > 0)
        counts = torch.zeros(self.d_slice, dtype=torch.int64, device=code.indices.device)
        return counts.index_add_(0, (code.indices - self.lo)[owned], torch.ones_like(code.indices[owned]))

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The full SAE's weights (W_enc, b_enc, W_dec [F, ...], b_dec, norm stats) on every
        rank of the latent group: an all_gather of the slices (padded to the widest)."""
        p, f = self.mesh.latent_size, self.cfg.d_sae
        out = {}
        from .mesh import latent_slices

        slices = latent_slices(f, p)
        widest = max(hi - lo for lo, hi in slices)
        for name in ("W_enc", "b_enc", "W_dec"):
            t = getattr(self, name).detach()
            padded = torch.zeros((widest, *t.shape[1:]), dtype=t.dtype, device=t.device)
            padded[:t.shape[0]] = t
            parts = comm.all_gather(padded, self.mesh.latent_group, axis="latent", what="full_state")
            out[name] = torch.cat([parts[r, :hi - lo] for r, (lo, hi) in enumerate(slices)])
        out["b_dec"] = self.b_dec.detach().clone()
        out["norm_mean"], out["norm_scale"] = self.norm_mean.clone(), self.norm_scale.clone()
        return out


def global_total_variance(x32: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """The FVU's denominator ||x - mean(x)||^2 over the global batch (all data ranks): the
    batch's own (saeengine.losses.total_variance) without a data axis, else from float64
    sums (sum x, sum ||x||^2, N) all_reduced over the data group."""
    if mesh.data_size == 1:
        return losses.total_variance(x32)
    x64 = x32.detach().double()
    stats = torch.cat([x64.sum(0), x64.pow(2).sum().reshape(1),
                       torch.tensor([x64.shape[0]], dtype=torch.float64, device=x64.device)])
    comm.all_reduce(stats, mesh.data_group, axis="data", what="total_variance")
    s, q, n = stats[:-2], stats[-2], stats[-1]
    return (q - s.pow(2).sum() / n).float().clamp_min(torch.finfo(torch.float32).tiny)


@torch.no_grad()
def allreduce_data_grads_(module: nn.Module, mesh: Mesh | None = None, *,
                          extra: torch.Tensor | None = None) -> torch.Tensor | None:
    """Sum every parameter's gradient over the data group, in one flat bucket (one
    all_reduce). With the global-batch FVU of :meth:`LatentShardedSAE.forward` this gives
    the single-process gradient of the global batch. A parameter without a gradient
    takes part as zeros (every rank must issue the same collective).

    extra: a 1-D float tensor summed over the data group in the same bucket (the step's
    metrics and fired flags ride along instead of costing a collective of their own);
    returns its sum (extra itself without a data axis), or None."""
    mesh = mesh if mesh is not None else module.mesh
    if mesh.data_size == 1:
        return extra
    params = list(module.parameters())
    tail = [] if extra is None else [extra.reshape(-1).float()]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                      for p in params] + tail)
    comm.all_reduce(flat, mesh.data_group, axis="data", what="grads")
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n
    # a copy: a view would keep the whole gradient bucket alive as long as the caller keeps the sums
    return None if extra is None else flat[offset:].view_as(extra).to(extra.dtype, copy=True)


def train_step(module: LatentShardedSAE, optimizer, x: torch.Tensor, dead_mask: torch.Tensor | None = None,
               *, backend: str = "auto") -> ShardedForwardOutput:
    """One step: forward, backward, the data-axis gradient sum, ``optimizer.step()`` (a
    saeengine.optim optimizer built over ``module``: DenseAdam applies the decoder
    constraints row by row, local to the slice). Clipping needs a global norm: refused."""
    if getattr(optimizer, "max_grad_norm", 0.0):
        raise ConfigError("clip_grad_norm with latent sharding needs the norm over every slice, which this step "
                          "does not compute yet; set clip_grad_norm=0")
    out = module(x, dead_mask, backend=backend, check=False)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    allreduce_data_grads_(module)
    optimizer.step()
    return out
