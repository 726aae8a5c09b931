"""Evaluation: encode whole stores, per-latent statistics and exemplars, reconstruction and
downstream metrics, probes, feature discovery, interventions and model comparison."""
