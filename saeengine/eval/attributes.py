"""Automated attribute discovery [P]: which image attributes an SAE latent's steering
direction changes, tested against random directions of the same norm.

For each latent j with direction D_j = m_j d_j [width] (raw activation space), over P
prompts with fixed seeds:

1. base images (alpha = 0; made once, shared by every latent) and steered images
   (h' = h + alpha D_j), seed-paired: pair i is prompt i with seed i, both ways;
2. each describer gives every image named attribute values; per pair the change
   c_i = steered - base (wrapped into [-0.5, 0.5) turns for a circular attribute such as
   hue; 1 / 0 = changed / not for a categorical one such as the top-1 label);
3. the null: K random unit directions (seeded, shared by all latents), each scaled to
   ||D_j||, steer the same prompts and seeds; null k's mean change is mu_k;
4. per (latent, attribute), with m = mean_i c_i, mu0 = mean_k mu_k, s0 = std_k mu_k (ddof 1):
   - effect = (m - mu0) / s0: the latent's mean change in units of the spread of the
     random directions' mean changes (standardized against the null);
   - p = the prediction-interval t test of "m is one more draw from the null's normal":
     t = (m - mu0) / (s0 sqrt(1 + 1/K)) with K - 1 degrees of freedom; two-sided, one-sided
     (increase) for a categorical attribute, where only more changes than chance matter;
   - detection threshold tau = the 95th percentile of |c| over all null pairs (0 for the
     discrete kinds); pair i detects the attribute when |c_i| > tau and c_i has the sign of
     m - mu0; consistency = share of pairs that detect it;
   - kept when p < significance / A (Bonferroni over the A attributes tested for the
     latent), |m - mu0| exceeds every null's |mu_k - mu0| (on the tested side), and
     consistency >= min_consistency;
5. latents are ranked by their strongest kept attribute's |effect| (those with none kept
   last); a latent is named by its top kept attribute.

Also reported: the paired effect size d_z = m / std_i c_i (ddof 1), the null's mean, std,
largest deviation and threshold, and for a categorical attribute the classes the steered
images gained and lost. Every choice above is ours ([P], docs/attributes.md): the paper's
exact pipeline is unknown.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Mapping, Sequence

import numpy as np
import torch

from ..errors import DataError, InputError
from ._args import count, is_int
from .describers import attribute_kind, change, check_images

FORMAT, VERSION = "saeengine-attributes", 1
DETECTION_QUANTILE = 0.95
_DISCRETE = ("categorical", "presence")


@dataclasses.dataclass
class Discovery:
    """What :func:`discover_attributes` found.

    result: the JSON-ready result (attributes.json; fields in docs/attributes.md).
    examples: {latent: (base uint8 [k, H, W, 3], steered uint8 [k, H, W, 3])}, the first k
    pairs of each latent, for the report's strips.
    """

    result: dict
    examples: dict[int, tuple[np.ndarray, np.ndarray]]


# ----- argument checks ---------------------------------------------------------------------------

def _check_alpha(alpha) -> float:
    from ..steer.generator import check_alpha

    value = check_alpha(alpha)
    if value == 0:
        raise InputError("alpha=0 steers nothing (the steered image is the base image); pass a non-zero alpha "
                         "such as 4")
    return value


def _check_prompts(prompts, seeds) -> tuple[list[str], list[int]]:
    if isinstance(prompts, str):
        raise InputError("prompts must be a list of strings, not one string; wrap it in a list")
    prompts = [p for p in prompts]
    if not prompts:
        raise InputError("no prompts: attribute discovery needs at least one prompt (neutral prompts such as "
                         "'a photo of a room', one per line in the --prompts file)")
    bad = [p for p in prompts if not isinstance(p, str) or not p.strip()]
    if bad:
        raise InputError(f"prompt {bad[0]!r} is not a non-empty string; every prompt must be text")
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    if len(seeds) != len(prompts) or not all(is_int(s) for s in seeds):
        raise InputError(f"seeds must be {len(prompts)} ints, one per prompt; got {seeds!r}")
    return prompts, [int(s) for s in seeds]


def _check_directions(directions: Mapping, width: int) -> dict[int, torch.Tensor]:
    if not isinstance(directions, Mapping) or not directions:
        raise InputError("directions must be a non-empty {latent id: direction [width]} mapping; build them with "
                         "saeengine.steer.latent_direction(sae, j, m_j)")
    out = {}
    for latent, direction in directions.items():
        if not is_int(latent):
            raise InputError(f"latent id {latent!r} is not an int; key the directions by latent id")
        d = torch.as_tensor(direction).detach().float().cpu()
        if d.shape != (width,):
            raise InputError(f"latent {latent}'s direction has shape {list(d.shape)}, but the generator steers a "
                             f"layer of width {width}; pass a [{width}] vector in its raw activation space")
        if not bool(torch.isfinite(d).all()):
            raise InputError(f"latent {latent}'s direction is not finite; recompute it from finite SAE weights "
                             "and a finite m_j")
        if float(d.norm()) == 0:
            raise InputError(f"latent {latent}'s direction is zero (its m_j is 0: it never fired on the prompts); "
                             "leave it out or pick a latent that fires")
        out[int(latent)] = d
    return out


def _check_describers(describers) -> list:
    describers = list(describers)
    if not describers:
        raise InputError("no describers: pass at least one (e.g. saeengine.eval.describers.ImageStats())")
    names = []
    for d in describers:
        if not hasattr(d, "describe") or not isinstance(getattr(d, "name", None), str):
            raise InputError(f"{d!r} is not a describer: it needs a str ``name`` and ``describe(images)``")
        if d.name in names:
            raise InputError(f"two describers are named {d.name!r}; give each a distinct name")
        names.append(d.name)
    return describers


# ----- generating and describing -----------------------------------------------------------------

def _generate(generator, prompts: list[str], seeds: list[int], direction, alpha: float, batch_size: int) -> np.ndarray:
    parts = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        images = generator.generate(chunk, seeds[start:start + batch_size], direction, alpha)
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != len(chunk) or images.shape[-1] != 3:
            raise DataError(f"the generator returned {images.dtype} {list(images.shape)} for {len(chunk)} prompts; "
                            "a SteerableGenerator returns uint8 [n_prompts, H, W, 3]")
        parts.append(images)
    return np.concatenate(parts)


class _Described:
    """Every describer's output on one set of images: {attribute: float64 [n]}, with each
    attribute's kind, describer and category names."""

    def __init__(self, describers, images: np.ndarray, kinds: dict, owners: dict, categories: dict):
        self.values: dict[str, np.ndarray] = {}
        n = check_images(images).shape[0]
        for describer in describers:
            for attribute, value in describer.describe(images).items():
                value = np.asarray(value, dtype=np.float64)
                if value.shape != (n,):
                    raise DataError(f"describer {describer.name!r} gave attribute {attribute!r} shape "
                                    f"{list(value.shape)} for {n} images; it must give one value per image")
                owner = owners.setdefault(attribute, describer.name)
                if owner != describer.name:
                    raise InputError(f"describers {owner!r} and {describer.name!r} both give attribute {attribute!r}; "
                                     "attribute names must be unique across the describers")
                kinds.setdefault(attribute, attribute_kind(describer, attribute))
                if attribute not in categories and hasattr(describer, "categories"):
                    categories[attribute] = describer.categories(attribute)
                self.values[attribute] = value
        self.n = n

    def get(self, attribute: str, kind: str) -> np.ndarray:
        """The attribute's values; a presence attribute this output lacks is absent (0),
        any other is undefined (NaN)."""
        if attribute in self.values:
            return self.values[attribute]
        return np.zeros(self.n) if kind == "presence" else np.full(self.n, np.nan)


