"""Non-finite losses stop a run: :class:`NonFiniteWatch` keeps, on the device, the first
step at which each SAE's loss was NaN or inf, and raises NonFiniteError when the host
looks (every step on the CPU; on a GPU only at the points where the trainer reads the
device anyway: log lines, checkpoints, the end), so training never waits for the check.
Before anything is saved the parameters and buffers are checked too, by the rule that
saving applies (saeengine.checkpoint_checks.nonfinite_counts: NaN only in the buffers
where it means "not set yet", as BatchTopK's threshold before its first positive
activation), so no NaN reaches a file and no savable state is called diverged."""

from __future__ import annotations

import numpy as np
import torch

from ..checkpoint_checks import listed_nonfinite, nan_markers, nonfinite_counts
from ..errors import NonFiniteError
from .data import nonfinite_rows

LOSS_TERMS = ("fvu", "auxk", "sparsity")  # the terms of the training loss, as TrainStep returns them
NO_BAD_STEP = 2 ** 62  # first_bad of an SAE whose losses were all finite (exact in float64, as read)


class NonFiniteWatch:
    """The first step with a non-finite loss of each SAE of a run.

    Args:
        names: the SAEs' names, in the order of the metrics given to :meth:`update`.
        device: where the losses live.

    Attributes:
        first_bad: [len(names)] int64 on ``device``; NO_BAD_STEP where no loss was bad yet.
        every_step: look on the host after every step (on the CPU, where it costs nothing).
    """

    def __init__(self, names: list[str], device: torch.device, start: int = 0):
        self.names = list(names)
        self.first_bad = torch.full((len(self.names),), NO_BAD_STEP, dtype=torch.int64, device=device)
        self.every_step = torch.device(device).type != "cuda"
        self.finite_at = start  # the parameters were last seen finite after this many steps

    def update(self, step: int, metrics: list[dict]) -> None:
        """Note ``step``'s losses (one metrics dict per SAE, 0-d tensors); no host sync, and
        six small kernels whatever the number of SAEs."""
        terms = torch.stack([m[t] for m in metrics for t in LOSS_TERMS]).view(len(metrics), len(LOSS_TERMS))
        # NaN and inf survive the sum (fp32, so that finite fp16 terms cannot overflow it) and
        # the product with 0, which is 0 for any finite value: isfinite in two kernels where
        # torch.isfinite takes four.
        finite = terms.sum(1, dtype=torch.float32).mul(0) == 0
        # clamp keeps an earlier bad step (smaller than ``step``) and turns NO_BAD_STEP into ``step``.
        self.first_bad = torch.where(finite, self.first_bad, self.first_bad.clamp(max=step))

    def raise_if_bad(self, bad: list[int], source, cfg) -> None:
        """``bad``: first_bad read on the host. Raise the NonFiniteError of the earliest."""
        hit = [(step, name) for step, name in zip(bad, self.names) if step != NO_BAD_STEP]
        if hit:
            step = min(step for step, _ in hit)
            raise nonfinite_loss_error(step, [name for s, name in hit if s == step], source, cfg)

    def check(self, source, cfg) -> None:
        """Read first_bad (one host sync) and raise if any loss went non-finite."""
        self.raise_if_bad(self.first_bad.tolist(), source, cfg)

    def check_before_save(self, runs, step: int, source, cfg) -> None:
        """Before a checkpoint or the final save after ``step`` steps: no non-finite loss,
        and every SAE's parameters and buffers as saving requires (finite; NaN allowed only
        in the "not set yet" buffers). One host sync for all of it."""
        states = [run.sae.state_dict() for run in runs]
        counts = [nonfinite_counts(state, nan_markers(run.sae)) for run, state in zip(runs, states)]
        read = torch.cat([self.first_bad, torch.stack([n for c in counts for n in c.values()])]).tolist()
        self.raise_if_bad(read[:len(runs)], source, cfg)
        read, found = read[len(runs):], {}
        for name, state, c in zip(self.names, states, counts):
            listed = listed_nonfinite(state, dict(zip(c, read[:len(c)])))
            read = read[len(c):]
            if listed:
                found[name] = listed
        if found:
            broken, rows = list(found), source.rows_of_step(step - 1)
            which = "; ".join(f"{name!r}: {', '.join(listed)}" for name, listed in found.items())
            err = NonFiniteError(
                f"training stopped before saving after step {step - 1}: the parameters of SAE(s) {broken} hold NaN "
                f"or inf ({which}; they were finite after step {self.finite_at - 1}) although every loss was "
                f"finite: an update diverged (a gradient overflowed). Nothing was saved. Lower the learning rate "
                f"(TrainConfig.lr, now {cfg.learning_rate:.3g}), keep gradient clipping on (clip_grad_norm), and "
                f"start over with resume=False. The last batch held {source.describe_rows(rows)}")
            err.step, err.rows, err.saes = step - 1, rows, broken
            raise err
        self.finite_at = step


def nonfinite_loss_error(step: int, names: list[str], source, cfg) -> NonFiniteError:
    """The error for SAEs ``names`` whose loss was first non-finite at ``step``: it names
    the step, the batch's rows (and for a store their images and positions), and whether
    the data or the training is to blame. The exception carries ``step``, ``rows`` (the
    batch's data rows, ascending) and ``saes``."""
    rows = source.rows_of_step(step)
    batch = source.rows(rows)
    bad = nonfinite_rows(batch)
    where = (f"training stopped: the loss of SAE(s) {names} became NaN or inf at step {step} (tokens "
             f"{step * cfg.batch_size}..{(step + 1) * cfg.batch_size - 1}); nothing from that step on was saved "
             f"(a checkpoint written before it is intact). The batch held {source.describe_rows(rows)}.")
    if bad.size:
        why = (f" Of those, {source.describe_rows(rows[bad])} hold NaN or inf activations: repair or re-record that "
               "data, then start over with resume=False")
    elif bool((batch == batch[:1]).all()):
        why = (" Those activations are finite but all equal: FVU divides by the batch's variance, which is 0; "
               "train on data that varies")
    else:
        why = (f" Those activations are finite, so the training diverged: lower the learning rate (TrainConfig.lr, "
               f"{cfg.learning_rate:.3g} at factor {cfg.lr_factor(step):.3g} at this step), keep gradient clipping on "
               "(clip_grad_norm), and start over with resume=False")
    err = NonFiniteError(where + why)
    err.step, err.rows, err.saes = step, np.asarray(rows), list(names)
    return err
