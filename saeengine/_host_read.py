"""Read device values on the host later, without draining the GPU's queue.

``int(t)`` on a CUDA tensor waits until the GPU has run everything queued so far, then
the GPU idles while Python launches the next kernels. :class:`HostRead` instead copies
``t`` into pinned host memory asynchronously and records an event; ``tolist()`` later
waits for that event only. Read once more work has been queued behind it, and the GPU
never runs dry. On the CPU it is a plain read.
"""

from __future__ import annotations

import torch


class HostRead:
    """A small device tensor's values, copied to the host now and read later."""

    def __init__(self, t: torch.Tensor):
        if t.is_cuda:
            self._host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self._host.copy_(t, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record()
        else:
            self._host, self._done = t.detach().clone(), None

    def tolist(self):
        """The values (a Python scalar for a 0-d tensor); waits for the copy alone."""
        if self._done is not None:
            self._done.synchronize()
        return self._host.tolist()
