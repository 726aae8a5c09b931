"""Row-sparse ("lazy") Adam for SAEs: only the latent rows that received gradient this
step are updated, with the decoder's parallel-gradient removal and unit-norm projection
fused into the same pass over those rows.

Two backends: the torch reference (here; on CPU with fp32 moments the Adam math over the
gathered rows is torch's fused Adam kernel), and the CUDA op
``torch.ops.saeengine.row_sparse_adam_`` (csrc/row_sparse_adam.cu): one launch per latent
parameter, a warp per listed row, touching nothing else. It reads each row's gradient
from the dense gradient autograd produced, or from a compact [R, d] block of rows.

W_enc's and W_dec's gradients may be sparse COO tensors (``SAE.forward(sparse_grad=True)``
on the GPU and cpu paths): then no [F, d] gradient exists anywhere, and the listed rows are
gathered from the sparse gradient's entries without coalescing it. With
``max_grad_norm`` > 0 the clipping is fused too, so a step never waits on the host.

How it differs from dense Adam: a row that did not fire keeps its moments as they were.
Dense Adam would decay them, and would still move the row by m / sqrt(v) even at zero
gradient. The bias correction uses the global step, as TensorFlow's LazyAdam does.
"""

from __future__ import annotations

import torch

from saeengine.backends import resolve_backend

from .base import ROW_ROLES, SAEOptimizer, host_copy, project_unit_rows_, remove_parallel_component_


