"""Evaluation: encode whole stores, per-latent statistics and exemplars, reconstruction and
downstream metrics, probes, feature discovery, interventions and model comparison.

The entry points (each module documents its own; docs/eval-*.md give the formulas):
``encode_store`` / ``EncodedDataset`` (encode.py, encoded.py), ``evaluate`` (run_eval.py),
``ReconstructionMetrics`` (metrics.py), ``LatentStats`` (latent_stats.py), ``Exemplars``
(exemplars.py), ``discover`` (discovery.py), ``intervene`` (interventions.py),
``downstream_metrics`` (downstream.py), ``LinearProbe`` / ``fit_probe`` (probes.py),
``sparse_probing.sparse_probing``, ``mean_iou`` (segmentation_metrics.py),
``nearest_latent`` / ``concept_f1`` (comparison.py); the first paper's tasks: ``auroc`` /
``ood_metrics`` (ood.py), ``SAEScorer`` / ``DenseScorer`` (ood_scores.py), ``run_ood``
(ood_run.py), ``Hierarchy`` (hierarchy.py), ``imagenet_hierarchy`` (wordnet.py),
``discover_attributes`` (attributes.py); modality.py, modality_layers.py, ontology.py. They
load on first use.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "encode_store": "encode", "EncodedDataset": "encoded", "evaluate": "run_eval",
    "ReconstructionMetrics": "metrics", "reconstruction_metrics": "metrics", "LatentStats": "latent_stats",
    "Exemplars": "exemplars", "discover": "discovery", "top_latents_for_patches": "discovery",
    "intervene": "interventions", "downstream_metrics": "downstream", "LinearProbe": "probes",
    "fit_probe": "probes", "fit_patch_probe": "probes",
    "mean_iou": "segmentation_metrics", "nearest_latent": "comparison", "concept_f1": "comparison",
    "TokenBatch": "batch", "code_pairs": "batch",
    "auroc": "ood", "fpr_at_tpr": "ood", "ood_metrics": "ood", "roc_points": "ood",
    "SAEScorer": "ood_scores", "DenseScorer": "ood_scores", "run_ood": "ood_run",
    "Hierarchy": "hierarchy", "imagenet_hierarchy": "wordnet", "discover_attributes": "attributes",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
