"""The self-contained HTML report of ``saeengine eval``: the reconstruction metrics with
their definitions, the latents' frequency / mean-value scatter and frequency histogram, the
shown latents' cards (activation histogram, exemplar grids with heatmaps), the downstream
metrics, and a table per experiment. Every picture is a PNG data URI; nothing is fetched.

Experiment dicts are rendered generically (a nested dict becomes a nested table, a list
of dicts a table with a column per key), so a new field appears without a change here;
report_experiments adds headline tables for the fields it knows.
"""

from __future__ import annotations

import html
import math
from typing import Any, Sequence

import numpy as np

from .report_latents import LatentCard
from .report_plots import frequency_histogram, frequency_scatter

# One line per reconstruction metric (formulas: docs/eval-metrics.md; fields: docs/eval-report.md).
METRIC_DEFINITIONS = {
    "n_tokens": "tokens encoded",
    "mse": "mean over tokens of ||x - x_hat||^2 (summed over dimensions)",
    "nmse": "sum ||x - x_hat||^2 / sum ||x - mean(x)||^2: the reconstruction's SSE over the mean baseline's",
    "fvu": "fraction of variance unexplained (= nmse)",
    "explained_variance": "1 - sum_j Var_j(x - x_hat) / sum_j Var_j(x) (SAEBench's)",
    "l0": "mean number of latents > 0 per token",
    "l1": "mean over tokens of sum |f|",
    "cosine": "mean over tokens of cos(x, x_hat) (0 when either is zero)",
    "l2_ratio": "mean over tokens with x != 0 of ||x_hat|| / ||x||",
    "relative_reconstruction_bias": "sum ||x_hat||^2 / sum <x, x_hat> (1: unbiased; < 1: shrunk)",
    "dead_fraction": "share of latents that never fired in the pass",
    "dense_fraction": "share of latents firing on more than 1% of tokens",
}

_CSS = """body{font-family:sans-serif;margin:2em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:4px 0 12px}th,td{padding:2px 10px;text-align:left;vertical-align:top;
border-bottom:1px solid #eee}td.num{text-align:right;font-variant-numeric:tabular-nums}
.row{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0;font-size:11px;text-align:center;max-width:110px;
overflow-wrap:anywhere}.latent{border-top:1px solid #ddd;padding:6px 0}.note{color:#666}
.stats{display:flex;gap:16px;align-items:center}h4{margin:6px 0 2px}img.exemplar{border:1px solid #ccc}
.experiment{overflow-x:auto}caption{text-align:left;font-weight:bold;padding:4px 0}"""


# After load, the body records how many of its images the browser decoded (the headless
# Chromium check compares it with the number of images; the page itself needs no script).
_DECODE_CHECK = ("<script>window.addEventListener('load',()=>{const i=[...document.images];"
                 "document.body.dataset.imagesDecoded=i.filter(x=>x.complete&&x.naturalWidth>0).length;"
                 "document.body.dataset.imagesTotal=i.length;});</script>")


def _esc(value: Any) -> str:
    return html.escape(str(value))


def fmt(value: Any) -> str:
    """A scalar for a table cell: floats to 4 significant digits, the rest as str."""
    if value is None:
        return "n/a"  # eval.json's null: a NaN or an undefined number
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return str(value) if not math.isfinite(value) else f"{value:.4g}"
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))


def _cell(value: Any, column: bool = False) -> str:
    """A table cell; numbers in a column of a list table are right-aligned."""
    if isinstance(value, dict):
        return f"<td>{dict_table(value)}</td>"
    if isinstance(value, (list, tuple)):
        return f"<td>{list_html(value)}</td>"
    cls = ' class="num"' if column and _is_number(value) else ""
    return f"<td{cls}>{_esc(fmt(value))}</td>"


def list_html(items: Sequence, limit: int = 20) -> str:
    """A list: dicts with the same keys -> a table with a column per key; scalars -> one
    comma-separated line (the first ``limit`` and a count of the rest)."""
    items = list(items)
    if items and all(isinstance(item, dict) for item in items):
        keys = list(dict.fromkeys(k for item in items for k in item))
        head = "".join(f"<th>{_esc(k)}</th>" for k in keys)
        body = "".join("<tr>" + "".join(_cell(item.get(k, ""), True) for k in keys) + "</tr>" for item in items)
        return f'<table class="data"><tr>{head}</tr>{body}</table>'
    shown = ", ".join(_esc(fmt(item)) if not isinstance(item, (dict, list, tuple)) else _esc(item)
                      for item in items[:limit])
    more = f" ... ({len(items)} in all)" if len(items) > limit else ""
    return f"[{shown}{more}]"


def dict_table(data: dict) -> str:
    """A nested dict -> a two-column table; nested dicts and lists become nested tables."""
    rows = "".join(f"<tr><th>{_esc(k)}</th>{_cell(v)}</tr>" for k, v in data.items())
    return f'<table class="data">{rows}</table>'


