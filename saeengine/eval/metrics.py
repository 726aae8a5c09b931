"""Reconstruction metrics of one ordered pass, accumulated in float64 sums (one pass suffices).

Every field of :meth:`ReconstructionMetrics.result` and its formula is in docs/eval-metrics.md.
In short, over the pass's N tokens x_n [d] with reconstructions x^_n and code values f_n:

- mse   = (1/N) sum_n ||x_n - x^_n||^2                       (per token, summed over dims)
- nmse  = sum_n ||x_n - x^_n||^2 / sum_n ||x_n - mu||^2        (mu = the pass mean; = fvu)
- explained_variance = 1 - sum_j Var_j(x - x^) / sum_j Var_j(x) (SAEBench core)
- l0, l1 = mean over tokens of #{f > 0} and of sum |f|
- cosine = mean cos(x_n, x^_n) (0 when either vector is zero)
- l2_ratio = mean ||x^_n|| / ||x_n|| over tokens with ||x_n|| > 0
- relative_reconstruction_bias = sum ||x^_n||^2 / sum <x_n, x^_n>

The sums of x are taken around a fixed shift s (the first non-empty batch's mean, kept in the
state), so sum ||x - mu||^2 = sum ||x - s||^2 - ||sum (x - s)||^2 / N loses no digits to a
large mean.
"""

from __future__ import annotations

import math

import torch

from ..errors import CheckpointError, InputError
from ..ops._checks import check_finite
from .batch import TokenBatch

_F64_SCALARS = ("sum_sq_dx", "sum_sq_err", "sum_sq_x_hat", "sum_dot", "sum_cos", "sum_l2_ratio", "sum_l1")
_I64_SCALARS = ("n_tokens", "n_nonzero_x", "sum_l0")
_VECTORS = ("shift", "sum_dx", "sum_err")  # [d] float64, shape [0] until the first non-empty batch


def _fresh_state() -> dict[str, torch.Tensor]:
    state = {name: torch.zeros((), dtype=torch.float64) for name in _F64_SCALARS}
    state.update({name: torch.zeros((), dtype=torch.int64) for name in _I64_SCALARS})
    state.update({name: torch.zeros(0, dtype=torch.float64) for name in _VECTORS})
    return state


