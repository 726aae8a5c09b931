"""Per-latent statistics of one ordered pass: firing count and frequency, mean / min / max of
the non-zero values, a log-spaced histogram of them, and a streaming percentile (p99) read
from that histogram, with a per-latent error bound.

Memory is O(F x B) (B histogram bins), independent of the number of tokens; an update is a
few vectorized scatters over the batch's firing (token, latent) pairs. Definitions, the
percentile convention and the error bound: docs/eval-metrics.md.

Histogram: B bins between edges e_0 = low < e_1 < ... < e_B = high, e_i = low (high/low)^(i/B);
bin j holds values in [e_j, e_{j+1}) (the last bin also holds e_B), values below low go to
bin 0 and values above high to bin B - 1.

Percentile: for a latent with c non-zero values sorted v_(1) <= ... <= v_(c), the exact q-th
percentile is v_(k) with k = ceil(q c) (the inverse of the empirical CDF: numpy's
method="inverted_cdf"). The histogram says which bin j holds v_(k); the estimate interpolates
(in log space) inside [lo_j, hi_j] = [max(E_j, min), min(E_{j+1}, max)] with E_0 = 0,
E_B = inf, E_j = e_j otherwise (min, max = the latent's smallest and largest non-zero value).
The exact v_(k) lies in the same interval, so |estimate - exact| / exact <= hi_j / lo_j - 1
(reported per latent as ``p99_error_bound``), which is at most (high/low)^(1/B) - 1 whenever
the latent's values lie in [low, high]. When k = c or k = 1 the estimate is the exact max or
min (bound 0): every latent with fewer than 100 non-zero values gets its exact p99.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from ..errors import CheckpointError, ConfigError, InputError
from ..ops._checks import check_finite
from .batch import TokenBatch

DEFAULT_BINS = 128
DEFAULT_LOW = 1e-3   # SAE codes of mean-norm inputs (norm sqrt(d)) fire roughly in 1e-2 .. 1e2;
DEFAULT_HIGH = 1e3   # a decade of margin each side: 128 bins give a ratio 10^(6/128) = 1.114
DENSE_FREQUENCY = 1e-2  # a latent firing on more than 1% of tokens counts as dense (saev, SAEBench)


def histogram_edges(bins: int, low: float, high: float) -> torch.Tensor:
    """[bins + 1] float64 log-spaced edges from low to high (both included exactly)."""
    edges = torch.logspace(math.log10(low), math.log10(high), bins + 1, dtype=torch.float64)
    edges[0], edges[-1] = low, high
    return edges


def check_code_pairs(values: torch.Tensor, indices: torch.Tensor, d_sae: int) -> None:
    """values [N, w] float and indices [N, w] int64: finite values, and every firing entry
    (value > 0) a latent id in [0, d_sae) that appears once in its token's row."""
    if not isinstance(values, torch.Tensor) or values.dim() != 2 or not values.dtype.is_floating_point:
        raise InputError(f"values must be a 2-D [N, w] float tensor, got "
                         f"{tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__}")
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int64 or indices.shape != values.shape:
        got = f"{tuple(indices.shape)} {indices.dtype}" if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise InputError(f"indices must be an int64 tensor of the values' shape {tuple(values.shape)}, got {got}; "
                         "build both with saeengine.eval.batch.code_pairs")
    check_finite("values", values, "clean the activations (or the SAE) before evaluating")
    fire = values > 0
    ids = indices[fire]
    if ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= d_sae:
        bad = hi if hi >= d_sae else lo
        raise InputError(f"latent id {bad} fires but the statistics hold d_sae={d_sae} latents (ids 0..{d_sae - 1}); "
                         "the codes come from another SAE than the one the statistics were made for")
    # firing ids sorted per row; padding slots get distinct negative keys so they never match
    pad = -1 - torch.arange(values.shape[1], device=values.device)
    keys = torch.where(fire, indices, pad).sort(1).values
    same = (keys[:, 1:] == keys[:, :-1]) & (keys[:, 1:] >= 0)
    if bool(same.any()):
        row, col = (int(v) for v in same.nonzero()[0])
        raise InputError(f"latent {int(keys[row, col])} fires twice in token row {row} of the batch; a code holds "
                         "each latent at most once per token (merge the duplicates)")


