"""The outputs of ``saeengine ood``: ood.json (strict JSON), ood_scores.npz (every per-image
score) and a self-contained report.html (the metric table per feature kind with the best
value of each column highlighted, ROC curves, the generalization table). Every picture is
a PNG data URI drawn with matplotlib's object API; nothing is fetched. Fields:
docs/ood-run.md.
"""

from __future__ import annotations

import html
import io
import json
from pathlib import Path

import numpy as np

from .._atomic import atomic_write_bytes
from ._json import jsonable
from .report import _CSS, _DECODE_CHECK, dict_table, fmt

JSON_FILE, REPORT_FILE, SCORES_FILE = "ood.json", "report.html", "ood_scores.npz"
METRICS = (("auroc", "AUROC", max), ("fpr95", "FPR95", min), ("aupr_in", "AUPR-in", max),
           ("aupr_out", "AUPR-out", max))

SCORE_DEFINITIONS = {
    "sae.reconstruction": "||x - x_hat||^2 / ||x||^2 (SAE reconstruction error, normalized)",
    "sae.max_latent": "-max_j z_j (a strong latent is ID-like, hence the minus)",
    "sae.energy": "-logsumexp_j z_j over all latents (zeros included)",
    "sae.knn": "cosine distance of the code to its k-th nearest ID training code",
    "sae.class_profile": "1 - max_c Spearman(z, mean code of ID class c) [S: CAP, arXiv 2604.26409]",
    "dense.msp": "-max softmax of a linear probe on the dense features",
    "dense.energy": "-logsumexp of the probe's logits (T = 1)",
    "dense.mahalanobis": "min_c (x - mu_c)^T Sigma^+ (x - mu_c), shared covariance",
    "dense.knn": "cosine distance of x to its k-th nearest ID training feature",
}
METRIC_DEFINITIONS = {
    "AUROC": "P(s_ood > s_id) + 1/2 P(equal): OOD positive; 1 = perfect, 0.5 = chance",
    "FPR95": "share of OOD samples kept as ID at the threshold keeping 95% of ID samples (lower is better)",
    "AUPR-in": "average precision of detecting ID samples (score -s)",
    "AUPR-out": "average precision of detecting OOD samples (score s)",
}


def _esc(value) -> str:
    return html.escape(str(value))


def strip_arrays(doc: dict) -> dict:
    """The document without each kind's per-image "arrays" (what ood.json holds)."""
    out = dict(doc)
    out["kinds"] = {k: {f: v for f, v in r.items() if f != "arrays"} for k, r in doc.get("kinds", {}).items()}
    return out


def scores_npz(doc: dict) -> bytes:
    """ood_scores.npz's bytes: one float64 array per (kind, score, set) named
    "<kind>/<score>/<set>" ("id" = the ID test set)."""
    arrays = {f"{kind}/{score}/{name}": np.asarray(values, dtype=np.float64)
              for kind, result in doc.get("kinds", {}).items()
              for score, per in (result.get("arrays") or {}).items() for name, values in per.items()}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


# ----- the page ------------------------------------------------------------------------------
def metric_table(result: dict) -> str:
    """The score x (OOD set x metric) table of one kind; the best value of each column
    (max AUROC / AUPR, min FPR95) is marked ``class="best"``. Group means (near / far
    AUROC and FPR95) follow the sets."""
    sets = list(result["sets"])
    metrics = result["metrics"]
    scores = list(metrics)
    groups = sorted({g for per in result.get("group_means", {}).values() for g in per})
    head1 = "".join(f'<th colspan="{len(METRICS)}" class="set">{_esc(s)}'
                    f'{" (" + _esc(result["sets"][s]["group"]) + ")" if result["sets"][s]["group"] else ""}</th>'
                    for s in sets)
    head1 += "".join(f'<th colspan="2" class="group">mean {_esc(g)}-OOD</th>' for g in groups)
    head2 = "".join(f"<th>{label}</th>" for _ in sets for _, label, _ in METRICS)
    head2 += "".join("<th>AUROC</th><th>FPR95</th>" for _ in groups)
    columns = []  # (values per score, better)
    for s in sets:
        for key, _, better in METRICS:
            columns.append(([metrics[sc][s][key] for sc in scores], better))
    for g in groups:
        for key, better in (("auroc", max), ("fpr95", min)):
            columns.append(([result["group_means"][sc].get(g, {}).get(key) for sc in scores], better))
    best = []
    for values, better in columns:
        present = [v for v in values if v is not None]
        best.append(better(present) if present else None)
    rows = []
    for i, sc in enumerate(scores):
        cells = []
        for (values, _), top in zip(columns, best):
            v = values[i]
            cls = "num best" if v is not None and v == top else "num"
            cells.append(f'<td class="{cls}">{_esc(fmt(v))}</td>')
        family, _, name = sc.partition(".")
        rows.append(f'<tr data-score="{_esc(sc)}"><th title="{_esc(SCORE_DEFINITIONS.get(sc, ""))}">'
                    f'{_esc(family)}: {_esc(name)}</th>{"".join(cells)}</tr>')
    return (f'<table class="ood-metrics"><tr><th rowspan="2">score</th>{head1}</tr><tr>{head2}</tr>'
            f'{"".join(rows)}</table>')


