"""Controlled interventions: edit chosen SAE latents at chosen token positions of one layer,
keep the SAE's error term, and read a frozen head's outputs before and after.

The primitive (saev's): at the edited layer every token x becomes

    x' = (x - x_hat) + decode(z')   ==   x + (decode(z') - decode(z)),

where z = encode(x), x_hat = decode(z), and z' is z with latent j_i set to
``scales[i] * maxima[j_i]`` (or to ``scales[i]`` itself when ``maxima`` is None) at the
chosen positions. x' runs through the rest of the model and the head. It is built on
``backbones.splice(error_term=True)``, so an edit that leaves the code unchanged (a
latent set to its own value, or s = 0 on a latent that does not fire) gives bit-identical
head outputs: the edit below changes a code value in place and adds a slot only where a
latent that is absent gets a non-zero value.

Baselines, with the same latents, scales and positions as the edit they control:
- :func:`random_latent_edit`: as many other latents, drawn uniformly without replacement
  from the latents that are not chosen (and, when ``maxima`` is given, that ever fired:
  maxima > 0), each set by the same rule (``scales[i] * maxima[random_i]``); one draw
  per image (``per_image=True``) or one for all images.
- :func:`random_vector_edit`: at every token the activation gets ``||dx|| * u_b``
  added, where dx = decode(z') - decode(z) is the chosen edit's own change at that token
  (raw activation space; |dz_j| * ||W_dec[j]|| * norm_scale for a single latent) and u_b
  is one random unit vector per image (a normalized standard Gaussian draw from
  ``seed``), the same for all tokens of that image. Tokens the edit does not touch get
  nothing.

Latents may be the same for every image ([n]) or one row per image ([B, n]), so a batch
of images, each with its own discovered latents and positions, runs in one forward.

What the two experiments measure with these edits is in intervention_effects.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ..architectures.dense import DenseCode
from ..backbones.base import Backbone
from ..backbones.splice import Edit, splice
from ..errors import InputError
from ..ops.code import SparseCode
from ._args import is_int

Head = Callable[[torch.Tensor], torch.Tensor]  # pixels [B, 3, H, W] -> logits [B, C]


@dataclass
class InterventionResult:
    """The head's outputs on the same images without and with the edit.

    before, after: [B, C] float32 probabilities (softmax of the head's logits) or the logits.
    latents: [B, n] int64, the latents each image's edit set (the random ones for
        ``random_latent_edit``); values: [B, n] float32, the value each was set to.
    vector: [B, d_in] the random unit vector of each image (``random_vector_edit``), else None.
    """

    before: torch.Tensor
    after: torch.Tensor
    latents: torch.Tensor
    values: torch.Tensor
    vector: torch.Tensor | None = None


# ----- the edit ---------------------------------------------------------------------------
def set_latents(latents, values, tokens: torch.Tensor | None = None) -> Edit:
    """An edit that sets latent ``latents[i]`` to ``values[i]`` at the tokens ``tokens``.

    latents: [n] int ids (the same in every image) or [B, n] (per image); values: [n] or
    [B, n] alike. tokens: [T] bool (the same positions in every image), [B, T] bool (per
    image) or None (all).

    A latent present in a token's code is changed in place (its first slot; a duplicate
    slot of the same latent is zeroed); a column is appended only for tokens where the
    latent is absent and the new value is not 0. So setting a latent to the value it has,
    or an absent latent to 0, returns a code with the same slots and bits.
    """
    lat = torch.as_tensor(latents, dtype=torch.int64)
    val = torch.as_tensor(values, dtype=torch.float32)
    if lat.ndim not in (1, 2) or val.shape != lat.shape:
        raise InputError(f"set_latents: latents {tuple(lat.shape)} and values {tuple(val.shape)} must both be [n] "
                         "or both [B, n]")

    def edit(code, b: int, t: int):
        device = code.values.device
        if lat.ndim == 2 and lat.shape[0] != b:
            raise InputError(f"the edit was built for {lat.shape[0]} images but the layer ran on {b}; run the head "
                             "on the whole batch at once")
        if tokens is None:
            where = torch.ones(b * t, dtype=torch.bool, device=device)
        else:
            mask = tokens.to(device)
            where = mask.repeat(b) if mask.ndim == 1 else mask.reshape(-1)
        rows = lat.to(device)[None].expand(b * t, -1) if lat.ndim == 1 else lat.to(device).repeat_interleave(t, 0)
        news = val.to(device)[None].expand(b * t, -1) if val.ndim == 1 else val.to(device).repeat_interleave(t, 0)
        if isinstance(code, DenseCode):
            out = code.values.clone()
            for i in range(rows.shape[1]):
                j = rows[:, i:i + 1]
                old = out.gather(1, j)
                out.scatter_(1, j, torch.where(where[:, None], news[:, i:i + 1].to(out.dtype), old))
            return DenseCode(out)
        vals, idx = code.values, code.indices
        for i in range(rows.shape[1]):
            j, new = rows[:, i], news[:, i].to(vals.dtype)
            hits = idx == j[:, None]
            first = hits & (hits.cumsum(1) == 1)
            vals = torch.where(first & where[:, None], new[:, None], vals)
            vals = torch.where(hits & ~first & where[:, None], torch.zeros_like(vals), vals)
            need = where & ~hits.any(1) & (new != 0)
            if bool(need.any()):
                vals = torch.cat([vals, torch.where(need, new, torch.zeros_like(new))[:, None]], 1)
                idx = torch.cat([idx, j[:, None]], 1)
        return SparseCode(vals, idx)
    return edit


# ----- checks -----------------------------------------------------------------------------
def _is_int(x) -> bool:
    if isinstance(x, torch.Tensor):
        return x.numel() == 1 and not x.is_floating_point() and x.dtype != torch.bool
    return is_int(x)


def _latent_table(latents, n_images: int, d_sae: int) -> torch.Tensor:
    """latents ([n] shared or [B, n] per image: sequences, arrays or tensors of ids) ->
    int64 [B, n], checked: integers in 0..d_sae-1, each once per image."""
    if isinstance(latents, (torch.Tensor, np.ndarray)):
        table = torch.as_tensor(latents)
        if table.is_floating_point() or table.dtype == torch.bool or table.is_complex():
            raise InputError(f"latents must be integer ids in 0..{d_sae - 1}, got dtype {table.dtype}")
    else:
        rows = list(latents)
        nested = bool(rows) and all(isinstance(r, (list, tuple, torch.Tensor, np.ndarray)) for r in rows)
        rows = [list(r.tolist() if hasattr(r, "tolist") else r) for r in rows] if nested else rows
        for j in (j for r in rows for j in r) if nested else rows:
            if not _is_int(j):
                raise InputError(f"latent {j!r} is not an integer id; pass ids in 0..{d_sae - 1}")
        if nested and len({len(r) for r in rows}) > 1:
            raise InputError("per-image latents must list the same number of latents for every image")
        table = torch.tensor([[int(j) for j in r] for r in rows] if nested else [int(j) for j in rows],
                             dtype=torch.int64)
    table = table.long()
    if table.ndim == 1:
        table = table[None].expand(n_images, -1)
    if table.ndim != 2 or table.shape[0] != n_images:
        raise InputError(f"latents has shape {tuple(table.shape)}; give [n] ids (the same for every image) or "
                         f"[B={n_images}, n] (one row per image)")
    if table.shape[1] == 0:
        raise InputError("no latents to edit: give at least one latent id")
    bad = table[(table < 0) | (table >= d_sae)]
    if bad.numel():
        raise InputError(f"latent {int(bad[0])} is out of range: the SAE has d_sae={d_sae} latents "
                         f"(ids 0..{d_sae - 1})")
    ordered = table.sort(1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        row = int((ordered[:, 1:] == ordered[:, :-1]).any(1).nonzero()[0])
        raise InputError(f"latents {table[row].tolist()} repeat an id; list each latent once per image")
    return table.contiguous()


def _check_scales(scales, n: int) -> torch.Tensor:
    scales_t = torch.as_tensor(scales, dtype=torch.float32).reshape(-1)
    if scales_t.numel() != n:
        raise InputError(f"{n} latents but {scales_t.numel()} scales: give one scale per latent")
    if not bool(torch.isfinite(scales_t).all()):
        raise InputError(f"scales {scales_t.tolist()} are not all finite")
    return scales_t


def _check_maxima(maxima, d_sae: int) -> torch.Tensor | None:
    if maxima is None:
        return None
    maxima = torch.as_tensor(maxima).float().cpu()
    if maxima.shape != (d_sae,):
        raise InputError(f"maxima has shape {tuple(maxima.shape)}; it must be [d_sae={d_sae}] (LatentStats' 'max')")
    if not bool(torch.isfinite(maxima).all()):
        raise InputError("maxima holds NaN or inf; pass the finite per-latent maxima of LatentStats")
    return maxima


def _position_mask(positions, n_images: int, n_tokens: int, layer: str) -> torch.Tensor | None:
    """positions (None, [T] bool, [B, T] bool or token ids) -> None or a [T] / [B, T] bool mask."""
    if positions is None:
        return None
    if isinstance(positions, (torch.Tensor, np.ndarray)) and positions.dtype in (torch.bool, np.bool_):
        mask = torch.as_tensor(positions)
        if mask.shape not in ((n_tokens,), (n_images, n_tokens)):
            raise InputError(f"positions mask has shape {tuple(mask.shape)}; {layer} has {n_tokens} tokens per image, "
                             f"so give [T={n_tokens}] or [B={n_images}, T={n_tokens}] bool")
        return mask.cpu()
    ids = positions.reshape(-1).tolist() if isinstance(positions, (torch.Tensor, np.ndarray)) else list(positions)
    bad = [p for p in ids if not _is_int(p)]
    if bad:
        raise InputError(f"positions must be token ids (integers) or a bool mask; got {bad[0]!r}")
    mask = torch.zeros(n_tokens, dtype=torch.bool)
    for p in (int(p) for p in ids):
        if not 0 <= p < n_tokens:
            raise InputError(f"position {p} is out of range: {layer} has {n_tokens} tokens per image "
                             f"(positions 0..{n_tokens - 1})")
        mask[p] = True
    return mask


def _check_head_output(out) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InputError(f"the head returned {shape}, not logits [B, C]; pass head=... mapping pixels to logits "
                         "(e.g. a probe on the pooled features)")
    return out.float()


# ----- running ----------------------------------------------------------------------------
@torch.no_grad()
def _clean(backbone: Backbone, layer: str, head: Head, pixels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(clean head logits [B, C], the layer's tokens per image)."""
    seen: dict[str, int] = {}

    def catch(module, inputs, output):  # returns None: the output stays as it is
        seen["t"] = backbone.to_tokens(output).shape[1]

    handle = backbone.layer_module(layer).register_forward_hook(catch)
    try:
        logits = _check_head_output(head(pixels))
    finally:
        handle.remove()
    if "t" not in seen:
        raise InputError(f"the head never ran {layer}; pass a head that runs the backbone on the pixels")
    return logits, seen["t"]


