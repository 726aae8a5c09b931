"""The collectives the distributed SAE issues, counted, and the closed-form arithmetic of
what each layout moves and holds per step.

Counting: every collective of :mod:`saeengine.distributed` goes through :func:`all_gather`,
:func:`all_reduce`, :func:`all_gather_object`, :func:`broadcast` or :func:`broadcast_object`
here. Inside ``with counting() as log`` each call appends a :class:`CollectiveRecord` (op,
axis, payload bytes of this rank's tensor, group size) to ``log``. The payload is what the
rank hands to the collective; :attr:`CollectiveRecord.wire_bytes` adds the ring algorithm's
factor (what each rank sends: all_gather (P-1)/P of the gathered tensor, all_reduce
2(P-1)/P of the tensor; a broadcast counts as the root's P-1 sends).

A group of size 1 (or None: no process group) issues nothing and records nothing.

Closed forms (:func:`latent_axis_bytes`, :func:`ddp_bytes`, :func:`memory_per_rank`,
:func:`widest_fitting`) are docs/distributed.md's; ``benchmarks/distributed_comm.py``
prints them beside the counted numbers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class CollectiveRecord:
    """One collective as issued by this rank.

    op: "all_gather", "all_reduce", "all_gather_object", "broadcast" or "broadcast_object".
    axis: "latent", "data" or "world".
    bytes: this rank's payload (the input tensor's bytes).
    group_size: ranks in the group.
    what: a label ("topk_candidates", "partial_recon", "b_dec_grad", ...).
    """

    op: str
    axis: str
    bytes: int
    group_size: int
    what: str

    @property
    def wire_bytes(self) -> int:
        """What this rank sends over the wire with ring algorithms."""
        p = self.group_size
        if self.op == "all_reduce":
            return int(2 * (p - 1) * self.bytes / p)
        return (p - 1) * self.bytes  # all_gather: each rank sends its part to P-1 others (ring: P-1 hops)


class CommLog(list):
    """The records of one ``counting()`` block, with totals."""

    def total(self, *, axis: str | None = None, op: str | None = None, wire: bool = False) -> int:
        return sum(r.wire_bytes if wire else r.bytes for r in self
                   if (axis is None or r.axis == axis) and (op is None or r.op == op))

    def by_label(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self:
            key = f"{r.axis}:{r.op}:{r.what}"
            out[key] = out.get(key, 0) + r.bytes
        return out


_LOGS: list[CommLog] = []


@contextlib.contextmanager
def counting() -> Iterator[CommLog]:
    """Record the collectives issued inside the block (nested blocks all record)."""
    log = CommLog()
    _LOGS.append(log)
    try:
        yield log
    finally:
        _LOGS.remove(log)


def _record(op: str, axis: str, nbytes: int, group_size: int, what: str) -> None:
    for log in _LOGS:
        log.append(CollectiveRecord(op, axis, int(nbytes), group_size, what))


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_gather(tensor: torch.Tensor, group, *, axis: str, what: str) -> torch.Tensor:
    """[*S] on each of the P ranks of ``group`` -> [P, *S] (rank order of the group)."""
    p = group_size(group)
    if p == 1:
        return tensor.unsqueeze(0)
    tensor = tensor.contiguous()
    out = torch.empty((p, *tensor.shape), dtype=tensor.dtype, device=tensor.device)
    _record("all_gather", axis, tensor.numel() * tensor.element_size(), p, what)
    if tensor.is_cuda:
        dist.all_gather_into_tensor(out, tensor, group=group)
    else:  # gloo: the list form (into_tensor is NCCL's fast path)
        dist.all_gather(list(out.unbind(0)), tensor, group=group)
    return out


def all_reduce(tensor: torch.Tensor, group, *, axis: str, what: str, op: str = "sum") -> torch.Tensor:
    """Sum (``op="max"``: the maximum of) ``tensor`` over ``group`` in place (and return it)."""
    p = group_size(group)
    if p == 1:
        return tensor
    _record("all_reduce", axis, tensor.numel() * tensor.element_size(), p, what)
    dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op], group=group)
    return tensor


def all_gather_object(obj, group, *, axis: str, what: str) -> list:
    """Every rank's picklable ``obj``, in the group's rank order (start-up checks only)."""
    p = group_size(group) if group is not None else (dist.get_world_size() if dist.is_initialized() else 1)
    if p == 1:
        return [obj]
    out = [None] * p
    _record("all_gather_object", axis, 0, p, what)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast(tensor: torch.Tensor, group, *, src: int = 0, axis: str, what: str) -> torch.Tensor:
    """Replace ``tensor`` in place by global rank ``src``'s (and return it). ``group``
    None with torch.distributed initialized means the world."""
    p = group_size(group) if group is not None else (dist.get_world_size() if dist.is_initialized() else 1)
    if p == 1:
        return tensor
    _record("broadcast", axis, tensor.numel() * tensor.element_size(), p, what)
    dist.broadcast(tensor, src=src, group=group)
    return tensor


def broadcast_object(obj, group=None, *, src: int = 0, axis: str = "world", what: str):
    """Global rank ``src``'s picklable ``obj`` on every rank of ``group`` (None: the world);
    what the other ranks pass is ignored. For start-up decisions (a run id, the checkpoint
    to resume), not per-step data."""
    p = group_size(group) if group is not None else (dist.get_world_size() if dist.is_initialized() else 1)
    if p == 1:
        return obj
    _record("broadcast_object", axis, 0, p, what)
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def agree(error: BaseException | None, what: str, group=None, *, raise_as: type[Exception] | None = None,
          hint: str = "", local: bool = False, label: str = "agree") -> None:
    """Every rank of ``group`` (None: the world) learns whether any rank failed at ``what``:
    one counted all_gather_object of each rank's outcome, so no rank is left waiting at the
    next collective. The failing rank raises its own ``error``; every other rank raises
    ``raise_as`` (CheckpointError for the trainer's and checkpoints' steps), or, with
    ``raise_as`` None, an error of the failing rank's class where it is one of
    saeengine.errors' or a builtin exception (a ConfigError stays a ConfigError, so every
    rank exits with the same code), else InputError. Its message: "<what> failed on
    rank(s) <ranks>; rank <r>: <Type>: <text>[; <hint>]".
    ``local=True``: a one-process run (no one to tell): only raises ``error``."""
    if local:
        if error is not None:
            raise error
        return
    outcome = None if error is None else (type(error).__module__, type(error).__qualname__, str(error))
    seen = all_gather_object(outcome, group, axis="world", what=label)
    if error is not None:
        raise error
    failed = [(rank, o) for rank, o in enumerate(seen) if o is not None]
    if not failed:
        return
    rank, (module, name, text) = failed[0]
    ranks = ",".join(str(r) for r, _ in failed)
    message = (f"{what} failed on rank{'s' if len(failed) > 1 else ''} {ranks}; rank {rank}: {name}: {text}"
               + (f"; {hint}" if hint else ""))
    raise (raise_as or _error_class(module, name))(message)


def _error_class(module: str, name: str) -> type[Exception]:
    """The class of another rank's error, where it can be rebuilt from its message alone:
    saeengine.errors' classes and builtin exceptions; InputError otherwise."""
    import builtins

    from .. import errors

    space = {"saeengine.errors": errors, "builtins": builtins}.get(module)
    cls = getattr(space, name, None) if space is not None else None
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            cls("probe")
            return cls
        except Exception:  # noqa: BLE001 - a constructor that needs more than a message
            pass
    return errors.InputError