def null_directions(width: int, n_null: int, seed: int) -> torch.Tensor:
    """[n_null, width] random unit directions (standard normal, normalized; torch seeded)."""
    gen = torch.Generator().manual_seed(int(seed))
    u = torch.randn(n_null, width, generator=gen, dtype=torch.float64)
    return (u / u.norm(dim=1, keepdim=True)).float()


# ----- the statistics ----------------------------------------------------------------------------

def _t_sf(t: float, dof: int) -> float:
    from scipy.stats import t as student

    return float(student.sf(t, dof))


def score_attribute(kind: str, changes: np.ndarray, null_changes: np.ndarray) -> dict:
    """One (latent, attribute)'s statistics (before the multiple-testing decision).

    changes: float64 [P] the latent's paired changes (NaN: an undefined pair, left out);
    null_changes: float64 [K, P] the null directions' paired changes.
    """
    finite = np.isfinite(changes)
    c = changes[finite]
    null_means = np.array([row[np.isfinite(row)].mean() if np.isfinite(row).any() else np.nan
                           for row in null_changes])
    null_means = null_means[np.isfinite(null_means)]
    null = {"n": int(null_means.size), "mean": None, "std": None, "max_deviation": None,
            "means": null_means.tolist()}
    out = {"kind": kind, "n_pairs": int(c.size), "mean_change": None, "std_change": None, "paired_d": None,
           "effect": None, "p_value": None, "consistency": None, "detection_threshold": None,
           "beats_null_max": False, "sign": 0, "null_spread_zero": False, "null": null}
    if c.size == 0 or null_means.size < 2:
        return out  # undefined: no valid pair, or too few nulls for a spread
    m = float(c.mean())
    s = float(c.std(ddof=1)) if c.size > 1 else math.nan
    mu0, s0, k = float(null_means.mean()), float(null_means.std(ddof=1)), int(null_means.size)
    dev = m - mu0
    one_sided = kind == "categorical"
    if s0 > 0:
        effect = dev / s0
        t = dev / (s0 * math.sqrt(1 + 1 / k))
        p = _t_sf(t, k - 1) if one_sided else 2 * _t_sf(abs(t), k - 1)
    else:  # the nulls agree exactly (e.g. no random direction ever changed the label)
        effect = math.copysign(math.inf, dev) if dev != 0 else 0.0
        p = (0.0 if dev > 0 else 1.0) if one_sided else (0.0 if dev != 0 else 1.0)
    deviations = null_means - mu0
    null_max = float(deviations.max()) if one_sided else float(np.abs(deviations).max())
    beats = bool(dev > null_max) if one_sided else bool(abs(dev) > null_max)
    sign = 1 if dev > 0 else (-1 if dev < 0 else 0)
    pooled = np.abs(null_changes[np.isfinite(null_changes)])
    tau = 0.0 if kind in _DISCRETE or pooled.size == 0 else float(np.quantile(pooled, DETECTION_QUANTILE))
    detected = (np.abs(c) > tau) & (np.sign(c) == sign) if sign != 0 else np.zeros(c.size, dtype=bool)
    out.update(mean_change=m, std_change=s if math.isfinite(s) else None,
               paired_d=(m / s) if math.isfinite(s) and s > 0 else None, effect=effect, p_value=min(p, 1.0),
               consistency=float(detected.mean()), detection_threshold=tau, beats_null_max=beats, sign=sign,
               null_spread_zero=s0 == 0)
    out["null"].update(mean=mu0, std=s0, max_deviation=null_max)
    return out