def metrics_section(metrics: dict, latents: dict) -> str:
    rows = []
    values = dict(metrics)
    for key in ("dead_fraction", "dense_fraction"):
        values.setdefault(key, latents.get(key))
    for name, value in values.items():
        if isinstance(value, (dict, list)):
            continue
        definition = METRIC_DEFINITIONS.get(name, "see docs/eval-report.md")
        rows.append(f'<tr><th>{_esc(name)}</th><td class="num">{_esc(fmt(value))}</td>'
                    f'<td class="definition">{_esc(definition)}</td></tr>')
    return ('<section id="metrics"><h2>Reconstruction metrics</h2>'
            f'<table class="metrics"><tr><th>metric</th><th>value</th><th>definition</th></tr>{"".join(rows)}'
            "</table></section>")


def latents_section(stats: dict, latents: dict, shown: np.ndarray) -> str:
    frequency = np.asarray(stats["frequency"], dtype=np.float64)
    mean = np.asarray(stats["mean_nonzero"], dtype=np.float64)
    counts = {k: latents[k] for k in ("d_sae", "alive", "dead", "dense") if k in latents}
    quantiles = latents.get("frequency_quantiles", {})
    return ('<section id="latents"><h2>Latents</h2>'
            f"{dict_table(counts)}<h3>Firing frequency quantiles (over all latents)</h3>{dict_table(quantiles)}"
            '<h3>log10 frequency vs log10 mean non-zero value</h3>'
            f'<img class="plot" id="scatter" src="{frequency_scatter(frequency, mean, shown)}" '
            'alt="log10 frequency vs log10 mean value scatter">'
            f'<p class="note">{int(latents.get("dead", 0))} dead latents (never fired) are not plotted.</p>'
            '<h3>Histogram of log10 frequency</h3>'
            f'<img class="plot" id="frequency-histogram" src="{frequency_histogram(frequency)}" '
            'alt="histogram of log10 frequency"></section>')


_RULE_TITLES = {"patch": "patch rule: max over one patch (red: where the latent fires)",
                "image": "image rule: sum over the image's patches",
                "cls": "cls rule: value on the CLS token"}


def card_html(card: LatentCard) -> str:
    rules = []
    for rule, thumbs in card.rules.items():
        figures = "".join(
            f'<figure><img class="exemplar" src="{t.uri}" alt="image {t.image}" width="96" height="96">'
            f"<figcaption>{_esc(t.caption)}<br>{_esc(rule)} {t.score:.3g}</figcaption></figure>" for t in thumbs)
        rules.append(f'<div class="rule" data-rule="{_esc(rule)}"><h4>{_esc(_RULE_TITLES.get(rule, rule))}</h4>'
                     f'<div class="row">{figures}</div></div>')
    body = "".join(rules) or '<p class="note">no exemplars (the latent fired on no image)</p>'
    return (f'<section class="latent" id="latent-{card.latent}"><h3>latent {card.latent}</h3>'
            f'<div class="stats"><img class="plot histogram" src="{card.histogram_uri}" '
            f'alt="activation histogram of latent {card.latent}">'
            f"<p>frequency {fmt(card.frequency)} · mean non-zero {fmt(card.mean_nonzero)} · max {fmt(card.max)} "
            f"· p99 {fmt(card.p99)}</p></div>{body}</section>")


def exemplars_section(cards: list[LatentCard], rule: str, images_note: str) -> str:
    how = ("log10 frequency in [-6, -2] and log10 mean value in [-1, 1] (saev's band), evenly spaced by frequency"
           if rule == "band" else "the most frequent latents (none lies in saev's band)")
    return (f'<section id="exemplars"><h2>Exemplars of {len(cards)} latents</h2>'
            f'<p class="note">Chosen: {_esc(how)}. {_esc(images_note)}</p>{"".join(card_html(c) for c in cards)}'
            "</section>")


def downstream_section(downstream: dict | None) -> str:
    body = (dict_table(downstream) if downstream is not None else
            '<p class="note">Not run: pass --backbone and the images (--images, or a store that recorded image '
            "paths) to splice the SAE into its backbone.</p>")
    return f'<section id="downstream"><h2>Downstream (SAE spliced into the backbone)</h2>{body}</section>'


def experiments_section(experiments: dict) -> str:
    if not experiments:
        return ('<section id="experiments"><h2>Experiments</h2><p class="note">None run (--experiments '
                "classification,segmentation,model-comparison).</p></section>")
    from .report_experiments import summary_html  # it uses fmt from here

    parts = "".join(f'<section class="experiment" id="experiment-{_esc(name)}"><h3>{_esc(name)}</h3>'
                    f"{summary_html(name, result)}<details><summary>All fields</summary>{dict_table(result)}</details>"
                    "</section>"
                    for name, result in experiments.items())
    return f'<section id="experiments"><h2>Experiments</h2>{parts}</section>'


def render_report(result: dict, stats: dict, cards: list[LatentCard], *, images_note: str = "") -> str:
    """The report page of an eval.json ``result`` (metrics, latents, downstream,
    experiments), the encoded ``stats`` (LatentStats result) and the shown latents' cards."""
    latents = result["latents"]
    shown = np.asarray([c.latent for c in cards], dtype=np.int64)
    title = f"SAE evaluation: {result['encoded']}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title><style>{_CSS}</style></head><body>
<h1>{_esc(title)}</h1>
{metrics_section(result["metrics"], latents)}
{latents_section(stats, latents, shown)}
{exemplars_section(cards, latents.get("shown", {}).get("rule", ""), images_note)}
{downstream_section(result.get("downstream"))}
{experiments_section(result.get("experiments") or {})}
{_DECODE_CHECK}
</body></html>
"""
