"""attributes.json and the self-contained attributes.html of attribute discovery: the
ranked table of latents with their kept attributes, and per latent a strip of seed-paired
base / steered images, a plot of its attribute effects against the null's, and every
tested attribute's statistics. Pictures are PNG data URIs; nothing is fetched."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np

from .._atomic import atomic_write_bytes
from ._json import jsonable
from .attributes import Discovery
from .report import _CSS, _DECODE_CHECK, dict_table, fmt, list_html
from .report_plots import _figure, exemplar_uri, figure_uri

_COLUMNS = ("attribute", "describer", "kind", "kept", "effect", "p_value", "consistency", "mean_change",
            "paired_d", "n_pairs", "detection_threshold", "beats_null_max")
_PLOT_CLIP = 12.0  # effects beyond this (and infinite ones) are drawn at the plot's edge

DEFINITIONS = (
    "Per (latent, attribute): change c_i = steered - base for seed-paired pair i (hue: wrapped into [-0.5, 0.5) "
    "turns; a label: 1 if the top-1 class changed); m = mean c_i. Null: K random directions of the latent's norm, "
    "their mean changes mu_k, with mean mu0 and std s0. effect = (m - mu0) / s0. p: the t test of m against the "
    "null's normal (t = (m - mu0) / (s0 sqrt(1 + 1/K)), K - 1 dof). consistency: share of pairs with "
    "|c_i| > the null's 95th percentile |c| in the sign of m - mu0. Kept: p < significance / (attributes tested), "
    "|m - mu0| beyond every null's, and consistency >= the minimum. Ours [P]; see docs/attributes.md.")


def _esc(value) -> str:
    return html.escape(str(value))


def _effect(a: dict) -> str:
    """The effect for a cell; an infinite one (the nulls have no spread; null in JSON) as +-inf."""
    if a["effect"] is None and a.get("null_spread_zero") and a["sign"]:
        return "+inf" if a["sign"] > 0 else "-inf"
    return fmt(a["effect"])


def _kept_summary(latent: dict) -> str:
    parts = [f"{_esc(a['attribute'])} (consistency {fmt(a['consistency'])}, effect {_esc(_effect(a))})"
             for a in latent["attributes"] if a["kept"]]
    return "; ".join(parts) or '<span class="note">none beats the null</span>'


def ranked_table(latents: list[dict]) -> str:
    rows = "".join(
        f'<tr><td class="num">{r["rank"]}</td><td><a href="#latent-{r["latent"]}">{r["latent"]}</a></td>'
        f'<td>{_esc(r["name"] or "-")}</td><td>{_kept_summary(r)}</td><td class="num">{_esc(fmt(r["norm"]))}</td>'
        f'<td class="num">{r["n_tested"]}</td></tr>' for r in latents)
    return ('<table class="ranked"><tr><th>rank</th><th>latent</th><th>name</th><th>kept attributes</th>'
            f"<th>||direction||</th><th>attributes tested</th></tr>{rows}</table>")


def effect_plot(latent: dict) -> str | None:
    """Each tested attribute's effect (red) beside the null directions' own standardized
    effects (grey), as a PNG data URI; None when no attribute has a null spread."""
    rows = [a for a in latent["attributes"] if a["effect"] is not None or a.get("null_spread_zero")]
    rows = [a for a in rows if a["null"]["std"] is not None][:20]
    if not rows:
        return None
    fig = _figure(max(3.0, 0.45 * len(rows) + 1.2), 2.4)
    ax = fig.add_axes((0.14, 0.34, 0.83, 0.6))
    for x, a in enumerate(rows):
        null = a["null"]
        if null["std"] and null["std"] > 0:
            z = (np.asarray(null["means"], dtype=np.float64) - null["mean"]) / null["std"]
            ax.scatter(np.full(z.size, x), np.clip(z, -_PLOT_CLIP, _PLOT_CLIP), s=8, color="#999", linewidths=0)
        e = a["effect"]
        e = _PLOT_CLIP * (1 if a["sign"] >= 0 else -1) if e is None or not math.isfinite(e) else e
        ax.scatter([x], [max(-_PLOT_CLIP, min(_PLOT_CLIP, e))], s=26, marker="D",
                   color="#d62728" if a["kept"] else "#2a6fdb", linewidths=0)
    ax.axhline(0, color="#555", lw=0.6)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([a["attribute"] for a in rows], rotation=35, ha="right", fontsize=7)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_ylabel("effect (null s.d.)", fontsize=7)
    return figure_uri(fig)


def _strip(base: np.ndarray, steered: np.ndarray, prompts: list[str], alpha: float) -> str:
    figures = "".join(
        f'<figure><img src="{exemplar_uri(b, None, 96)}" alt="base {i}" width="96" height="96">'
        f'<img src="{exemplar_uri(s, None, 96)}" alt="steered {i}" width="96" height="96">'
        f"<figcaption>{_esc(prompts[i])}<br>top: alpha 0, bottom: alpha {fmt(alpha)}</figcaption></figure>"
        for i, (b, s) in enumerate(zip(base, steered)))
    return f'<div class="row strip">{figures}</div>'


def latent_section(latent: dict, examples, settings: dict) -> str:
    strip = (_strip(*examples, settings["prompts"], settings["alpha"]) if examples is not None and len(examples[0])
             else '<p class="note">no example pairs kept</p>')
    plot = effect_plot(latent)
    plot_html = (f'<img class="plot" src="{plot}" alt="effects of latent {latent["latent"]} against the null">'
                 if plot else "")
    rows = []
    for a in latent["attributes"]:
        row = {k: a.get(k) for k in _COLUMNS}
        row["effect"] = _effect(a)
        null = a["null"]
        row.update(null_mean=null["mean"], null_std=null["std"], null_max_deviation=null["max_deviation"],
                   n_null=null["n"])
        if "gained" in a:
            row["gained"] = ", ".join(f"{g['class']} (+{g['net']})" for g in a["gained"]) or "-"
            row["lost"] = ", ".join(f"{g['class']} ({g['net']})" for g in a["lost"]) or "-"
        rows.append(row)
    return (f'<section class="latent" id="latent-{latent["latent"]}"><h3>#{latent["rank"]}: latent '
            f'{latent["latent"]} &mdash; {_esc(latent["name"] or "nothing kept")}</h3>'
            f'<p>||direction|| {fmt(latent["norm"])} · {latent["n_tested"]} attributes tested · Bonferroni level '
            f'{fmt(latent["bonferroni_level"])}</p>{strip}{plot_html}'
            f'<details{" open" if latent["kept"] else ""}><summary>All tested attributes</summary>'
            f"{list_html(rows)}</details></section>")


def render_html(result: dict, examples: dict) -> str:
    settings = result["settings"]
    shown = {k: v for k, v in settings.items() if k not in ("prompts", "seeds")}
    shown["prompts"] = f"{len(settings['prompts'])} (seeds {settings['seeds'][0]} .. {settings['seeds'][-1]})"
    source = result.get("source") or {}
    title = "Attribute discovery" + (f": {source.get('pipeline') or source.get('generator')}" if source else "")
    sections = "".join(latent_section(r, examples.get(r["latent"]), settings) for r in result["latents"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title><style>{_CSS}
.strip figure{{max-width:200px}}.strip img{{display:block;margin:1px auto;border:1px solid #ccc}}</style></head><body>
<h1>{_esc(title)}</h1>
<p class="note">{_esc(DEFINITIONS)}</p>
<section id="settings"><h2>Settings</h2>{dict_table({**source, **shown})}</section>
<section id="ranked"><h2>Latents, ranked</h2>{ranked_table(result["latents"])}</section>
<section id="latents"><h2>Per latent</h2>{sections}</section>
{_DECODE_CHECK}
</body></html>"""


def write_attributes(out_dir, discovery: Discovery, source: dict | None = None) -> dict[str, Path]:
    """Write ``out_dir``/attributes.json (strict JSON) and attributes.html, each whole and
    atomically; ``source`` (pipeline, sae, layer, ...) is recorded in both."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(discovery.result)
    if source:
        result["source"] = jsonable(source)
    result["report"] = "attributes.html"
    data = jsonable(result)
    json_path, html_path = out / "attributes.json", out / "attributes.html"
    atomic_write_bytes(json_path, (json.dumps(data, indent=1, allow_nan=False) + "\n").encode())
    atomic_write_bytes(html_path, render_html(data, discovery.examples).encode())
    return {"json": json_path, "html": html_path}