def agreed(step, what: str, group=None, **kwargs):
    """``step()`` on this rank, then :func:`agree` on its outcome; returns its result."""
    try:
        result, error = step(), None
    except Exception as exc:  # noqa: BLE001 - raised by agree, after the other ranks know
        result, error = None, exc
    agree(error, what, group, **kwargs)
    return result


# ----- closed forms -------------------------------------------------------------------------

def latent_axis_bytes(n: int, d: int, k: int, p: int, *, k_aux: int = 0, value_bytes: int = 4,
                      key_bytes: int = 8, input_grad: bool = False) -> dict[str, int]:
    """Payload bytes per rank per step of the latent axis (P ranks, N tokens each):

    - forward: one all_gather of the N x (k + k_aux) packed (value, index) keys
      (``key_bytes`` each), and one all_reduce of the N x d partial reconstructions (two
      with AuxK: stacked into one call);
    - backward: an all_reduce of b_dec's encoder gradient (d values), or of the N x d
      input gradient when the input needs one (``input_grad``).
    """
    if p == 1:
        return {"topk_candidates": 0, "partial_recon": 0, "backward": 0, "total": 0}
    cand = n * (k + k_aux) * key_bytes
    recon = n * d * value_bytes * (2 if k_aux else 1)
    back = (n * d if input_grad else d) * value_bytes
    return {"topk_candidates": cand, "partial_recon": recon, "backward": back, "total": cand + recon + back}


def ddp_bytes(f: int, d: int, *, value_bytes: int = 4) -> int:
    """Payload bytes per rank per step of plain DDP: the dense gradients of W_enc [F, d],
    b_enc [F], W_dec [F, d] and b_dec [d] all-reduced."""
    return (2 * f * d + f + d) * value_bytes


def memory_per_rank(f: int, d: int, n: int, k: int, *, latent: int, data: int = 1, param_bytes: int = 4,
                    adam_bytes: int = 8, grad_bytes: int = 4, act_bytes: int = 4, k_aux: int = 0,
                    dense_pre: bool = False) -> dict[str, float]:
    """Bytes one rank holds in a step (a model; the fused encoder never holds [N, F]):

    weights 2 F_r d + F_r + d (F_r = ceil(F / latent)); Adam's two moments and the gradients
    of them; activations: x, x~, recon, the input-gradient and the partials (5 N d), the
    codes (N (k + k_aux) x 12 bytes: value, index, key), the gathered candidates
    (latent x N x (k + k_aux) x 8) and, with ``dense_pre``, the pre-activations N F_r.
    N is the tokens per data rank.
    """
    f_r = -(-f // latent)
    params = 2 * f_r * d + f_r + d
    kk = k + k_aux
    acts = 5 * n * d * act_bytes + n * kk * 12 + latent * n * kk * 8 + (n * f_r * act_bytes if dense_pre else 0)
    out = {"weights": params * param_bytes, "adam": params * adam_bytes, "grads": params * grad_bytes,
           "activations": acts}
    out["total"] = sum(out.values())
    return out


def widest_fitting(memory_bytes: float, d: int, n: int, k: int, *, latent: int, data: int = 1,
                   k_aux: int = 0, headroom: float = 0.9) -> int:
    """The largest F (a power of two) whose :func:`memory_per_rank` total fits in
    ``headroom * memory_bytes``; 0 when none does. ``n`` is the tokens per data rank."""
    best, f = 0, 1 << 10
    while f <= 1 << 34:
        if memory_per_rank(f, d, n, k, latent=latent, data=data, k_aux=k_aux)["total"] <= headroom * memory_bytes:
            best = f
        f <<= 1
    return best
