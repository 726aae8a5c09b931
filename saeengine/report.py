"""A self-contained HTML report of a trained SAE on recorded images: the training curve,
and for the strongest latents their top-activating images with the activating positions
highlighted. Images are embedded as PNG data URIs, so the file opens anywhere offline."""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class LatentExamples:
    latent: int
    total: float                 # summed activation over all tokens
    images: list[int]            # top-activating image ids, strongest first
    maps: list[np.ndarray]       # their activation maps [side, side]
    peaks: list[float]


@torch.no_grad()
def top_examples(values: torch.Tensor, indices: torch.Tensor, image_of_token: torch.Tensor,
                 position_of_token: torch.Tensor, grid_of_image: dict[int, int], *, n_latents: int = 12,
                 per_latent: int = 8) -> list[LatentExamples]:
    """values, indices [N, k] (codes of N tokens); image_of_token, position_of_token [N]
    (position inside its image's square grid); grid_of_image: image -> grid side."""
    flat_latents = indices.reshape(-1)
    flat_values = values.reshape(-1).float()
    n_tok, k = indices.shape
    token = torch.arange(n_tok).repeat_interleave(k)
    d_sae = int(flat_latents.max()) + 1
    totals = torch.zeros(d_sae).index_add_(0, flat_latents, flat_values)
    strongest = torch.argsort(totals, descending=True)[:n_latents]
    out = []
    for latent in strongest.tolist():
        hit = (flat_latents == latent) & (flat_values > 0)
        hit_tokens, hit_values = token[hit], flat_values[hit]
        images = image_of_token[hit_tokens]
        peak = torch.zeros(int(image_of_token.max()) + 1).scatter_reduce_(0, images, hit_values, reduce="amax")
        top = torch.argsort(peak, descending=True)[:per_latent]
        top = top[peak[top] > 0].tolist()
        maps = []
        for image in top:
            side = grid_of_image[image]
            heat = np.zeros(side * side, dtype=np.float32)
            mine = images == image
            heat[position_of_token[hit_tokens[mine]].numpy()] = hit_values[mine].numpy()
            maps.append(heat.reshape(side, side))
        out.append(LatentExamples(latent, float(totals[latent]), top, maps, [float(peak[i]) for i in top]))
    return out


def _png_data_uri(image: np.ndarray, heat: np.ndarray | None, size: int = 96) -> str:
    from PIL import Image

    base = Image.fromarray(image).convert("RGB").resize((size, size), Image.BILINEAR)
    if heat is not None and heat.max() > 0:
        alpha = Image.fromarray((255 * heat / heat.max()).astype(np.uint8)).resize((size, size), Image.NEAREST)
        red = Image.new("RGB", (size, size), (255, 40, 40))
        base = Image.composite(red, base, alpha.point(lambda a: int(a * 0.6)))
    buf = io.BytesIO()
    base.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _curve_svg(steps: list[int], values: list[float], label: str, width: int = 520, height: int = 200) -> str:
    lo, hi = min(values), max(values)
    span_x, span_y = max(steps[-1] - steps[0], 1), max(hi - lo, 1e-12)
    points = " ".join(f"{40 + (s - steps[0]) / span_x * (width - 50):.1f},{10 + (hi - v) / span_y * (height - 40):.1f}"
                      for s, v in zip(steps, values))
    return (f'<svg width="{width}" height="{height}" role="img" aria-label="{label} over training">'
            f'<polyline fill="none" stroke="#2a6fdb" stroke-width="2" points="{points}"/>'
            f'<text x="4" y="16" font-size="11">{hi:.3g}</text><text x="4" y="{height - 28}" font-size="11">{lo:.3g}</text>'
            f'<text x="40" y="{height - 8}" font-size="11">step {steps[0]}</text>'
            f'<text x="{width - 90}" y="{height - 8}" font-size="11">step {steps[-1]}</text></svg>')


def write_report(path: Path, *, title: str, summary: dict, metrics_file: Path, examples: list[LatentExamples],
                 images: list[np.ndarray], captions: list[str]) -> Path:
    """Write the report to ``path`` and return it."""
    lines = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line]
    steps = [line["step"] for line in lines]
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in summary.items())
    cards = []
    for ex in examples:
        thumbs = "".join(
            f'<figure><img src="{_png_data_uri(images[i], heat)}" alt="image {i}" width="96" height="96">'
            f"<figcaption>{html.escape(captions[i])}<br>peak {peak:.2f}</figcaption></figure>"
            for i, heat, peak in zip(ex.images, ex.maps, ex.peaks))
        cards.append(f'<section class="latent"><h3>latent {ex.latent}</h3><p>total activation {ex.total:.1f}</p>'
                     f'<div class="row">{thumbs}</div></section>')
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;color:#222}} table{{border-collapse:collapse}}
th,td{{padding:2px 10px;text-align:left}} .row{{display:flex;flex-wrap:wrap;gap:8px}}
figure{{margin:0;font-size:11px;text-align:center}} .latent{{border-top:1px solid #ddd;padding:6px 0}}</style>
</head><body>
<h1>{html.escape(title)}</h1>
<table>{rows}</table>
<h2>Training curve</h2>
<h3>FVU</h3>{_curve_svg(steps, [line["fvu"] for line in lines], "FVU")}
<h3>dead fraction</h3>{_curve_svg(steps, [line["dead"] for line in lines], "dead fraction")}
<h2>Strongest latents: top-activating images (red: where the latent fires)</h2>
{"".join(cards)}
</body></html>
"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path