def latent_grad_rows(grad: torch.Tensor, rows: torch.Tensor,
                     rows_sorted: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The rows ``rows`` [R] (distinct, in any order) of a latent-row gradient, dense [F, ...]
    or sparse COO, coalesced or not: [R, ...]. Sparse entries of one latent are added up,
    entries of latents not in ``rows`` are dropped, and a row with no entry gets zeros. No
    host sync: the sparse gradient is not coalesced first.

    Repeatable: the sparse backward gives each latent at most two nonzero entries (one per
    code; its padding entries are zero rows), and a + b, with zeros added anywhere, is one
    value whatever order the adds run in. ``rows_sorted``: ``torch.sort(rows)``, when the
    caller gathers several gradients over the same rows.
    """
    if not grad.is_sparse:
        return grad.index_select(0, rows)
    latents, values = grad._indices()[0], grad._values()
    out = values.new_zeros((rows.numel(), *values.shape[1:]))
    if latents.numel() == 0 or rows.numel() == 0:
        return out
    ascending, position = rows_sorted if rows_sorted is not None else torch.sort(rows)
    at = torch.searchsorted(ascending, latents).clamp_max(rows.numel() - 1)
    present = (ascending[at] == latents).reshape(-1, *([1] * (values.dim() - 1)))
    return out.index_add_(0, position[at], torch.where(present, values, 0))


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """Scale the gradients so their joint L2 norm is at most ``max_norm``, like
    ``torch.nn.utils.clip_grad_norm_``, also for sparse COO gradients (coalesced in place
    first, so duplicate rows are summed before the norm: a host sync on CUDA, which
    ``RowSparseAdam(..., max_grad_norm=...)`` avoids). Returns the norm before clipping
    (0-d fp32)."""
    grads = []
    for p in parameters:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            grads.append(p.grad._values())  # an alias: scaling it scales the gradient
        else:
            grads.append(p.grad)
    if not grads:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype))
    return total


class RowSparseAdam(SAEOptimizer):
    """Adam over an SAE's parameters, row-sparse on its latent-row parameters.

    ``step(rows)`` updates the rows ``rows`` (int64, distinct) of every latent-row
    parameter (roles ``"encoder_rows"`` and ``"decoder_rows"`` of ``sae.parameter_roles()``),
    and every ``"dense"`` parameter (b_dec) densely. Moments are fp32 or bf16
    (``moment_dtype``). ``state_dict`` / ``load_state_dict`` make it checkpointable.
    ``backend``: "auto", "torch" or "cuda" for the latent rows (the dense parameters are
    torch math). ``max_grad_norm`` > 0 clips inside the step (see :meth:`step`).
    ``sparse_grad``: ask the forward for sparse COO weight gradients (the default; False
    reads dense ones, e.g. to measure the difference).
    """

    needs_rows = True

    def __init__(self, sae, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 moment_dtype: torch.dtype = torch.float32, backend: str = "auto", max_grad_norm: float = 0.0,
                 sparse_grad: bool = True):
        if moment_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"moment_dtype={moment_dtype}; use torch.float32 or torch.bfloat16")
        super().__init__(sae, max_grad_norm)
        self.sparse_grad = bool(sparse_grad)
        self.backend = resolve_backend(backend, "row_sparse_adam", next(sae.parameters()).device)
        self.param_groups = [{"lr": lr}]
        self.betas, self.eps, self.moment_dtype = betas, eps, moment_dtype
        self.step_count = 0
        self.state = {name: {"m": torch.zeros_like(p, dtype=moment_dtype), "v": torch.zeros_like(p, dtype=moment_dtype)}
                      for name, p in sae.named_parameters()}

    def _is_rows(self, name: str) -> bool:
        return self.roles[name] in ROW_ROLES

    @torch.no_grad()
    def _adam(self, p: torch.Tensor, grad: torch.Tensor, state: dict, rows: torch.Tensor | None) -> None:
        beta1, beta2 = self.betas
        lr = self.param_groups[0]["lr"]
        t = self.step_count
        m_all, v_all = state["m"], state["v"]
        if p.device.type == "cpu" and p.dtype == m_all.dtype == torch.float32:
            self._adam_fused_cpu(p, grad, m_all, v_all, rows)
            return
        # index_select / index_copy_: rows are distinct, and on CPU these are several
        # times faster than advanced indexing.
        m = (m_all if rows is None else m_all.index_select(0, rows)).float()
        v = (v_all if rows is None else v_all.index_select(0, rows)).float()
        g = grad.float()
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        update = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + self.eps)
        if rows is None:
            m_all.copy_(m)
            v_all.copy_(v)
            p.sub_(lr * update.to(p.dtype))
        else:
            m_all.index_copy_(0, rows, m.to(m_all.dtype))
            v_all.index_copy_(0, rows, v.to(v_all.dtype))
            p.index_copy_(0, rows, p.index_select(0, rows) - (lr * update).to(p.dtype))

    def _adam_fused_cpu(self, p, grad, m_all, v_all, rows) -> None:
        """:meth:`_adam` on CPU with fp32 moments: torch's fused Adam kernel over the
        gathered rows (one pass instead of the per-op loop's several), written back."""
        beta1, beta2 = self.betas
        if rows is None:
            p_rows, m, v = p, m_all, v_all
        else:
            p_rows, m, v = p.index_select(0, rows), m_all.index_select(0, rows), v_all.index_select(0, rows)
        torch._fused_adam_([p_rows], [grad.to(p.dtype).contiguous()], [m], [v], [],
                           [torch.tensor(float(self.step_count))], lr=self.param_groups[0]["lr"], beta1=beta1,
                           beta2=beta2, weight_decay=0.0, eps=self.eps, amsgrad=False, maximize=False)
        if rows is not None:
            m_all.index_copy_(0, rows, m)
            v_all.index_copy_(0, rows, v)
            p.index_copy_(0, rows, p_rows)

    @torch.no_grad()
    def step(self, rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """Update the latent rows ``rows`` [R] int64 (distinct) and the dense parameters.

        With ``max_grad_norm`` > 0 the gradient is first scaled so that its L2 norm is at
        most that: the norm of what the step applies (the listed rows of the latent-row
        parameters, the whole of the others), taken over the gathered rows. It equals
        ``clip_grad_norm_``'s whenever the unlisted rows have no gradient (the trainer
        lists every latent that fired), and a sparse gradient is never coalesced for it:
        no host sync. Returns that norm before clipping (0-d fp32), or None.
        """
        if rows is None:
            raise ValueError("RowSparseAdam.step needs rows: the [R] int64 latents that fired this step "
                             "(saeengine.optim.fired_rows lists them without a host sync)")
        self.step_count += 1
        max_grad_norm = self.max_grad_norm
        named = {name: p for name, p in self.sae.named_parameters() if p.grad is not None}
        # The rows each latent-row parameter's update reads; the CUDA op reads a dense
        # gradient in place unless it must be scaled first.
        rows_sorted = torch.sort(rows) if any(p.grad.is_sparse for p in named.values()) else None
        grads = {name: latent_grad_rows(p.grad, rows, rows_sorted)
                 if self._is_rows(name) and (p.grad.is_sparse or max_grad_norm or self.backend != "cuda")
                 else p.grad for name, p in named.items()}
        norm = None
        if max_grad_norm:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads.values()]))
            scale = (max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            for g in grads.values():
                g.mul_(scale.to(g.dtype))
        if self.backend == "cuda":
            self._step_cuda(named, grads, rows)
            return norm
        for name, p in named.items():
            g = grads[name]
            if self._is_rows(name):
                if self.roles[name] == "decoder_rows":  # fused: drop the gradient parallel to each row
                    g = remove_parallel_component_(g, p.index_select(0, rows))
                self._adam(p, g, self.state[name], rows)
            else:
                self._adam(p, g, self.state[name], None)
        for name, p in self.named_with_role("decoder_rows"):  # back to unit norm
            p.index_copy_(0, rows, project_unit_rows_(p.index_select(0, rows)))
        return norm

    def _step_cuda(self, named: dict, grads: dict, rows: torch.Tensor) -> None:
        beta1, beta2 = self.betas
        lr = self.param_groups[0]["lr"]
        for name, p in named.items():
            state = self.state[name]
            if self._is_rows(name):  # [F, ...] read in place, or the [R, ...] gathered rows
                grad = grads[name]
                dense = grad is p.grad
                torch.ops.saeengine.row_sparse_adam_(p, grad if dense else grad.contiguous(), state["m"], state["v"],
                                                     rows, lr, beta1, beta2, self.eps, self.step_count, dense,
                                                     self.roles[name] == "decoder_rows")
            else:
                self._adam(p, grads[name], state, None)

    def row_moments(self, name: str) -> tuple[torch.Tensor, ...]:
        return (self.state[name]["m"], self.state[name]["v"])

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "lr": self.param_groups[0]["lr"], "state": host_copy(self.state)}

    def load_state_dict(self, state: dict) -> None:
        self.step_count, self.param_groups[0]["lr"] = state["step_count"], state["lr"]
        for name, s in state["state"].items():
            for key, value in s.items():
                self.state[name][key].copy_(value)