class LatentStats:
    """Streaming per-latent statistics over a pass (the accumulator protocol of saeengine.eval).

    d_sae: number of latents F. bins: histogram bins B. low, high: the histogram's range
    (0 < low < high). quantile: the streaming percentile's level q in (0, 1] (0.99 -> p99;
    the result keys keep the name ``p99``). update(batch) reads batch.values and
    batch.indices [N, w]; the state lives on the last batch's device.
    """

    def __init__(self, d_sae: int, *, bins: int = DEFAULT_BINS, low: float = DEFAULT_LOW,
                 high: float = DEFAULT_HIGH, quantile: float = 0.99) -> None:
        if not isinstance(d_sae, int) or isinstance(d_sae, bool) or d_sae < 1:
            raise ConfigError(f"d_sae must be an int >= 1 (the SAE's number of latents), got {d_sae!r}")
        if not isinstance(bins, int) or isinstance(bins, bool) or bins < 1:
            raise ConfigError(f"bins must be an int >= 1, got {bins!r}")
        if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and 0 < low < high < math.inf):
            raise ConfigError(f"the histogram range needs 0 < low < high < inf, got low={low!r}, high={high!r}")
        if not isinstance(quantile, (int, float)) or not 0 < quantile <= 1:
            raise ConfigError(f"quantile must lie in (0, 1] (0.99 for the 99th percentile), got {quantile!r}")
        self.d_sae, self.bins, self.low, self.high = d_sae, bins, float(low), float(high)
        self.quantile = float(quantile)
        # k = ceil(q c) in exact integer arithmetic: q = num / den as written (0.99 -> 99 / 100)
        self._q = Fraction(repr(self.quantile)).limit_denominator(10**6)
        self._state = self._fresh()

    def _fresh(self) -> dict[str, torch.Tensor]:
        f, b = self.d_sae, self.bins
        return {
            "n_tokens": torch.zeros((), dtype=torch.int64),
            "count": torch.zeros(f, dtype=torch.int64),
            "sum": torch.zeros(f, dtype=torch.float64),
            "max": torch.zeros(f, dtype=torch.float32),
            "min": torch.full((f,), math.inf, dtype=torch.float32),
            "histogram": torch.zeros(f, b, dtype=torch.int64),
            "edges": histogram_edges(b, self.low, self.high),
        }

    def update(self, batch: TokenBatch) -> None:
        """Add one batch: batch.values [N, w] float (> 0 = firing), batch.indices [N, w] int64."""
        self.add(batch.values, batch.indices)

    @torch.no_grad()
    def add(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        """Add N tokens' code pairs: values [N, w] float, indices [N, w] int64 latent ids."""
        check_code_pairs(values, indices, self.d_sae)
        s = self._state
        if s["count"].device != values.device:
            self._state = s = {k: v.to(values.device) for k, v in s.items()}
        s["n_tokens"] += values.shape[0]
        fire = values > 0
        lat, val = indices[fire], values[fire].float()
        if lat.numel() == 0:
            return
        s["count"].index_add_(0, lat, torch.ones_like(lat))
        # index_put_ with accumulate sorts on CUDA: a deterministic float sum (index_add_ is not)
        s["sum"].index_put_((lat,), val.double(), accumulate=True)
        s["max"].scatter_reduce_(0, lat, val, reduce="amax")
        s["min"].scatter_reduce_(0, lat, val, reduce="amin")
        inner = s["edges"][1:-1]
        bin_ = torch.bucketize(val.double(), inner, right=True)  # [e_j, e_{j+1}) -> j, clipped to 0..B-1
        s["histogram"].view(-1).index_add_(0, lat * self.bins + bin_, torch.ones_like(lat))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The exact state as CPU tensors (counts, float64 sums, f32 min/max, histogram, edges)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self._state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a state_dict(); CheckpointError if it was made with another d_sae, bins or range."""
        fresh = self._fresh()
        if set(state) != set(fresh):
            raise CheckpointError(f"latent-stats state has keys {sorted(state)} but {sorted(fresh)} are expected; "
                                  "it was saved by another version or another accumulator")
        for key, ref in fresh.items():
            t = state[key]
            if not isinstance(t, torch.Tensor) or t.dtype != ref.dtype or t.shape != ref.shape:
                raise CheckpointError(f"latent-stats state '{key}' should be {ref.dtype} {list(ref.shape)} "
                                      f"(d_sae={self.d_sae}, bins={self.bins}); it was saved with other settings "
                                      "or is damaged: pass the same settings, or restart the pass")
        if not torch.equal(state["edges"].cpu(), fresh["edges"]):
            raise CheckpointError(f"latent-stats state has histogram edges {float(state['edges'][0]):g}.."
                                  f"{float(state['edges'][-1]):g} but this accumulator uses {self.low:g}..{self.high:g}; "
                                  "pass the same low and high as the interrupted pass")
        self._state = {k: v.detach().clone() for k, v in state.items()}

    def result(self) -> dict[str, torch.Tensor]:
        """CPU tensors, F = d_sae, B = bins:

        n_tokens 0-d int64; count [F] int64 (tokens where the latent > 0); frequency [F] f64
        (count / n_tokens); mean_nonzero [F] f64; min_nonzero, max [F] f32; p99 [F] f32 (the
        ``quantile``-th percentile of the non-zero values, streaming); p99_error_bound [F] f64
        (bound on its relative error); histogram [F, B] int64; histogram_edges [B + 1] f64;
        dead_fraction, dense_fraction 0-d f64 (share of latents with count 0, with frequency
        > 1e-2). A latent that never fires has 0 for every value field.
        """
        s = {k: v.cpu() for k, v in self._state.items()}
        count, n = s["count"], int(s["n_tokens"])
        fired = count > 0
        frequency = count.double() / n if n else torch.zeros(self.d_sae, dtype=torch.float64)
        mean = torch.where(fired, s["sum"] / count.clamp_min(1), 0.0)
        p99, bound = self._percentile(s["histogram"], count, s["min"], s["max"])
        return {
            "n_tokens": s["n_tokens"].clone(),
            "count": count.clone(),
            "frequency": frequency,
            "mean_nonzero": mean,
            "min_nonzero": torch.where(fired, s["min"], 0.0),
            "max": s["max"].clone(),
            "p99": p99,
            "p99_error_bound": bound,
            "histogram": s["histogram"].clone(),
            "histogram_edges": s["edges"].clone(),
            "dead_fraction": (~fired).double().mean(),
            "dense_fraction": (frequency > DENSE_FREQUENCY).double().mean(),
        }

    def _percentile(self, hist: torch.Tensor, count: torch.Tensor, vmin: torch.Tensor,
                    vmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hist [F, B], count [F], vmin, vmax [F] -> (estimate [F] f32, relative error bound [F] f64)."""
        fired = count > 0
        k = (count * self._q.numerator + self._q.denominator - 1) // self._q.denominator  # ceil(q c)
        k = k.clamp_min(1)
        cum = hist.cumsum(1)
        j = (cum < k[:, None]).sum(1).clamp_max(self.bins - 1)  # the bin holding v_(k)
        in_bin = hist.gather(1, j[:, None])[:, 0]
        before = cum.gather(1, j[:, None])[:, 0] - in_bin
        edges = self._state["edges"].cpu().clone()
        edges[0], edges[-1] = 0.0, math.inf  # bins 0 and B-1 also hold the values outside [low, high]
        lo = torch.maximum(edges[j], vmin.double())
        hi = torch.minimum(edges[j + 1], vmax.double())
        lo, hi = torch.where(fired, lo, 1.0), torch.where(fired, hi, 1.0)
        t = (k - before - 0.5).double() / in_bin.clamp_min(1)  # v_(k)'s place among the bin's values
        estimate = (lo.log() + t * (hi.log() - lo.log())).exp()
        estimate = torch.minimum(torch.maximum(estimate, lo), hi)
        bound = hi / lo - 1.0
        # the extreme order statistics are known exactly (every latent with c < 100 gives p99 = max)
        for exact, at in ((vmax.double(), k == count), (vmin.double(), k == 1)):
            estimate, bound = torch.where(at, exact, estimate), torch.where(at, 0.0, bound)
        return torch.where(fired, estimate, 0.0).float(), torch.where(fired, bound, 0.0)