@dataclass
class _Prepared:
    latents: torch.Tensor  # [B, n]
    scales: torch.Tensor  # [n]
    maxima: torch.Tensor | None
    head: Head
    pixels: torch.Tensor
    before: torch.Tensor
    mask: torch.Tensor | None

    def values(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, n] the value each latent is set to: s_i * m_j, or s_i when maxima is None."""
        scales = self.scales[None].expand_as(latents)
        return scales.clone() if self.maxima is None else scales * self.maxima[latents]


def _prepare(backbone, layer, sae, pixels, latents, scales, maxima, positions, head) -> _Prepared:
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4:
        raise InputError(f"pixels must be a tensor [B, 3, H, W], got "
                         f"{tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__}")
    d_sae = sae.cfg.d_sae
    table = _latent_table(latents, pixels.shape[0], d_sae)
    scales_t = _check_scales(scales, table.shape[1])
    maxima = _check_maxima(maxima, d_sae)
    head = head or backbone.forward
    pixels = pixels.to(backbone.device)
    before, n_tokens = _clean(backbone, layer, head, pixels)
    mask = _position_mask(positions, pixels.shape[0], n_tokens, layer)
    return _Prepared(table, scales_t, maxima, head, pixels, before, mask)


def _finish(before: torch.Tensor, after: torch.Tensor, softmax: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if softmax:
        return before.softmax(1).cpu(), after.softmax(1).cpu()
    return before.cpu(), after.cpu()


@torch.no_grad()
def _edited(backbone, layer, sae, pixels, head, edit: Edit) -> torch.Tensor:
    with splice(backbone, layer, sae, error_term=True, edit=edit):
        return _check_head_output(head(pixels))


def intervene(backbone: Backbone, layer: str, sae, pixels: torch.Tensor, *, latents,
              scales: Sequence[float], maxima: torch.Tensor | None = None, positions=None,
              head: Head | None = None, softmax: bool = True) -> InterventionResult:
    """Set ``latents[i]`` to ``scales[i] * maxima[latents[i]]`` (``scales[i]`` itself when
    ``maxima`` is None) at ``positions`` of ``layer``, keep the error term, and return the
    head's outputs before and after.

    Args:
        pixels: [B, 3, H, W] preprocessed images (all run in one forward).
        latents: [n] latent ids (the same for every image) or [B, n] (a row per image),
            in 0..d_sae-1, each once per image; scales: [n], one per latent (column).
        maxima: [d_sae] each latent's largest observed value (LatentStats' "max"), or None.
        positions: None (every token), token ids (the same in every image), or a bool mask
            [T] or [B, T] over the layer's T tokens per image.
        head: pixels -> logits [B, C] (default ``backbone.forward``); it must run the layer
            once on the whole batch.
        softmax: return probabilities (else the logits).
    Raises InputError for a latent id >= d_sae, a position >= T, or scales of another length.
    """
    prep = _prepare(backbone, layer, sae, pixels, latents, scales, maxima, positions, head)
    values = prep.values(prep.latents)
    after = _edited(backbone, layer, sae, prep.pixels, prep.head, set_latents(prep.latents, values, prep.mask))
    return InterventionResult(*_finish(prep.before, after, softmax), prep.latents, values)


def random_latent_edit(backbone: Backbone, layer: str, sae, pixels: torch.Tensor, *, latents,
                       scales: Sequence[float], maxima: torch.Tensor | None = None, positions=None,
                       head: Head | None = None, softmax: bool = True, seed: int = 0,
                       exclude: Sequence[int] = (), per_image: bool = True) -> InterventionResult:
    """The random-latent baseline of :func:`intervene` with the same arguments: as many
    latents, drawn (``seed``) without replacement from those not chosen nor in ``exclude``
    (and with maxima > 0 when maxima is given), set by the same scale rule. ``per_image``:
    a draw per image, avoiding that image's latents; else one draw for all images,
    avoiding every image's latents (saev's one random latent per class).
    ``result.latents`` holds the drawn ones."""
    prep = _prepare(backbone, layer, sae, pixels, latents, scales, maxima, positions, head)
    d_sae, (n_images, n) = sae.cfg.d_sae, prep.latents.shape
    allowed = torch.ones(d_sae, dtype=torch.bool)
    allowed[[int(j) for j in exclude if 0 <= int(j) < d_sae]] = False
    if prep.maxima is not None:
        allowed &= prep.maxima > 0
    gen = torch.Generator().manual_seed(int(seed))

    def draw(avoid: torch.Tensor) -> torch.Tensor:
        mine = allowed.clone()
        mine[avoid.reshape(-1)] = False
        pool = torch.nonzero(mine).flatten()
        if pool.numel() < n:
            raise InputError(f"only {pool.numel()} latents are left to draw {n} random ones from (not chosen, not "
                             "excluded, with maxima > 0); edit fewer latents")
        return pool[torch.randperm(pool.numel(), generator=gen)[:n]]

    if per_image:
        drawn = torch.stack([draw(prep.latents[b]) for b in range(n_images)])
    else:
        drawn = draw(prep.latents)[None].expand(n_images, -1).contiguous()
    values = prep.values(drawn)
    after = _edited(backbone, layer, sae, prep.pixels, prep.head, set_latents(drawn, values, prep.mask))
    return InterventionResult(*_finish(prep.before, after, softmax), drawn, values)


def random_unit_vectors(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """[n, d] float32 unit vectors, uniform on the sphere (normalized Gaussian draws)."""
    gen = torch.Generator().manual_seed(int(seed))
    u = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return (u / u.norm(dim=1, keepdim=True)).float()


def random_vector_edit(backbone: Backbone, layer: str, sae, pixels: torch.Tensor, *, latents,
                       scales: Sequence[float], maxima: torch.Tensor | None = None, positions=None,
                       head: Head | None = None, softmax: bool = True, seed: int = 0) -> InterventionResult:
    """The random-vector baseline of :func:`intervene` with the same arguments: every token
    of image b gets ``||decode(z') - decode(z)|| * u_b`` added (the chosen edit's own
    change norm at that token, 0 where it edits nothing), u = ``random_unit_vectors(B,
    d_in, seed)``, one direction per image."""
    prep = _prepare(backbone, layer, sae, pixels, latents, scales, maxima, positions, head)
    values = prep.values(prep.latents)
    edit = set_latents(prep.latents, values, prep.mask)
    u = random_unit_vectors(prep.pixels.shape[0], sae.cfg.d_in, seed).to(prep.pixels.device)

    def hook(module, inputs, output):
        tokens = backbone.to_tokens(output)
        b, t, d = tokens.shape
        flat = tokens.reshape(b * t, d)
        code = sae.encode(flat, check=False)
        change = (sae.decode(edit(code, b, t)) - sae.decode(code)).float()
        new = flat + (change.norm(dim=1, keepdim=True) * u.repeat_interleave(t, 0)).to(flat.dtype)
        return backbone.from_tokens(output, new.reshape(b, t, d))

    handle = backbone.layer_module(layer).register_forward_hook(hook)
    try:
        with torch.no_grad():
            after = _check_head_output(prep.head(prep.pixels))
    finally:
        handle.remove()
    return InterventionResult(*_finish(prep.before, after, softmax), prep.latents, values, u.cpu())
