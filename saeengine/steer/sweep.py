"""The alpha sweep: for each latent, every alpha x every prompt, seed-paired with the
unsteered image (alpha = 0, generated once: it is the same for every latent), measured
against it (saeengine.steer.metrics) and written as an image grid per latent, sweep.json
and report.html (saeengine.steer.report).

    result = alpha_sweep(generator, {7: latent_direction(sae, 7, m[7])}, prompts, clip="models/clip")
    write_sweep(result, "runs/steer")
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from .generator import check_alpha

DEFAULT_ALPHAS = (-8.0, -4.0, -2.0, 0.0, 2.0, 4.0, 8.0)
FORMAT, VERSION = "saeengine-steer", 1


@dataclass
class SweepResult:
    """prompts [P], seeds [P], alphas [A] (sorted, 0 included), latents [L];
    images {latent: uint8 [A, P, H, W, 3]}; metrics {latent: [A] dicts (mean over prompts,
    and "per_prompt" lists)}; info {latent: {"max_activation", "attribute", "direction_norm"}};
    settings: the generator's and the sweep's settings."""

    prompts: list[str]
    seeds: list[int]
    alphas: list[float]
    latents: list[int]
    images: dict[int, np.ndarray] = field(default_factory=dict)
    metrics: dict[int, list[dict]] = field(default_factory=dict)
    info: dict[int, dict] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)


def sweep_alphas(alphas) -> list[float]:
    """The alphas to run: finite, distinct, sorted, with 0 (the reference) always in."""
    values = sorted({check_alpha(a) for a in alphas} | {0.0})
    if len(values) < 2:
        raise InputError("the sweep needs at least one alpha other than 0")
    return values


def _generator_settings(generator) -> dict:
    keys = ("kind", "encoder", "layer", "where", "cfg", "steps", "guidance", "size", "negative_prompt", "width")
    return {k: getattr(generator, k) for k in keys if hasattr(generator, k)}


def _measure(images: np.ndarray, reference: np.ndarray, prompts: list[str], *, log_p=None, log_p0=None,
             clip=None, clip_prompt0=None, attribute=None, clip_attr0=None) -> dict:
    """One (latent, alpha): the metrics' means over prompts and their per-prompt values."""
    from .metrics import class_shift, pixel_distances

    per = dict(pixel_distances(images, reference))
    if log_p is not None:
        per.update(class_shift(log_p, log_p0))
    if clip is not None:
        per["clip_prompt"] = clip.scores(images, prompts)
        per["clip_prompt_delta"] = per["clip_prompt"] - clip_prompt0
        if attribute is not None:
            per["clip_attribute"] = clip.scores(images, [attribute] * len(prompts))
            per["clip_attribute_delta"] = per["clip_attribute"] - clip_attr0
    means = {k: float(np.mean(v)) for k, v in per.items() if k != "top1"}
    return {**means, "per_prompt": {k: np.asarray(v).tolist() for k, v in per.items()}}