def _class_shift(base: np.ndarray, steered: np.ndarray, names: Sequence[str] | None, top: int = 3) -> dict:
    """The classes the steered images gained and lost: net count steered - base per class id."""
    ok = np.isfinite(base) & np.isfinite(steered)
    net = Counter(int(x) for x in steered[ok])
    net.subtract(Counter(int(x) for x in base[ok]))

    def label(i: int) -> str:
        return names[i] if names is not None and 0 <= i < len(names) else f"class {i}"
    gained = [{"class": label(i), "id": i, "net": n} for i, n in net.most_common() if n > 0][:top]
    lost = [{"class": label(i), "id": i, "net": n} for i, n in sorted(net.items(), key=lambda kv: kv[1]) if n < 0][:top]
    return {"gained": gained, "lost": lost}


def _sort_key(row: dict) -> float:
    e = row.get("effect")
    return abs(e) if e is not None and not math.isnan(e) else -1.0


def _name(row: dict) -> str:
    if row["kind"] == "categorical":
        gained = row.get("gained") or []
        return f"{row['attribute']} (to {gained[0]['class']})" if gained else row["attribute"]
    return f"{row['attribute']} {'+' if row['sign'] > 0 else '-'}"


# ----- the pipeline ------------------------------------------------------------------------------

def discover_attributes(generator, directions: Mapping[int, torch.Tensor], prompts: Sequence[str],
                        seeds: Sequence[int] | None = None, alpha: float = 4.0, describers: Sequence = (), *,
                        n_null: int = 8, null_seed: int = 0, significance: float = 0.05,
                        min_consistency: float = 0.5, batch_size: int = 8, n_examples: int = 4,
                        progress: bool = False) -> Discovery:
    """Find the attributes each latent's direction changes (see the module docstring).

    generator: a SteerableGenerator (``width``, ``generate(prompts, seeds, direction, alpha)``).
    directions: {latent id: [width] float direction in raw activation space} (m_j d_j).
    prompts: P prompts; seeds: one int per prompt (default 0 .. P-1). alpha: the steering
    strength (finite, non-zero). describers: Describer objects (saeengine.eval.describers).
    n_null: K >= 2 random directions per norm; null_seed seeds them. significance: the
    family-wise level, Bonferroni-split over a latent's attributes. min_consistency: the
    share of pairs a kept attribute must be detected in. batch_size: prompts per
    generate call. n_examples: pairs kept per latent for the report.

    Cost: P base images, then per latent P steered images and, for each distinct direction
    norm, K * P null images (latents of equal norm share their nulls).
    """
    from tqdm.auto import tqdm

    alpha = _check_alpha(alpha)
    width = count("generator.width", getattr(generator, "width", None), 1)
    prompts, seeds = _check_prompts(prompts, seeds)
    directions = _check_directions(directions, width)
    describers = _check_describers(describers)
    n_null = count("n_null", n_null, 2)
    batch_size = count("batch_size", batch_size)
    n_examples = count("n_examples", n_examples, 0)
    if not (isinstance(significance, (int, float)) and 0 < significance < 1):
        raise InputError(f"significance={significance!r} must be a number in (0, 1), e.g. 0.05")
    if not (isinstance(min_consistency, (int, float)) and 0 <= min_consistency <= 1):
        raise InputError(f"min_consistency={min_consistency!r} must be a number in [0, 1], e.g. 0.5")

    kinds: dict[str, str] = {}
    owners: dict[str, str] = {}
    categories: dict[str, Sequence[str] | None] = {}
    norms = sorted({float(d.norm()) for d in directions.values()})
    bar = tqdm(total=1 + len(directions) + n_null * len(norms), desc="attributes: image sets", unit="set",
               disable=not progress)

    def run(direction) -> tuple[np.ndarray, _Described]:
        images = _generate(generator, prompts, seeds, direction, alpha if direction is not None else 0.0, batch_size)
        bar.update(1)
        return images, _Described(describers, images, kinds, owners, categories)

    try:
        base_images, base = run(None)
        units = null_directions(width, n_null, null_seed)
        nulls: dict[float, list[_Described]] = {}
        latents, examples = [], {}
        for latent, direction in directions.items():
            steered_images, steered = run(direction)
            norm = float(direction.norm())
            if norm not in nulls:
                nulls[norm] = [run(norm * units[k])[1] for k in range(n_null)]
            examples[latent] = (base_images[:n_examples].copy(), steered_images[:n_examples].copy())
            latents.append(_score_latent(latent, norm, base, steered, nulls[norm], kinds, owners, categories,
                                         significance, min_consistency))
    finally:
        bar.close()

    # kept latents first, by their strongest kept attribute; the rest by their strongest attribute
    latents.sort(key=lambda r: (-int(bool(r["kept"])), -max([_sort_key(a) for a in r["attributes"]
                                                              if a["kept"] or not r["kept"]] or [-1.0])))
    for rank, row in enumerate(latents, 1):
        row["rank"] = rank
    result = {
        "format": FORMAT, "version": VERSION,
        "settings": {"alpha": alpha, "n_prompts": len(prompts), "prompts": prompts, "seeds": seeds,
                     "n_null": n_null, "null_seed": int(null_seed), "significance": float(significance),
                     "min_consistency": float(min_consistency), "detection_quantile": DETECTION_QUANTILE,
                     "width": width, "describers": [d.name for d in describers]},
        "attributes": {a: {"kind": kinds[a], "describer": owners[a]} for a in sorted(kinds)},
        "n_images": (1 + len(directions) + n_null * len(norms)) * len(prompts),
        "latents": latents,
    }
    return Discovery(result, examples)


