"""The pictures of the evaluation report, each returned as a PNG data URI: the latents'
log10 frequency vs log10 mean value scatter, the log10 frequency histogram, one latent's
activation histogram, and an exemplar thumbnail with the latent's heatmap in red.

Plots use matplotlib's object API (``matplotlib.figure.Figure``, rendered by Agg): no
pyplot, so no global backend is switched and no figure stays registered after use. Axes
sit at fixed places in their figures (no tight-bbox pass: one draw per plot).
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np

# saev's browsing band (saev@v1 visuals.py): latents shown by default
BAND_LOG10_FREQUENCY = (-6.0, -2.0)
BAND_LOG10_MEAN = (-1.0, 1.0)


def figure_uri(fig) -> str:
    """A matplotlib Figure -> "data:image/png;base64,..." (the figure is not kept anywhere:
    made with the object API, it is freed with its last reference)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # imported on use: matplotlib is the optional saeengine[eval]

    return Figure(figsize=(width, height), dpi=100)


def frequency_scatter(frequency: np.ndarray, mean_nonzero: np.ndarray, shown: np.ndarray | None = None) -> str:
    """Scatter of log10 frequency vs log10 mean non-zero value over the alive latents.

    frequency, mean_nonzero: [F] float; latents with frequency 0 (dead) are left out (the
    report counts them in a note). shown: [S] int latent ids drawn in red. The dashed box
    is saev's browsing band.
    """
    alive = frequency > 0
    fig = _figure(6.0, 4.0)
    ax = fig.add_axes((0.14, 0.12, 0.83, 0.85))
    ax.scatter(np.log10(frequency[alive]), np.log10(np.maximum(mean_nonzero[alive], 1e-12)), s=4, alpha=0.5,
               color="#2a6fdb", linewidths=0, label="alive latents")
    if shown is not None and len(shown):
        ax.scatter(np.log10(frequency[shown]), np.log10(np.maximum(mean_nonzero[shown], 1e-12)), s=14,
                   color="#d62728", linewidths=0, label="shown below")
    (f0, f1), (m0, m1) = BAND_LOG10_FREQUENCY, BAND_LOG10_MEAN
    ax.plot([f0, f1, f1, f0, f0], [m0, m0, m1, m1, m0], ls="--", lw=0.8, color="#555", label="saev band")
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("log10 mean non-zero value")
    ax.legend(loc="upper left", fontsize=8)
    return figure_uri(fig)


def frequency_histogram(frequency: np.ndarray, bins: int = 40) -> str:
    """Histogram of log10 firing frequency over the alive latents (frequency [F] float)."""
    logs = np.log10(frequency[frequency > 0])
    fig = _figure(6.0, 3.0)
    ax = fig.add_axes((0.12, 0.17, 0.85, 0.79))
    if logs.size:
        ax.hist(logs, bins=bins, color="#2a6fdb")
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    return figure_uri(fig)


def activation_histogram(counts: np.ndarray, edges: np.ndarray) -> str:
    """A small step plot of one latent's histogram of non-zero values: counts [B] int over
    edges [B+1] float > 0, drawn against log10 of the edges, cut to the bins in use."""
    from matplotlib.ticker import MaxNLocator

    counts = np.asarray(counts)
    used = np.flatnonzero(counts)
    lo, hi = (int(used[0]), int(used[-1]) + 1) if used.size else (0, counts.size)
    fig = _figure(2.6, 1.5)
    ax = fig.add_axes((0.22, 0.3, 0.74, 0.64))
    ax.stairs(counts[lo:hi], np.log10(np.asarray(edges, dtype=np.float64)[lo:hi + 1]), fill=True, color="#2a6fdb")
    ax.xaxis.set_major_locator(MaxNLocator(4))
    ax.yaxis.set_major_locator(MaxNLocator(3, integer=True))
    ax.tick_params(labelsize=6)
    ax.set_xlabel("log10 activation", fontsize=7)
    ax.set_ylabel("tokens", fontsize=7)
    return figure_uri(fig)


def heat_grid(heat: np.ndarray) -> np.ndarray:
    """[n] per-position values -> [side, side] (side = ceil(sqrt(n)), zero padded), row-major."""
    side = max(math.isqrt(max(heat.size - 1, 0)) + 1, 1)
    grid = np.zeros(side * side, dtype=np.float32)
    grid[:heat.size] = heat
    return grid.reshape(side, side)


def exemplar_uri(image: np.ndarray | None, heat: np.ndarray | None, size: int = 96) -> str:
    """A thumbnail: image uint8 [H, W] or [H, W, 3] (None: a white square) under the heat
    grid [side, side] in red (None or all zero: no overlay)."""
    from ..report import _png_data_uri

    if image is None:
        image = np.full((size, size), 255, dtype=np.uint8)
    return _png_data_uri(np.ascontiguousarray(image), heat, size)
