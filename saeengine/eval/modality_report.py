"""The outputs of ``saeengine modality``: modality.json (strict JSON: NaN -> null) and a
self-contained report.html with, per layer, the headline numbers (shared fraction,
AUROC, ...), the modality-score histogram, the p_img vs p_txt firing-rate scatter and the
matched vs mismatched Jaccard histograms. Every picture is a PNG data URI; nothing is
fetched. Fields: docs/modality.md."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from .._atomic import atomic_write_bytes
from ._json import jsonable
from .report import _CSS, _DECODE_CHECK, dict_table, list_html
from .report_plots import _figure, figure_uri

FORMAT, VERSION = "saeengine-modality", 1
JSON_FILE, REPORT_FILE = "modality.json", "report.html"
HEADLINE = ("layer", "shared_fraction", "auroc", "live", "shared", "image", "text", "rare_mixed", "matched_mean",
            "mismatched_mean", "fvu", "l0", "n_image_tokens", "n_text_tokens", "n_pairs")


def score_histogram(score: np.ndarray, low: float, high: float, bins: int = 20) -> str:
    """Histogram of the modality score m over the live latents (score [F], NaN = dead),
    with the shared band [low, high] shaded."""
    live = score[~np.isnan(score)]
    fig = _figure(5.0, 3.0)
    ax = fig.add_axes((0.13, 0.17, 0.83, 0.76))
    ax.axvspan(low, high, color="#f2d5d5", label="shared band")
    if live.size:
        ax.hist(live, bins=bins, range=(0.0, 1.0), color="#2a6fdb")
    ax.set_xlim(0, 1)
    ax.set_xlabel("modality score p_img / (p_img + p_txt)  (0 text, 1 image)")
    ax.set_ylabel("live latents")
    ax.legend(loc="upper center", fontsize=8)
    return figure_uri(fig)


def rate_scatter(p_img: np.ndarray, p_txt: np.ndarray, shared: np.ndarray, min_rate: float) -> str:
    """log10 p_img vs log10 p_txt of the live latents; a rate of 0 is drawn at the floor
    (a decade below the smallest positive rate or min_rate), shared latents in red."""
    live = (p_img > 0) | (p_txt > 0)
    positive = np.concatenate([p_img[p_img > 0], p_txt[p_txt > 0]])
    floor = min(positive.min() if positive.size else 1.0, min_rate if min_rate > 0 else 1.0) / 10
    x, y = np.log10(np.maximum(p_img, floor)), np.log10(np.maximum(p_txt, floor))
    fig = _figure(5.0, 4.0)
    ax = fig.add_axes((0.14, 0.12, 0.82, 0.83))
    rest = live & ~shared
    ax.scatter(x[rest], y[rest], s=6, alpha=0.6, color="#2a6fdb", linewidths=0, label="not shared")
    ax.scatter(x[shared], y[shared], s=8, alpha=0.8, color="#d62728", linewidths=0, label="shared")
    lo = np.log10(floor)
    hi = max(float(np.max(x[live])) if live.any() else 0.0, float(np.max(y[live])) if live.any() else 0.0, lo + 1)
    ax.plot([lo, hi], [lo, hi], ls="--", lw=0.8, color="#555", label="p_img = p_txt")
    ax.set_xlabel(f"log10 p_img (rate 0 drawn at {lo:.1f})")
    ax.set_ylabel("log10 p_txt")
    ax.legend(loc="upper left", fontsize=8)
    return figure_uri(fig)


def jaccard_histogram(matched: np.ndarray, mismatched: np.ndarray, bins: int = 20) -> str:
    """Overlaid histograms of the matched and mismatched pairs' Jaccard overlaps."""
    fig = _figure(5.0, 3.0)
    ax = fig.add_axes((0.13, 0.17, 0.83, 0.76))
    top = max(float(np.max(matched, initial=0)), float(np.max(mismatched, initial=0)), 1e-6)
    ax.hist(mismatched, bins=bins, range=(0, top), alpha=0.6, color="#888", label="mismatched")
    ax.hist(matched, bins=bins, range=(0, top), alpha=0.6, color="#2a6fdb", label="matched")
    ax.set_xlabel("Jaccard overlap of the image's and the caption's active latents")
    ax.set_ylabel("pairs")
    ax.legend(fontsize=8)
    return figure_uri(fig)


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def layer_section(row: dict, latents: dict, grounding: dict, thresholds: dict) -> str:
    score = np.asarray([np.nan if v is None else v for v in latents["score"]], dtype=np.float64)
    p_img, p_txt = np.asarray(latents["p_img"], dtype=np.float64), np.asarray(latents["p_txt"], dtype=np.float64)
    shared = np.asarray(latents["category"]) == "shared"
    plots = (_img(score_histogram(score, thresholds["low"], thresholds["high"]), "modality score histogram") +
             _img(rate_scatter(p_img, p_txt, shared, thresholds["min_rate"]), "firing-rate scatter") +
             _img(jaccard_histogram(np.asarray(grounding["matched"]), np.asarray(grounding["mismatched"])),
                  "Jaccard histograms"))
    return (f'<section class="layer"><h2>{html.escape(str(row["layer"]))}</h2>{dict_table(row)}'
            f'<div class="row">{plots}</div></section>')


def render_report(result: dict) -> str:
    """The report page of a modality.json ``result``."""
    thresholds = result["thresholds"]
    title = f"Shared vision-language latents: {result.get('source', {}).get('name', '')}".rstrip(": ")
    headline = list_html([{key: row.get(key) for key in HEADLINE} for row in result["layers"]])
    rule = (f"shared: {thresholds['low']} &le; m &le; {thresholds['high']} and both firing rates &ge; "
            f"{thresholds['min_rate']}; shared fraction = shared / live latents; AUROC: matched vs mismatched "
            f"(image, caption) pairs by the Jaccard overlap of their active latent sets (min_share "
            f"{thresholds['min_share']}, derangement seed {thresholds['seed']}). Definitions: docs/modality.md.")
    sections = "".join(layer_section(row, result["latents"][row["layer"]], result["grounding"][row["layer"]],
                                     thresholds) for row in result["layers"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="note">{rule}</p>
<h2>Per layer</h2>{headline}
<h3>Source</h3>{dict_table(result.get("source", {}))}
{sections}
{_DECODE_CHECK}
</body></html>
"""


def write_outputs(result: dict, out_dir: str | Path, source: dict) -> dict[str, Path]:
    """Write out_dir/modality.json and out_dir/report.html (each whole, atomically) from an
    analyze() result and a description of its source; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    document = jsonable({"format": FORMAT, "version": VERSION, "source": source, **result, "report": REPORT_FILE})
    text = json.dumps(document, indent=1, allow_nan=False) + "\n"
    paths = {"json": out_dir / JSON_FILE, "report": out_dir / REPORT_FILE}
    atomic_write_bytes(paths["report"], render_report(document).encode())
    atomic_write_bytes(paths["json"], text.encode())
    return paths
