"""Count the host syncs a piece of code would make on a GPU, on any device.

A host sync stalls Python until the GPU has finished everything queued, so the next
kernels start only after Python has launched them again: the GPU idles once per sync for
the launch latency of what follows. A training step that syncs rarely lets Python run
ahead of the GPU, and its wall time is then the GPU's time alone.

:class:`count_host_syncs` records, through a ``TorchDispatchMode``, every aten op whose
CUDA implementation must read a device value on the host: ``item()``/``int()``/``bool()``
(``_local_scalar_dense``), ``nonzero``, ``unique``, ``masked_select``, boolean-mask
indexing, ``coalesce``, ``bincount``, ``repeat_interleave`` without an output size, and
copies between the host and the GPU (either way: ``.to(device)`` is ``_to_copy``,
``dst.copy_(src)`` is ``copy_``) unless non-blocking with pinned host memory
(:func:`blocking_copy`). The other ops are the same on CPU tensors, so their count is
measured on the CPU as it would be on a GPU, and a test can pin it; the copies exist on
a GPU run only. Two differences remain, so treat a CPU count as a lower bound for sparse code
and an upper bound for scalars that stay on the CPU:
- adding two sparse COO tensors merges them on the CPU but concatenates them on CUDA, so a
  later ``coalesce`` there syncs where the CPU run has nothing to coalesce;
- reading a scalar that lives on the CPU also on a GPU run (``torch.optim.Adam``'s step
  counter) is counted, although it waits for nothing.

Example::

    with count_host_syncs() as syncs:
        loss = sae(x, dead_mask=dead).loss
        loss.backward()
    print(syncs.total, syncs.by_op)   # e.g. 3 {'nonzero': 1, '_local_scalar_dense': 2}
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops (overload packets) whose CUDA kernels read a device value on the host.
SYNCING_OPS = frozenset({
    "_local_scalar_dense", "nonzero", "_unique", "_unique2", "unique_dim", "unique_consecutive",
    "unique_dim_consecutive", "masked_select", "_coalesce", "bincount", "is_nonzero", "equal",
})


# The device type whose copies to and from the host are counted. (A CPU-only test stands
# "meta" in for it, to run the dispatch logic below on real ops.)
ACCELERATOR = "cuda"


def blocking_copy(src: torch.device | str, dst: torch.device | str, non_blocking: bool, host_pinned: bool) -> bool:
    """Whether a copy from ``src`` to ``dst`` makes the host wait: a copy between the host
    and the GPU (either way) does, unless it is ``non_blocking`` and its host memory is
    pinned. (From pageable memory even a non_blocking copy is staged synchronously.)"""
    crosses = {torch.device(src).type, torch.device(dst).type} == {"cpu", ACCELERATOR}
    return crosses and not (non_blocking and host_pinned)


def _is_pinned(t: torch.Tensor) -> bool:
    return t.is_pinned()


def _copy_blocks(name: str, args, kwargs) -> bool:
    """``_to_copy`` (``.to(device)``) or ``copy_`` between the host and the GPU that blocks."""
    if name == "_to_copy":
        src = args[0]
        dst = torch.device(kwargs["device"]) if kwargs.get("device") is not None else src.device
        non_blocking = bool(kwargs.get("non_blocking", False))
        # host memory: the source for a copy to the GPU, else the new output (pinned if asked)
        pinned = _is_pinned(src) if src.device.type == "cpu" else bool(kwargs.get("pin_memory"))
        return blocking_copy(src.device, dst, non_blocking, pinned)
    dst, src = args[0], args[1]
    if not isinstance(src, torch.Tensor):
        return False
    non_blocking = bool(args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
    host = src if src.device.type == "cpu" else dst
    return blocking_copy(src.device, dst.device, non_blocking, _is_pinned(host))


def _is_bool_mask_index(func, args) -> bool:
    if func.overloadpacket.__name__ not in ("index", "index_put", "index_put_", "_index_put_impl_"):
        return False
    return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (args[1] or ()))


def _syncs(func, args, kwargs) -> bool:
    name = func.overloadpacket.__name__
    if name in SYNCING_OPS:
        return True
    if name == "repeat_interleave":
        return kwargs.get("output_size") is None and (len(args) < 4 or args[3] is None)
    if name in ("_to_copy", "copy_"):
        return _copy_blocks(name, args, kwargs)
    return _is_bool_mask_index(func, args)


class count_host_syncs(TorchDispatchMode):
    """Context manager: ``total`` (int) and ``by_op`` (Counter of op names) of the host
    syncs the code inside would make on a GPU; autograd's backward is counted too."""

    def __init__(self):
        super().__init__()
        self.by_op: Counter = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _syncs(func, args, kwargs):
            self.by_op[func.overloadpacket.__name__] += 1
        return func(*args, **kwargs)