def alpha_sweep(generator, directions: dict[int, torch.Tensor], prompts: list[str], *, alphas=DEFAULT_ALPHAS,
                seeds: list[int] | None = None, seed: int = 0, classifier="efficientnet-lite0", clip=None,
                attributes: dict[int, str] | str | None = None, max_activations: dict[int, float] | None = None,
                progress: bool = True) -> SweepResult:
    """Generate and measure the sweep.

    generator: a SteerableGenerator; directions: {latent: [width] m_j * d_j}; prompts: P
    prompts, prompt i with seed ``seeds[i]`` (default seed + i) at every alpha.
    classifier: "efficientnet-lite0", an ImagenetClassifier, or None (no class shift).
    clip: a local CLIPModel folder or a ClipScorer (None: no CLIP scores); attributes: the
    attribute text of each latent ({latent: text}, or one text for all).
    max_activations: {latent: m_j}, recorded in the result.
    """
    from tqdm.auto import tqdm

    from .metrics import ClipScorer, ImagenetClassifier

    prompts = [str(p) for p in prompts]
    if not prompts:
        raise InputError("no prompts to steer: give at least one")
    if not directions:
        raise InputError("no latents to steer: give at least one direction")
    seeds = [seed + i for i in range(len(prompts))] if seeds is None else [int(s) for s in seeds]
    if len(seeds) != len(prompts):
        raise InputError(f"{len(prompts)} prompts and {len(seeds)} seeds: give one seed per prompt")
    values = sweep_alphas(alphas)
    width = int(generator.width)
    for latent, direction in directions.items():
        if tuple(torch.as_tensor(direction).shape) != (width,):
            raise InputError(f"the direction of latent {latent} has shape {tuple(torch.as_tensor(direction).shape)} "
                             f"but the steered layer has width {width}: use an SAE of this layer")
    if isinstance(classifier, str):
        if classifier != "efficientnet-lite0":
            raise InputError(f"classifier={classifier!r}: the class shift uses 'efficientnet-lite0' (or None)")
        classifier = ImagenetClassifier()
    if clip is not None and not isinstance(clip, ClipScorer):
        clip = ClipScorer(clip)
    if attributes is None or isinstance(attributes, str):
        attributes = {latent: attributes for latent in directions}

    result = SweepResult(prompts, seeds, values, [int(j) for j in directions])
    result.settings = {**_generator_settings(generator), "classifier": "efficientnet-lite0" if classifier else None,
                       "clip": getattr(clip, "folder", None)}
    reference = generator.generate(prompts, seeds)  # alpha = 0: the same for every latent
    log_p0 = classifier.log_probs(reference) if classifier is not None else None
    clip_prompt0 = clip.scores(reference, prompts) if clip is not None else None
    bar = tqdm(total=len(directions) * (len(values) - 1), desc="steer", disable=not progress)
    for latent, direction in directions.items():
        attribute = attributes.get(latent)
        clip_attr0 = clip.scores(reference, [attribute] * len(prompts)) if clip is not None and attribute else None
        grid, rows = [], []
        # where="active" steers where this latent fires (a PipelineGenerator copy that knows it)
        steered = generator.with_latent(int(latent)) if hasattr(generator, "with_latent") else generator
        for alpha in values:
            if alpha == 0.0:
                images = reference
            else:
                images = steered.generate(prompts, seeds, torch.as_tensor(direction).float(), alpha)
                bar.update(1)
            grid.append(images)
            rows.append({"alpha": alpha, **_measure(
                images, reference, prompts, log_p=classifier.log_probs(images) if classifier is not None else None,
                log_p0=log_p0, clip=clip, clip_prompt0=clip_prompt0, attribute=attribute or None,
                clip_attr0=clip_attr0)})
        result.images[int(latent)] = np.stack(grid)
        result.metrics[int(latent)] = rows
        result.info[int(latent)] = {
            "max_activation": None if max_activations is None else float(max_activations[latent]),
            "attribute": attribute, "direction_norm": float(torch.as_tensor(direction).float().norm())}
    bar.close()
    return result


def sweep_json(result: SweepResult, grids: dict[int, str]) -> dict:
    """The content of sweep.json (docs/steer.md lists every field)."""
    return {"format": FORMAT, "version": VERSION, "settings": result.settings, "prompts": result.prompts,
            "seeds": result.seeds, "alphas": result.alphas,
            "latents": [{"latent": j, **result.info[j], "grid": grids.get(j), "sweep": result.metrics[j]}
                        for j in result.latents]}


def write_sweep(result: SweepResult, out_dir, extra: dict | None = None) -> dict[str, Path]:
    """latent_<j>.png (rows prompts, columns alphas) per latent, sweep.json and report.html
    under out_dir, each written whole (atomically). Returns {"json", "report", "grid_<j>"}."""
    from .._atomic import atomic_write_bytes
    from ..eval._json import jsonable
    from .report import grid_png, render_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, grids, pngs = {}, {}, {}
    for j in result.latents:
        name = f"latent_{j}.png"
        pngs[j] = grid_png(result.images[j], result.prompts, result.alphas, title=_grid_title(result, j))
        atomic_write_bytes(out / name, pngs[j])
        paths[f"grid_{j}"], grids[j] = out / name, name
    data = jsonable({**sweep_json(result, grids), **(extra or {})})
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(out / "sweep.json", text.encode())
    atomic_write_bytes(out / "report.html", render_report(data, pngs).encode())
    paths["json"], paths["report"] = out / "sweep.json", out / "report.html"
    return paths


def _grid_title(result: SweepResult, latent: int) -> str:
    info, settings = result.info[latent], result.settings
    parts = [f"latent {latent}"]
    if info.get("max_activation") is not None:
        parts.append(f"m = {info['max_activation']:.3g}")
    if "layer" in settings:
        parts.append(f"{settings.get('encoder', '')} block {settings['layer']}, where={settings.get('where')}, "
                     f"cfg={settings.get('cfg')}")
    return "; ".join(parts)
