"""Headline tables of the known experiments' result dicts, shown above each experiment's
full (generic) table in the evaluation report. A summary that does not find its fields
(an experiment's dict changed) is left out; the generic table still shows everything."""

from __future__ import annotations

import html
from typing import Callable

from .report import _is_number, fmt


def rows_table(rows: list[dict], columns: list[tuple[str, str]], caption: str = "") -> str:
    """A table with one row per dict and the given (key, title) columns ("a.b" reads a
    nested key); a missing value shows as "n/a"."""
    def get(row: dict, key: str):
        for part in key.split("."):
            row = row.get(part) if isinstance(row, dict) else None
        return row

    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in columns)
    def cell(value) -> str:
        cls = ' class="num"' if _is_number(value) else ""
        return f"<td{cls}>{html.escape(fmt(value))}</td>"

    body = "".join("<tr>" + "".join(cell(get(row, key)) for key, _ in columns) + "</tr>" for row in rows)
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f'<table class="summary">{cap}<tr>{head}</tr>{body}</table>'


def model_comparison(result: dict) -> str:
    rows = [{"extractor": name, **fields} for name, fields in result["extractors"].items()]
    table = rows_table(rows, [("extractor", "extractor"), ("mean_f1_cross", "cross-style F1 (best latent)"),
                              ("mean_random_f1", "random latents' F1"), ("p_value_mean", "p (vs random)"),
                              ("n_significant_05", "digits with p < 0.05"), ("mean_f1_select", "F1 on own style"),
                              ("mean_f1_oracle_b", "oracle F1 on other style"), ("sae.fvu", "SAE FVU")],
                       "Concept F1 across styles (MNIST -> sklearn digits), per feature extractor")
    return (table + _verdict("real EfficientNet-Lite0 beats random weights", result.get("real_beats_random"))
            + _verdict("real EfficientNet-Lite0 beats pixel PCA", result.get("real_beats_pca"))
            + f"<p>F1 of always answering yes: {html.escape(fmt(result.get('trivial_f1')))}</p>")


def _verdict(text: str, value) -> str:
    return f"<p>{html.escape(text)}: <b>{html.escape(fmt(value))}</b></p>"


_EFFECT_COLUMNS = [("condition", "condition"), ("delta_p_true_mean", "Δp(true) mean"),
                   ("delta_p_true_std", "Δp(true) std"), ("p_true_before", "p(true) before"),
                   ("p_true_after", "p(true) after"), ("flip_rate", "flip rate"),
                   ("top1_changed", "top-1 changed"), ("n", "digits")]


def classification(result: dict) -> str:
    probe = result["probe"]
    parts = [rows_table([probe], [("test_accuracy", "probe test accuracy"), ("train_accuracy", "train accuracy"),
                                  ("n_test", "test digits"), ("n_train", "train digits")],
                        f"Linear probe on the pooled embedding; SAE on {result.get('layer', '?')}")]
    for scale, effects in result["scales"].items():
        main = " (main setting)" if float(scale) == float(result.get("main_scale", "nan")) else ""
        rows = [{"condition": name, **effects[name]} for name in ("chosen", "random_latent", "random_vector")]
        parts.append(rows_table(rows, _EFFECT_COLUMNS, f"Latents set to {scale} x max on the chosen patches{main}"))
        parts.append(rows_table([effects], [("p_value_vs_random_latent", "p (chosen < random latent)"),
                                            ("p_value_vs_random_vector", "p (chosen < random vector)"),
                                            ("beats_random_latent", "beats random latent"),
                                            ("beats_random_vector", "beats random vector"),
                                            ("random_latent_active", "random latent active")]))
    parts.append(_verdict(f"chosen latents beat both baselines by the margin {fmt(result.get('margin'))} "
                          "(Δp lower and flip rate higher) at the main setting", result["beats_baselines"]))
    return "".join(parts)


def segmentation(result: dict) -> str:
    probe = result["probe"]
    parts = [rows_table([probe], [("miou_patches", "mIoU (patches)"), ("miou_pixels", "mIoU (pixels)"),
                                  ("patch_accuracy", "patch accuracy"), ("digit_patch_accuracy", "digit patches"),
                                  ("n_test_patches", "test patches")],
                        "Patch probe (background ignored in mIoU)")]
    pooled = [{"condition": name, **rates} for name, rates in result["pooled"].items()]
    parts.append(rows_table(pooled, [("condition", "condition"), ("target_rate", "target change rate"),
                                     ("target_std", "std"), ("other_rate", "other change rate"),
                                     ("other_std", "std"), ("other_digit_rate", "other digits' rate"),
                                     ("n_classes", "classes")],
                            f"Chosen latent set to {fmt(result.get('scale'))} x max in every patch, pooled over "
                            "classes"))
    parts.append(rows_table(result["classes"], [
        ("class", "class"), ("digit", "digit"), ("latent", "latent"), ("f1", "F1"), ("threshold", "t"),
        ("auto.target_rate", "target rate"), ("auto.other_rate", "other rate"),
        ("random_latent.target_rate", "random latent: target"), ("random_vector.target_rate", "random vector: target"),
        ("n_test_images", "test images")], "Per class: the best-F1 latent and its change rates"))
    parts.append(_verdict("pooled target rate above both baselines'", result["auto_beats_baselines"]))
    return "".join(parts)


# experiment name -> its headline tables (HTML)
SUMMARIES: dict[str, Callable[[dict], str]] = {
    "classification": classification,
    "segmentation": segmentation,
    "model-comparison": model_comparison,
}


def summary_html(name: str, result: dict) -> str:
    """The headline tables of experiment ``name``, or "" when it has none or they do not fit."""
    make = SUMMARIES.get(name)
    if make is None:
        return ""
    try:
        return make(result)
    except (KeyError, TypeError, AttributeError):  # fields renamed: the generic table shows them
        return ""
