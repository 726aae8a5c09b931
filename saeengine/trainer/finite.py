"""Non-finite losses stop a run: :class:`NonFiniteWatch` keeps, on the device, the first
step at which each SAE's loss was NaN or inf, and raises NonFiniteError when the host
looks (every step on the CPU; on a GPU only at the points where the trainer reads the
device anyway: log lines, checkpoints, the end), so training never waits for the check.
Before anything is saved the parameters are checked too, so no NaN reaches a file."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import NonFiniteError
from .data import nonfinite_rows

LOSS_TERMS = ("fvu", "auxk", "sparsity")  # the terms of the training loss, as TrainStep returns them


class NonFiniteWatch:
    """The first step with a non-finite loss of each SAE of a run (-1: none yet).

    Args:
        names: the SAEs' names, in the order of the metrics given to :meth:`update`.
        device: where the losses live.

    Attributes:
        first_bad: [len(names)] int64 on ``device``.
        every_step: look on the host after every step (on the CPU, where it costs nothing).
    """

    def __init__(self, names: list[str], device: torch.device, start: int = 0):
        self.names = list(names)
        self.first_bad = torch.full((len(self.names),), -1, dtype=torch.int64, device=device)
        self.every_step = torch.device(device).type != "cuda"
        self.finite_at = start  # the parameters were last seen finite after this many steps

    def update(self, step: int, metrics: list[dict]) -> None:
        """Note ``step``'s losses (one metrics dict per SAE, 0-d tensors); no host sync."""
        finite = torch.stack([torch.isfinite(torch.stack([m[t].float() for t in LOSS_TERMS])).all() for m in metrics])
        self.first_bad.masked_fill_((self.first_bad < 0) & ~finite, step)

    def raise_if_bad(self, bad: list[int], source, cfg) -> None:
        """``bad``: first_bad read on the host. Raise the NonFiniteError of the earliest."""
        hit = [(step, name) for step, name in zip(bad, self.names) if step >= 0]
        if hit:
            step = min(step for step, _ in hit)
            raise nonfinite_loss_error(step, [name for s, name in hit if s == step], source, cfg)

    def check(self, source, cfg) -> None:
        """Read first_bad (one host sync) and raise if any loss went non-finite."""
        self.raise_if_bad(self.first_bad.tolist(), source, cfg)

    def check_before_save(self, runs, step: int, source, cfg) -> None:
        """Before a checkpoint or the final save after ``step`` steps: no non-finite loss,
        and every SAE's parameters and buffers finite (one host sync)."""
        finite = [torch.stack([torch.isfinite(t).all() for t in run.sae.state_dict().values()
                               if t.is_floating_point()]).all() for run in runs]
        read = torch.cat([self.first_bad.double(), torch.stack(finite).double()]).tolist()
        self.raise_if_bad([int(s) for s in read[:len(runs)]], source, cfg)
        broken = [name for name, ok in zip(self.names, read[len(runs):]) if not ok]
        if broken:
            rows = source.rows_of_step(step - 1)
            err = NonFiniteError(
                f"training stopped before saving after step {step - 1}: the parameters of SAE(s) {broken} hold NaN or "
                f"inf (they were finite after step {self.finite_at - 1}) although every loss was finite: an update "
                f"diverged (a gradient overflowed). Nothing was saved. Lower the learning rate (TrainConfig.lr, now "
                f"{cfg.learning_rate:.3g}), keep gradient clipping on (clip_grad_norm), and start over with "
                f"resume=False. The last batch held {source.describe_rows(rows)}")
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