def _check_pair(x: torch.Tensor, x_hat: torch.Tensor, values: torch.Tensor) -> None:
    for name, t in (("x", x), ("x_hat", x_hat), ("values", values)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.dtype.is_floating_point:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InputError(f"{name} must be a 2-D float tensor, got {shape}"
                             f"{' ' + str(t.dtype) if isinstance(t, torch.Tensor) else ''}")
    if x_hat.shape != x.shape:
        raise InputError(f"x_hat has shape {tuple(x_hat.shape)} but x has {tuple(x.shape)}; pass the SAE's "
                         "reconstruction of exactly these tokens")
    if values.shape[0] != x.shape[0]:
        raise InputError(f"values has {values.shape[0]} rows but x has {x.shape[0]}; pass the codes of the "
                         "same tokens")
    fix = "clean the activations (or the SAE) before evaluating"
    check_finite("x", x, fix)
    check_finite("x_hat", x_hat, fix)
    check_finite("values", values, fix)


class ReconstructionMetrics:
    """Streaming reconstruction metrics (the accumulator protocol of saeengine.eval).

    update(batch) reads batch.x, batch.x_hat [N, d] and batch.values [N, w]; the state lives
    on the last batch's device; state_dict() returns the exact state as CPU tensors, so
    saving it between any two batches and loading it gives bit-identical results.
    """

    def __init__(self) -> None:
        self._state = _fresh_state()

    def update(self, batch: TokenBatch) -> None:
        """Add one batch of tokens (batch.x, batch.x_hat [N, d], batch.values [N, w])."""
        self.add(batch.x, batch.x_hat, batch.values)

    @torch.no_grad()
    def add(self, x: torch.Tensor, x_hat: torch.Tensor, values: torch.Tensor) -> None:
        """Add N tokens: x, x_hat [N, d] float, values [N, w] code values (> 0 = firing)."""
        _check_pair(x, x_hat, values)
        s = self._state
        d = s["shift"].shape[0]
        if d and x.shape[1] != d:
            raise InputError(f"this batch has d_in={x.shape[1]} but earlier batches had d_in={d}; one pass "
                             "must read one store with one SAE")
        if x.shape[0] == 0:
            return
        if s["n_tokens"].device != x.device:
            self._state = s = {k: v.to(x.device) for k, v in s.items()}
        x64, x_hat64 = x.double(), x_hat.double()
        if not d:  # the first tokens fix the shift that keeps the variance free of cancellation
            s["shift"] = x64.mean(0)
            s["sum_dx"] = torch.zeros_like(s["shift"])
            s["sum_err"] = torch.zeros_like(s["shift"])
        dx = x64 - s["shift"]
        err = x64 - x_hat64
        sq_x = x64.pow(2).sum(1)
        sq_x_hat = x_hat64.pow(2).sum(1)
        dot = (x64 * x_hat64).sum(1)
        norm_x, norm_x_hat = sq_x.sqrt(), sq_x_hat.sqrt()
        both = norm_x * norm_x_hat
        cos = torch.where(both > 0, dot / torch.where(both > 0, both, 1.0), 0.0).clamp(-1.0, 1.0)
        nonzero = norm_x > 0
        ratio = torch.where(nonzero, norm_x_hat / torch.where(nonzero, norm_x, 1.0), 0.0)
        s["n_tokens"] += x.shape[0]
        s["sum_dx"] += dx.sum(0)
        s["sum_sq_dx"] += dx.pow(2).sum()
        s["sum_err"] += err.sum(0)
        s["sum_sq_err"] += err.pow(2).sum()
        s["sum_sq_x_hat"] += sq_x_hat.sum()
        s["sum_dot"] += dot.sum()
        s["sum_cos"] += cos.sum()
        s["sum_l2_ratio"] += ratio.sum()
        s["n_nonzero_x"] += nonzero.sum()
        s["sum_l0"] += (values > 0).sum()
        s["sum_l1"] += values.double().abs().sum()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The exact state: CPU tensors (float64 sums, int64 counts, [d] vectors or [0] before data)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self._state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a state_dict() (CheckpointError if keys, dtypes or shapes do not fit)."""
        fresh = _fresh_state()
        if set(state) != set(fresh):
            raise CheckpointError(f"reconstruction-metrics state has keys {sorted(state)} but {sorted(fresh)} "
                                  "are expected; it was saved by another version or another accumulator")
        shift = state["shift"]
        d = shift.shape[0] if isinstance(shift, torch.Tensor) and shift.dim() == 1 else -1
        for key, ref in fresh.items():
            t = state[key]
            shape = (d,) if key in _VECTORS else ()
            if not isinstance(t, torch.Tensor) or t.dtype != ref.dtype or tuple(t.shape) != shape:
                raise CheckpointError(f"reconstruction-metrics state '{key}' should be {ref.dtype} of shape "
                                      f"{list(shape)}; the saved state is damaged, restart the pass")
        self._state = {k: v.detach().clone() for k, v in state.items()}

    def result(self) -> dict:
        """Python floats (ints for counts); NaN where a metric is undefined (no tokens, zero
        variance, zero sum <x, x^>). Fields and formulas: docs/eval-metrics.md."""
        s = {k: v.double().cpu() for k, v in self._state.items()}
        n = int(self._state["n_tokens"])
        nan = math.nan

        def ratio(num: torch.Tensor, den: torch.Tensor | float) -> float:
            den = float(den)
            return float(num) / den if den > 0 else nan

        total_var = s["sum_sq_dx"] - s["sum_dx"].pow(2).sum() / n if n else torch.zeros(())
        err_var = s["sum_sq_err"] - s["sum_err"].pow(2).sum() / n if n else torch.zeros(())
        nmse = ratio(s["sum_sq_err"], total_var)
        dot = float(s["sum_dot"])
        return {
            "n_tokens": n,
            "mse": ratio(s["sum_sq_err"], n),
            "nmse": nmse,
            "fvu": nmse,
            "explained_variance": 1.0 - ratio(err_var, total_var),
            "l0": ratio(s["sum_l0"], n),
            "l1": ratio(s["sum_l1"], n),
            "cosine": ratio(s["sum_cos"], n),
            "l2_ratio": ratio(s["sum_l2_ratio"], s["n_nonzero_x"]),
            "relative_reconstruction_bias": float(s["sum_sq_x_hat"]) / dot if dot != 0 else nan,
        }


def reconstruction_metrics(x: torch.Tensor, x_hat: torch.Tensor, values: torch.Tensor) -> dict:
    """The result() of ReconstructionMetrics over in-memory tensors: x, x_hat [N, d] float,
    values [N, w] code values (a dense [N, F] code works too)."""
    metrics = ReconstructionMetrics()
    metrics.add(x, x_hat, values)
    return metrics.result()