def _score_latent(latent: int, norm: float, base: _Described, steered: _Described, nulls: list[_Described],
                  kinds: dict, owners: dict, categories: dict, significance: float, min_consistency: float) -> dict:
    """One latent's row: every tested attribute scored, the Bonferroni decision, its name."""
    tested = [a for a in kinds if kinds[a] != "presence" or a in base.values or a in steered.values]
    rows = []
    for attribute in tested:
        kind = kinds[attribute]
        b = base.get(attribute, kind)
        changes = change(kind, b, steered.get(attribute, kind))
        null_changes = np.stack([change(kind, b, n.get(attribute, kind)) for n in nulls])
        row = {"attribute": f"{attribute}_change" if kind == "categorical" else attribute,
               "describer": owners[attribute], **score_attribute(kind, changes, null_changes)}
        if kind == "categorical":
            row.update(_class_shift(b, steered.get(attribute, kind), categories.get(attribute)))
        rows.append(row)
    n_tested = sum(1 for r in rows if r["p_value"] is not None)
    level = significance / max(n_tested, 1)
    for row in rows:
        row["kept"] = bool(row["p_value"] is not None and row["p_value"] < level and row["beats_null_max"]
                           and row["consistency"] >= min_consistency)
    rows.sort(key=lambda r: (-int(r["kept"]), -_sort_key(r)))
    kept = [r for r in rows if r["kept"]]
    return {"latent": latent, "norm": norm, "name": _name(kept[0]) if kept else None,
            "kept": [r["attribute"] for r in kept], "n_tested": n_tested, "bonferroni_level": level,
            "attributes": rows}