def markdown_table(result: dict, digits: int = 3) -> str:
    """One kind's AUROC / FPR95 per score (rows) and OOD set (columns) as a Markdown table
    (what the README shows); the best AUROC of each column in bold."""
    sets = list(result["sets"])
    metrics = result["metrics"]
    top = {s: max(per[s]["auroc"] for per in metrics.values()) for s in sets}
    lines = ["| score | " + " | ".join(f"{s} AUROC / FPR95" for s in sets) + " |",
             "|---|" + "---|" * len(sets)]
    for score, per in metrics.items():
        cells = []
        for s in sets:
            auroc = f"{per[s]['auroc']:.{digits}f}"
            auroc = f"**{auroc}**" if per[s]["auroc"] == top[s] else auroc
            cells.append(f"{auroc} / {per[s]['fpr95']:.{digits}f}")
        lines.append(f"| {score} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def roc_figure(result: dict) -> str | None:
    """One PNG data URI: a panel per OOD set with every score's ROC curve (OOD positive,
    :func:`saeengine.eval.ood.roc_points`); None when the result holds no per-image scores."""
    from matplotlib.figure import Figure

    from .ood import roc_points

    arrays = result.get("arrays")
    if not arrays:
        return None
    sets = list(result["sets"])
    cols = min(3, len(sets))
    rows = -(-len(sets) // cols)
    fig = Figure(figsize=(4.0 * cols, 3.6 * rows + 0.8), dpi=80)
    scores = list(arrays)
    colours = {sc: (f"C{i % 10}", "-" if sc.startswith("sae.") else "--") for i, sc in enumerate(scores)}
    for j, s in enumerate(sets):
        ax = fig.add_subplot(rows, cols, j + 1)
        for sc in scores:
            fpr, tpr = roc_points(arrays[sc]["id"], arrays[sc][s])
            colour, style = colours[sc]
            ax.plot(fpr, tpr, style, color=colour, lw=1.2, label=sc)
        ax.plot([0, 1], [0, 1], ":", color="#999", lw=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_title(s, fontsize=10)
        ax.set_xlabel("false positive rate (ID flagged)", fontsize=8)
        ax.set_ylabel("true positive rate (OOD flagged)", fontsize=8)
        ax.tick_params(labelsize=7)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(scores)), fontsize=8, frameon=False)
    fig.subplots_adjust(left=0.08, right=0.98, top=0.94, bottom=0.8 / (3.6 * rows + 0.8) + 0.08, hspace=0.45,
                        wspace=0.3)
    from .report_plots import figure_uri

    return figure_uri(fig)


def generalization_table(general: dict | None) -> str:
    """Probe accuracy on the ID test set and each labelled OOD set (shift / ID ratio), for
    the probe on SAE codes and the one on dense features."""
    if not general:
        return '<p class="note">Not run.</p>'
    sets = general["sets"]
    head = "<th>probe</th><th>width</th><th>train</th><th>ID test</th>" + "".join(
        f"<th>{_esc(s)}</th><th>{_esc(s)} / ID</th>" for s in sets)
    rows = []
    names = {"sae_codes": "SAE codes", "dense": "dense features"}
    for view, p in general["probes"].items():
        cells = "".join(f'<td class="num">{_esc(fmt(p["sets"][s]["accuracy"]))}</td>'
                        f'<td class="num">{_esc(fmt(p["sets"][s]["ratio"]))}</td>' for s in sets)
        rows.append(f'<tr data-probe="{_esc(view)}"><th>{_esc(names.get(view, view))}</th>'
                    f'<td class="num">{p["d"]}</td><td class="num">{_esc(fmt(p["train"]))}</td>'
                    f'<td class="num">{_esc(fmt(p["id_test"]))}</td>{cells}</tr>')
    note = "" if sets else '<p class="note">No OOD set has labels: only the ID test accuracy is shown.</p>'
    return f'<table class="generalization"><tr>{head}</tr>{"".join(rows)}</table>{note}'


def kind_section(kind: str, result: dict) -> str:
    level = result["level"]
    what = (f"{result['tokens_per_image']['id_train']} tokens per image; an image's SAE score is the mean of its "
            "token scores, the dense baselines and the dense probe see its mean token"
            if level == "token" else "one feature vector per image")
    uri = roc_figure(result)
    roc = (f'<img class="plot roc" src="{uri}" alt="ROC curves of every score, one panel per OOD set">' if uri
           else '<p class="note">No per-image scores in this document: ROC curves not drawn.</p>')
    counts = {"ID train images": result["n_id_train"], "ID test images": result["n_id_test"],
              "classes": result["n_classes"], "d_in": result["d_in"], "d_sae": result["d_sae"],
              **{f"OOD {n}": s["n"] for n, s in result["sets"].items()}}
    return (f'<section class="kind" id="kind-{_esc(kind)}"><h2>{_esc(kind)} ({_esc(level)}-level)</h2>'
            f'<p class="note">{_esc(what)}.</p>{dict_table(counts)}'
            f'<h3>Detection (best per column highlighted)</h3>{metric_table(result)}'
            f"<h3>ROC curves (solid: SAE scores, dashed: dense baselines)</h3>{roc}"
            f"<h3>OOD generalization: linear probe accuracy</h3>{generalization_table(result.get('generalization'))}"
            f"<details><summary>Settings</summary>{dict_table(result.get('settings', {}))}</details></section>")


def render_ood_report(doc: dict) -> str:
    """The report page of an OOD document (the dict written to ood.json, with each kind's
    "arrays" for the ROC curves)."""
    title = f"OOD detection: {doc.get('title') or doc.get('mode', '')}"
    defs = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in
                   {**SCORE_DEFINITIONS, **METRIC_DEFINITIONS}.items())
    about = {k: v for k, v in doc.items() if k not in ("kinds", "format", "version", "title")
             and not isinstance(v, (dict, list))}
    datasets = doc.get("datasets")
    data_html = f"<h2>Datasets</h2>{dict_table(datasets)}" if isinstance(datasets, dict) else ""
    kinds = "".join(kind_section(k, r) for k, r in doc.get("kinds", {}).items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title><style>{_CSS}
td.best{{font-weight:bold;background:#dff3df}}th.set,th.group{{text-align:center;border-left:1px solid #ccc}}
img.roc{{max-width:100%}}</style></head><body>
<h1>{_esc(title)}</h1>
{dict_table(about)}{data_html}
<section id="definitions"><h2>Definitions (higher score = more OOD; docs/ood-run.md)</h2>
<table class="definitions">{defs}</table></section>
{kinds}
{_DECODE_CHECK}
</body></html>
"""


def write_ood(out_dir: str | Path, doc: dict) -> dict[str, Path]:
    """Write ood.json (strict JSON, without the per-image arrays, plus "files"),
    ood_scores.npz and report.html under ``out_dir`` (created), each atomically; returns
    {"json", "scores", "report"} -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / JSON_FILE, "scores": out / SCORES_FILE, "report": out / REPORT_FILE}
    page = render_ood_report(doc)  # before any file: a failing plot leaves no half-set of outputs
    summary = {**strip_arrays(doc), "files": {"report": REPORT_FILE, "scores": SCORES_FILE}}
    text = json.dumps(jsonable(summary), indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(paths["scores"], scores_npz(doc))
    atomic_write_bytes(paths["report"], page.encode())
    atomic_write_bytes(paths["json"], text.encode())  # last: ood.json marks a finished output
    return paths
