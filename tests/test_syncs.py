"""The host-sync counter: it sees each syncing op (forward and autograd's backward) and
ignores the ops that only queue GPU work."""

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
