"""Count the host syncs a piece of code would make on a GPU, on any device.

A host sync stalls Python until the GPU has finished everything queued, so the next
kernels start only after Python has launched them again: the GPU idles once per sync for
the launch latency of what follows. A training step that syncs rarely lets Python run
ahead of the GPU, and its wall time is then the GPU's time alone.

:class:`count_host_syncs` records, through a ``TorchDispatchMode``, every aten op whose
CUDA implementation must read a device value on the host: ``item()``/``int()``/``bool()``
(``_local_scalar_dense``), ``nonzero``, ``unique``, ``masked_select``, boolean-mask
indexing, ``coalesce``, ``bincount``, ``repeat_interleave`` without an output size, and
copies from a CUDA tensor to the CPU. The ops are the same on CPU tensors, so the count
(apart from CUDA-to-CPU copies) is measured on the CPU as it would be on a GPU, and a test
can pin it. Two differences remain, so treat a CPU count as a lower bound for sparse code
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
    if name == "_to_copy":  # CUDA -> CPU
        device = kwargs.get("device")
        return args[0].is_cuda and device is not None and torch.device(device).type == "cpu"
    if name == "copy_":  # CUDA -> CPU, unless asynchronous into pinned memory (saeengine._host_read)
        dst, src = args[0], args[1]
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        return (isinstance(src, torch.Tensor) and src.is_cuda and dst.device.type == "cpu"
                and not (non_blocking and dst.is_pinned()))
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
