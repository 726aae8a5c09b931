"""The ontology recovery outputs: ontology.json (strict JSON) and a self-contained
report.html rendered from it alone (so a saved result can be re-rendered):

- the hierarchy and settings; an overview table (per layer: the SAE's live and kept
  latents, mean LCH height, coverage, and each null's coverage and mean height);
- per layer: a table of the SAE and the nulls, a height histogram (PNG data URI), the
  coverage per depth band, and a few latents with their top images' labels.

    python -m saeengine.eval.ontology_report RESULT.json [--out report.html]

renders a saved result (ontology.json, or an experiment file holding it under
"ontology"); the default output is RESULT.html beside it.
"""

from __future__ import annotations

import argparse
import html
import json
from pathlib import Path

import numpy as np

from .report import _CSS, _DECODE_CHECK, dict_table, fmt
from .report_experiments import rows_table

_SUMMARY_COLUMNS = [("name", "latents from"), ("n_latents", "latents"), ("mean_height", "mean LCH height"),
                    ("median_height", "median height"), ("mean_node_height", "mean τ-node height"),
                    ("no_common_hypernym", "no common hypernym"), ("mean_purity", "mean purity"),
                    ("mean_subtree_purity", "mean subtree purity"), ("covered", "nodes covered"),
                    ("coverage", "coverage"), ("coverage_attainable", "coverage (attainable)")]
_COLORS = ("#2a6fdb", "#d62728", "#7f7f7f", "#2ca02c", "#ff7f0e")


def _esc(value) -> str:
    return html.escape(str(value))


def ontology_of(result: dict) -> tuple[dict, dict]:
    """(the ontology result, the surrounding experiment dict or {}) of either shape."""
    if "layers" in result:
        return result, {}
    if isinstance(result.get("ontology"), dict) and "layers" in result["ontology"]:
        return result["ontology"], result
    raise ValueError("not an ontology result: expected a 'layers' field, or an 'ontology' field holding one")


