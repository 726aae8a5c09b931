"""The sweep's pictures and page: an image grid per latent (rows prompts, columns alphas,
labelled), the metrics against alpha, and a self-contained report.html (every image a PNG
data URI). Plots use matplotlib's object API (no pyplot), as the evaluation report does."""

from __future__ import annotations

import base64
import io
import html

import numpy as np

from ..eval.report import _CSS, _DECODE_CHECK, dict_table, fmt
from ..eval.report_plots import figure_uri

_CELL_IN = 1.4  # inches per grid cell (140 px at the figures' 100 dpi)
_PLOTTED = ("pixel_mae", "top1_change", "kl", "clip_prompt", "clip_attribute")


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _short(text: str, limit: int = 28) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def grid_png(images: np.ndarray, prompts: list[str], alphas: list[float], title: str = "") -> bytes:
    """uint8 images [A, P, H, W, 3] -> PNG bytes: one row per prompt, one column per alpha,
    columns headed "alpha = a" (the alpha = 0 column framed), rows labelled with the prompt."""
    n_alpha, n_prompt = images.shape[:2]
    fig = _figure(_CELL_IN * n_alpha + 1.8, _CELL_IN * n_prompt + 0.7)
    left, top = 1.8 / fig.get_figwidth(), 0.7 / fig.get_figheight()
    grid = fig.add_gridspec(n_prompt, n_alpha, left=left, right=0.995, bottom=0.01, top=1 - top,
                            wspace=0.04, hspace=0.04)
    for a in range(n_alpha):
        for p in range(n_prompt):
            ax = fig.add_subplot(grid[p, a])
            ax.imshow(images[a, p], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if alphas[a] == 0.0:
                for spine in ax.spines.values():
                    spine.set_edgecolor("#d62728")
                    spine.set_linewidth(2)
            if p == 0:
                ax.set_title(f"alpha = {alphas[a]:+g}" if alphas[a] else "alpha = 0", fontsize=9)
            if a == 0:
                ax.set_ylabel(_short(prompts[p]), fontsize=8, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9, y=1 - 0.12 / fig.get_figheight(), va="top")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    return buf.getvalue()


def metrics_plot(sweep: list[dict]) -> str:
    """The sweep's metrics (those present) against alpha, one panel each -> PNG data URI."""
    names = [n for n in _PLOTTED if all(n in row for row in sweep)]
    fig = _figure(2.6 * len(names), 2.2)
    alphas = [row["alpha"] for row in sweep]
    for i, name in enumerate(names):
        ax = fig.add_axes((0.06 + i / len(names), 0.2, 0.8 / len(names), 0.68))
        ax.plot(alphas, [row[name] for row in sweep], marker="o", color="#1f77b4")
        ax.axvline(0, color="#999", linewidth=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("alpha", fontsize=8)
        ax.tick_params(labelsize=7)
    return figure_uri(fig)


def _table(sweep: list[dict]) -> str:
    keys = [k for k in dict.fromkeys(k for row in sweep for k in row) if k != "per_prompt"]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f'<td class="num">{html.escape(fmt(row.get(k)))}</td>' for k in keys) + "</tr>"
                   for row in sweep)
    return f'<table class="data"><tr>{head}</tr>{body}</table>'


def render_report(data: dict, pngs: dict[int, bytes]) -> str:
    """report.html from sweep.json's content ``data`` and the grids' PNG bytes {latent: png}."""
    sections = []
    for entry in data["latents"]:
        j = entry["latent"]
        uri = "data:image/png;base64," + base64.b64encode(pngs[j]).decode()
        facts = {k: entry.get(k) for k in ("max_activation", "direction_norm", "attribute", "grid")}
        sections.append(f"""<div class="latent"><h2>latent {j}</h2>{dict_table(facts)}
<img class="grid" alt="latent {j} alpha sweep" src="{uri}">
<img alt="latent {j} metrics against alpha" src="{metrics_plot(entry['sweep'])}">
<div class="experiment">{_table(entry['sweep'])}</div></div>""")
    title = "Steering sweep through the text encoder"
    note = ("Each image is seed-paired with the alpha = 0 image of its prompt (framed red). pixel_mae and "
            "pixel_rmse: mean |x - x0| / 255 and RMS / 255; top1_change and kl: EfficientNet-Lite0's ImageNet top-1 "
            "change rate and KL(p0 || p); clip_*: 100 max(cos, 0) with the given CLIP model; definitions in "
            "docs/steer.md.")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{_CSS}
img.grid{{max-width:100%;border:1px solid #ccc}}</style></head><body>
<h1>{title}</h1><p class="note">{html.escape(note)}</p>
{dict_table({"settings": data["settings"], "prompts": data["prompts"], "seeds": data["seeds"],
             "alphas": data["alphas"]})}
{''.join(sections)}
{_DECODE_CHECK}
</body></html>
"""
