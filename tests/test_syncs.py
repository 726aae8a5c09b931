"""The host-sync counter: it sees each syncing op (forward and autograd's backward) and
ignores the ops that only queue GPU work."""

import pytest
import torch

from saeengine.syncs import count_host_syncs


def test_counts_each_op_that_reads_a_device_value():
    x = torch.tensor([0.0, 2.0, -1.0, 2.0])
    mask = x > 0
    coo = torch.sparse_coo_tensor(torch.tensor([[1, 0, 1]]), torch.ones(3), (3,), check_invariants=False)
    with count_host_syncs() as syncs:
        float(x.sum())
        x.nonzero()
        x.unique()
        x[mask]
        x.masked_select(mask)
        coo.coalesce()
        torch.bincount(torch.tensor([0, 2]))
        torch.repeat_interleave(torch.tensor([1, 2]))
    assert dict(syncs.by_op) == {"_local_scalar_dense": 1, "nonzero": 1, "_unique2": 1, "index": 1,
                                 "masked_select": 1, "_coalesce": 1, "bincount": 1, "repeat_interleave": 1}
    assert syncs.total == 8


def test_queue_only_ops_and_sized_variants_are_not_counted():
    x = torch.randn(5, 3, requires_grad=True)
    idx = torch.tensor([4, 0])
    with count_host_syncs() as syncs:
        y = (x[idx] * 2).sum() + torch.where(x > 0, x, 0).sum()
        torch.nonzero_static(x > 0, size=4)
        torch.repeat_interleave(torch.tensor([1, 2]), output_size=3)
        torch.sort(x.detach().reshape(-1), stable=True)
        y.backward()
    assert syncs.total == 0, dict(syncs.by_op)


def test_backward_ops_are_counted():
    x = torch.randn(4, requires_grad=True)

    class SyncInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t * 1

        @staticmethod
        def backward(ctx, g):
            int(g.sum())  # a host read inside backward
            return g

    with count_host_syncs() as syncs:
        SyncInBackward.apply(x).sum().backward()
    assert syncs.by_op["_local_scalar_dense"] == 1


def test_blocking_copy_rule_both_ways():
    """A copy between the host and the GPU blocks unless it is non-blocking with pinned
    host memory; copies that stay on one side never count."""
    from saeengine.syncs import blocking_copy

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    for src, dst in ((cpu, gpu), (gpu, cpu)):
        assert blocking_copy(src, dst, non_blocking=False, host_pinned=False)
        assert blocking_copy(src, dst, non_blocking=False, host_pinned=True)
        assert blocking_copy(src, dst, non_blocking=True, host_pinned=False)  # pageable: staged synchronously
        assert not blocking_copy(src, dst, non_blocking=True, host_pinned=True)
    for src, dst in ((cpu, cpu), (gpu, gpu), ("cuda:0", "cuda:1")):
        assert not blocking_copy(src, dst, non_blocking=False, host_pinned=False)


def test_host_device_copies_are_read_from_the_real_ops(monkeypatch):
    """The dispatch side of the copy rule on real ops without a GPU: "meta" stands in for
    the GPU, so ``.to(device)`` (``_to_copy``) and ``copy_`` reach the counter with the
    arguments torch gives them; a patched pin check stands in for pinned memory."""
    from saeengine import syncs

    monkeypatch.setattr(syncs, "ACCELERATOR", "meta")
    host = torch.randn(4, 3)
    device_side = host.to("meta")
    with count_host_syncs() as counted:
        host.to("meta")                                   # blocking upload
        host.to("meta", non_blocking=True)                # from pageable memory: still blocking
        device_side.copy_(host)                           # blocking upload
        device_side.copy_(host, non_blocking=True)        # pageable: blocking
        host.to(torch.float64)                            # stays on the host
        device_side.to(torch.float16)                     # stays on the device
        with pytest.raises(NotImplementedError):
            device_side.to("cpu")                         # a download (meta has no data to give)
    assert dict(counted.by_op) == {"_to_copy": 3, "copy_": 2}, dict(counted.by_op)

    monkeypatch.setattr(syncs, "_is_pinned", lambda t: t.device.type == "cpu")  # as if pinned
    with count_host_syncs() as counted:
        host.to("meta", non_blocking=True)
        device_side.copy_(host, non_blocking=True)
        host.to("meta")                                   # pinned but blocking: counted
    assert dict(counted.by_op) == {"_to_copy": 1}, dict(counted.by_op)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU; test_host_device_copies_are_read_from_the_real_ops runs the same "
                           "dispatch logic with meta standing in")
def test_host_device_copies_on_a_gpu():
    pageable, pinned = torch.randn(64, 8), torch.randn(64, 8).pin_memory()
    on_gpu = torch.empty(64, 8, device="cuda")
    with count_host_syncs() as counted:
        pinned.to("cuda", non_blocking=True)
        on_gpu.copy_(pinned, non_blocking=True)
        pinned.copy_(on_gpu, non_blocking=True)
    assert counted.total == 0, dict(counted.by_op)
    with count_host_syncs() as counted:
        pageable.to("cuda")
        pageable.to("cuda", non_blocking=True)
        pinned.to("cuda")
        on_gpu.copy_(pageable)
        on_gpu.to("cpu")
    assert dict(counted.by_op) == {"_to_copy": 4, "copy_": 1}, dict(counted.by_op)