def height_plot(layer: dict) -> str:
    """Grouped bars of the LCH height histogram: the SAE and each null (share of latents)."""
    from matplotlib.ticker import MaxNLocator

    from .report_plots import _figure, figure_uri

    series = [("SAE", layer["sae"])] + list(layer["nulls"].items())
    fig = _figure(7.0, 2.8)
    ax = fig.add_axes((0.08, 0.17, 0.9, 0.75))
    width = 0.8 / len(series)
    for i, (name, summary) in enumerate(series):
        counts = np.asarray(summary["height_histogram"], dtype=np.float64)
        total = counts.sum()
        share = counts / total if total else counts
        ax.bar(np.arange(counts.size) + (i - (len(series) - 1) / 2) * width, share, width=width,
               color=_COLORS[i % len(_COLORS)], label=f"{name} ({int(total)})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("LCH height (0 = one class)")
    ax.set_ylabel("share of latents")
    ax.legend(fontsize=7, loc="upper left")
    return figure_uri(fig)


def _band_table(layer: dict) -> str:
    series = [("SAE", layer["sae"])] + list(layer["nulls"].items())
    bands = [b["depths"] for b in layer["sae"]["coverage_by_band"]]
    head = "".join(f"<th>depth {_esc(b)} ({layer['sae']['coverage_by_band'][i]['internal']} internal, "
                   f"{layer['sae']['coverage_by_band'][i]['attainable']} attainable)</th>" for i, b in enumerate(bands))
    rows = []
    for name, summary in series:
        cells = "".join(f'<td class="num">{_esc(fmt(b["coverage"]))} ({b["covered"]})</td>'
                        for b in summary["coverage_by_band"])
        rows.append(f"<tr><th>{_esc(name)}</th>{cells}</tr>")
    return (f'<table class="bands"><caption>Coverage per depth band of the internal nodes (nodes covered in '
            f'brackets)</caption><tr><th></th>{head}</tr>{"".join(rows)}</table>')


def _examples(layer: dict) -> str:
    rows = layer.get("examples") or []
    if not rows:
        return '<p class="note">No latent was kept (see the latent counts).</p>'
    shown = [{**r, "top_labels": ", ".join(str(t) for t in r.get("top_labels", []))} for r in rows]
    return rows_table(shown, [("latent", "latent"), ("frequency", "frequency"), ("purity", "purity"),
                              ("modal", "modal label"), ("lch_name", "LCH"), ("height", "height"),
                              ("node_name", "τ-node"), ("node_height", "τ-node height"),
                              ("subtree_purity", "subtree purity"), ("top_labels", "top images' labels")],
                      "A few kept latents, spread over their τ-node height")


def layer_section(name: str, layer: dict) -> str:
    rows = [{"name": "SAE", **layer["sae"]}] + [{"name": f"null: {n}", **s} for n, s in layer["nulls"].items()]
    counts = {"images": layer["n_images"], "labels seen": layer["n_labels_seen"], "d_in": layer["d_in"],
              "d_sae": layer["d_sae"], **{f"latents {k}": v for k, v in layer["latents"].items()}}
    return (f'<section class="layer" id="layer-{_esc(name)}"><h2>Layer {_esc(name)}</h2>{dict_table(counts)}'
            f"{rows_table(rows, _SUMMARY_COLUMNS, 'SAE latents and the null baselines')}"
            f'<img class="plot" src="{height_plot(layer)}" alt="LCH height histogram of layer {_esc(name)}">'
            f"{_band_table(layer)}{_examples(layer)}</section>")


def overview(result: dict) -> str:
    """One row per layer: the SAE's counts, mean height and coverage, and each null's."""
    layers = result["layers"]
    nulls = list(next(iter(layers.values()))["nulls"]) if layers else []
    columns = [("layer", "layer"), ("live", "live latents"), ("kept", "kept"), ("mean_height", "mean height"),
               ("coverage", "coverage"), ("coverage_attainable", "coverage (attainable)")]
    for null in nulls:
        columns += [(f"{null}.coverage", f"{null}: coverage"), (f"{null}.mean_height", f"{null}: mean height")]
    rows = [{"layer": name, "live": layer["latents"]["live"], "kept": layer["latents"]["kept"],
             "mean_height": layer["sae"]["mean_height"], "coverage": layer["sae"]["coverage"],
             "coverage_attainable": layer["sae"]["coverage_attainable"], **layer["nulls"]}
            for name, layer in layers.items()]
    return rows_table(rows, columns, "Per layer: the SAE against the null baselines")


_DEFINITIONS = ("Per kept latent: its top-N images (largest values); purity = share of the modal label; LCH = "
                "lowest common hypernym of their labels, height = longest path from it down to a leaf (0 = one "
                "class); τ-node = deepest node holding at least τ of the top images (its subtree purity). "
                "Coverage = share of the internal nodes that are some latent's τ-node; 'attainable' counts only "
                "the internal nodes the labels seen in the data can reach. Nulls: the same measures on shuffled "
                "labels, random directions, PCA directions and raw feature dimensions. Definitions: "
                "docs/ontology.md (ours [P]).")


def render(result: dict) -> str:
    """The report page of an ontology result (or an experiment dict holding one)."""
    onto, experiment = ontology_of(result)
    title = "Ontology recovery" + (" (smoke test)" if experiment.get("smoke_test") else "")
    note = f'<p class="note"><b>{_esc(experiment["note"])}</b></p>' if experiment.get("note") else ""
    settings = dict_table(onto.get("settings", {}))
    hierarchy = dict_table(onto.get("hierarchy", {}))
    extra = ""
    if experiment:
        shown = {k: v for k, v in experiment.items() if k not in ("ontology", "note")}
        extra = f"<details><summary>Experiment fields</summary>{dict_table(shown)}</details>"
    layers = "".join(layer_section(name, layer) for name, layer in onto["layers"].items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title><style>{_CSS}</style></head><body>
<h1>{_esc(title)}</h1>{note}
<p class="note">{_esc(_DEFINITIONS)}</p>
<section id="overview"><h2>Overview</h2>{overview(onto)}
<details><summary>Hierarchy</summary>{hierarchy}</details><details><summary>Settings</summary>{settings}</details>
{extra}</section>
{layers}
{_DECODE_CHECK}
</body></html>
"""


def to_json(result: dict) -> bytes:
    """Strict JSON (NaN -> null) of a result."""
    from ._json import jsonable

    return (json.dumps(jsonable(result), indent=2, allow_nan=False) + "\n").encode()


def write_outputs(result: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """ontology.json and report.html under out_dir, each written whole (atomically)."""
    from .._atomic import atomic_write_bytes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = to_json(result)
    atomic_write_bytes(out / "ontology.json", data)
    atomic_write_bytes(out / "report.html", render(json.loads(data)).encode())
    return out / "ontology.json", out / "report.html"


def main(argv: list[str] | None = None) -> int:
    from .._atomic import atomic_write_bytes

    parser = argparse.ArgumentParser(prog="python -m saeengine.eval.ontology_report",
                                     description="Render a saved ontology result as a self-contained HTML page.")
    parser.add_argument("result", type=Path, help="ontology.json, or an experiment file with an 'ontology' field")
    parser.add_argument("--out", type=Path, default=None, help="the HTML file (default: RESULT with .html)")
    args = parser.parse_args(argv)
    result = json.loads(args.result.read_text(encoding="utf-8"))
    out = args.out or args.result.with_suffix(".html")
    atomic_write_bytes(out, render(result).encode())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
