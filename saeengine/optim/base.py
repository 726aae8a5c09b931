"""The optimizer protocol of SAE training: what :class:`saeengine.trainer.TrainStep` and
resampling ask of an optimizer.

An SAE names each parameter's role (``SAE.parameter_roles()``): ``"encoder_rows"`` and
``"decoder_rows"`` are indexed by latent in dim 0, ``"dense"`` is the rest. An optimizer
reads the roles, never parameter names, and owns the constraints of its step:

- the gradient of each ``decoder_rows`` parameter loses its component parallel to each
  (unit) row before the update, and the rows are projected back to unit norm after it;
- the joint gradient norm is clipped to ``max_grad_norm`` (0: no clipping).

It declares what the forward must give it: ``sparse_grad`` (sparse COO weight gradients,
``SAE.forward(sparse_grad=True)``) and ``needs_rows`` (``step`` takes the latents that
fired). Resampling restarts a latent's optimizer state through :meth:`reset_rows_` (and
a fused kernel edits the moments that :meth:`row_moments` returns).
"""

from __future__ import annotations

import abc

import torch

ROW_ROLES = ("encoder_rows", "decoder_rows")
ROLES = ROW_ROLES + ("dense",)


@torch.no_grad()
def remove_parallel_component_(grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """grad, rows [R, d] (rows of unit norm): subtract from each gradient row, in place,
    its component along the weight row. Returns grad."""
    return grad.sub_((grad * rows).sum(1, keepdim=True) * rows)


@torch.no_grad()
def project_unit_rows_(rows: torch.Tensor) -> torch.Tensor:
    """rows [R, d]: divide each row by its norm, in place (a zero row stays zero). Returns rows."""
    return rows.div_(rows.norm(dim=1, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny))


def host_copy(tree):
    """A copy of a state tree (dicts, lists, tuples) with every tensor copied to the CPU:
    what a checkpoint stores, unchanged by later steps, and no second copy on the GPU."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {key: host_copy(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(host_copy(value) for value in tree)
    return tree


class SAEOptimizer(abc.ABC):
    """Base of the SAE optimizers (:class:`DenseAdam`, :class:`RowSparseAdam`).

    Attributes:
        sparse_grad: the forward should give sparse COO weight gradients.
        needs_rows: :meth:`step` needs ``rows``, the latents that fired this step.
        roles: ``sae.parameter_roles()``, {parameter name: role}.
        max_grad_norm: clip the joint gradient norm to this (0: no clipping).
    """

    sparse_grad: bool = False
    needs_rows: bool = False

    def __init__(self, sae, max_grad_norm: float = 0.0):
        roles = sae.parameter_roles()
        unknown = sorted({role for role in roles.values()} - set(ROLES))
        if unknown:
            raise ValueError(f"SAE.parameter_roles() gives roles {unknown}; an optimizer knows {ROLES}")
        if max_grad_norm < 0:
            raise ValueError(f"max_grad_norm={max_grad_norm}; it must be >= 0 (0: no clipping)")
        self.sae, self.roles, self.max_grad_norm = sae, roles, float(max_grad_norm)

    param_groups: list[dict]

    @property
    def lr(self) -> float:
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        for group in self.param_groups:
            group["lr"] = value

    def named_with_role(self, *roles: str) -> list[tuple[str, torch.nn.Parameter]]:
        """(name, parameter) of the SAE's parameters with one of ``roles``, in module order."""
        return [(name, p) for name, p in self.sae.named_parameters() if self.roles[name] in roles]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.sae.zero_grad(set_to_none=set_to_none)

    @abc.abstractmethod
    def step(self, rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """One update with the constraints, from the gradients in ``p.grad``.

        rows: [R] int64 distinct latents that fired (required when ``needs_rows``).
        Returns the gradient norm before clipping (0-d fp32), or None without clipping.
        """

    @abc.abstractmethod
    def row_moments(self, name: str) -> tuple[torch.Tensor, ...]:
        """The state tensors of latent-row parameter ``name`` that are indexed by latent in
        dim 0 (Adam: the first and second moments, the parameter's shape); () when the
        optimizer holds none yet. In place edits of them are the optimizer's state."""

    def reset_rows_(self, dead: torch.Tensor, names: tuple[str, ...] | None = None) -> None:
        """Zero the optimizer state of the latents flagged in ``dead`` [F] bool in every
        latent-row parameter (or in those of ``names``): a resampled latent restarts from
        zero moments. A masked fill: no host sync."""
        for name, p in self.named_with_role(*ROW_ROLES):
            if names is not None and name not in names:
                continue
            if dead.dtype != torch.bool or dead.shape != p.shape[:1]:
                raise ValueError(f"dead must be a [{p.shape[0]}] bool mask, got {dead.dtype} {tuple(dead.shape)}")
            for state in self.row_moments(name):
                state.masked_fill_(dead.reshape(-1, *([1] * (state.dim() - 1))), 0)

    @abc.abstractmethod
    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue bit for bit, as a copy on the CPU
        (:func:`host_copy`)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict) -> None:
        ...
