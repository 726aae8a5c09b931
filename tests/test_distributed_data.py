"""The data axis over an activation store (saeengine.distributed.data), against brute
force: each token's activations are its own id, so every batch read tells which rows it
holds. Per step the ranks' parts are disjoint and together the single-process loader's
global batch; over an epoch every token is read once; the same seed gives the same order;
data size 1 is the single-process loader; a position resumes at another data size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saeengine.distributed.data import (DataShardedLoader, check_data_axis, data_batch_positions, rank_part,
                                        shard_batches)
from saeengine.errors import ConfigError, InputError
from saeengine.store import ActivationLoader, ActivationStore, ActivationWriter, batch_positions
from saeengine.trainer.data import batch_source

SMALL = {"block_rows": 8, "pool_blocks": 4}  # many pools per epoch in a small store


def id_store(path, n: int = 700, shard_tokens: int = 128) -> ActivationStore:
    """A store whose row i holds [i, i, i] (float32: exact), in several shards."""
    acts = np.repeat(np.arange(n, dtype=np.float32)[:, None], 3, axis=1)
    with ActivationWriter(path, d_in=3, dtype="float32", shard_tokens=shard_tokens) as writer:
        writer.add(acts, np.arange(n) // 4, np.arange(n) % 4)
    return ActivationStore(path)


def ids(batch: torch.Tensor) -> np.ndarray:
    """The token ids a batch of an id store holds (each row's value)."""
    assert torch.equal(batch[:, 0], batch[:, 2])
    return batch[:, 0].numpy().astype(np.int64)


@pytest.mark.parametrize("n,batch,size", [(1000, 24, 4), (777, 30, 3), (513, 16, 2), (100, 10, 1)])
def test_parts_are_disjoint_and_cover_one_epoch(n, batch, size):
    parts = [list(data_batch_positions(n, batch, 3, r, size, epochs=1, **SMALL)) for r in range(size)]
    steps = n // batch
    assert all(len(p) == steps for p in parts)
    seen = np.zeros(n, dtype=np.int64)
    for step in range(steps):
        mine = [parts[r][step][2] for r in range(size)]
        assert all(m.size == batch // size for m in mine)
        together = np.concatenate(mine)
        assert np.unique(together).size == batch  # disjoint within the step
        np.add.at(seen, together, 1)
    # brute force over the epoch: no token twice, and exactly (n // batch) * batch tokens read
    assert seen.max() == 1 and seen.sum() == steps * batch and ((0 <= together) & (together < n)).all()


def test_same_seed_same_order_and_other_seeds_or_epochs_differ():
    def first(seed, epoch=0):
        return [rows for _, _, rows in data_batch_positions(500, 20, seed, 1, 4, epoch=epoch, epochs=epoch + 1)]

    assert all(np.array_equal(a, b) for a, b in zip(first(7), first(7)))
    assert not np.array_equal(np.concatenate(first(7)), np.concatenate(first(8)))
    assert not np.array_equal(np.concatenate(first(7, 0)), np.concatenate(first(7, 1)))


def test_data_size_1_is_the_single_process_loader(tmp_path):
    store = id_store(tmp_path / "s")
    single = list(ActivationLoader(store, 40, seed=5, epochs=2, **SMALL))
    sharded = list(DataShardedLoader(store, 40, data_rank=0, data_size=1, seed=5, epochs=2, **SMALL))
    assert len(single) == len(sharded) == 2 * (700 // 40)
    assert all(torch.equal(a, b) for a, b in zip(single, sharded))


def test_loader_ranks_read_their_parts_of_the_global_batches(tmp_path):
    store = id_store(tmp_path / "s")
    single = [set(ids(b)) for b in ActivationLoader(store, 48, seed=1, epochs=1, **SMALL)]
    ranks = [list(DataShardedLoader(store, 48, data_rank=r, data_size=4, seed=1, epochs=1, **SMALL))
             for r in range(4)]
    assert all(len(r) == len(single) == 700 // 48 for r in ranks)
    for step, expected in enumerate(single):
        parts = [ids(ranks[r][step]) for r in range(4)]
        assert all(p.size == 12 for p in parts)
        assert sum(len(set(p)) for p in parts) == 48 and set(np.concatenate(parts)) == expected


def test_resumes_from_a_position_also_at_another_data_size(tmp_path):
    store = id_store(tmp_path / "s")
    kw = dict(seed=2, epochs=None, **SMALL)
    # uninterrupted: the global batches of a single-process loader
    plain = ActivationLoader(store, 40, **kw)
    it = iter(plain)
    global_batches = [set(ids(next(it))) for _ in range(25)]  # past the 17-batch epoch
    # data=2: twenty batches (into the second epoch), then the position
    first = DataShardedLoader(store, 40, data_rank=1, data_size=2, **kw)
    it = iter(first)
    for _ in range(20):
        next(it)
    state = first.state_dict()
    assert state["epoch"] == 1 and state["batch_in_epoch"] == 3 and state["batch_size"] == 40
    # ... resumed at data=2 (the same rank): the batches it would have read next
    again = DataShardedLoader(store, 40, data_rank=1, data_size=2, **kw)
    again.load_state_dict(state)
    assert torch.equal(next(iter(again)), next(it))
    # ... at data=4: its four parts are the next global batch; at one process: the same batch
    parts = []
    for r in range(4):
        loader = DataShardedLoader(store, 40, data_rank=r, data_size=4, **kw)
        loader.load_state_dict(state)
        parts.append(ids(next(iter(loader))))
    assert set(np.concatenate(parts)) == global_batches[20] and sum(p.size for p in parts) == 40
    single = ActivationLoader(store, 40, **kw)
    single.load_state_dict(state)
    assert set(ids(next(iter(single)))) == global_batches[20]


def test_trainer_sources_for_one_data_rank(tmp_path):
    store = id_store(tmp_path / "s")
    data = torch.arange(700, dtype=torch.float32)[:, None].repeat(1, 3)
    for source_of in (lambda: batch_source(store, 32, 4, torch.device("cpu")),
                      lambda: batch_source(data, 32, 4, torch.device("cpu"))):
        reference = source_of()
        it = iter(reference)
        global_batches = [set(ids(next(it))) for _ in range(5)]
        ranks = [shard_batches(source_of(), r, 2) for r in range(2)]
        its = [iter(s) for s in ranks]
        for step in range(5):
            parts = [ids(next(i)) for i in its]
            assert set(np.concatenate(parts)) == global_batches[step] and all(p.size == 16 for p in parts)
            for r, part in enumerate(parts):
                assert np.array_equal(ranks[r].rows_of_step(step), np.sort(part))
        state = ranks[0].state_dict()
        assert state["batch_in_epoch"] == 5 and ranks[0].identity() == reference.identity()
        assert np.array_equal(ranks[0].init_rows(3), reference.init_rows(3))
        resumed = shard_batches(source_of(), 0, 2)
        resumed.load_state_dict(state)
        assert np.array_equal(ids(next(iter(resumed))), ids(next(its[0])))


def test_bad_data_axis_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"batch_size=30 does not divide by the data axis \(4 ranks\).*use "
                                          r"batch_size=28 or 32"):
        check_data_axis(30, 0, 4)
    with pytest.raises(InputError, match=r"data_rank=2 must lie in \[0, data_size=2\)"):
        list(data_batch_positions(100, 10, 0, 2, 2))
    with pytest.raises(InputError, match="data_size must be an integer >= 1"):
        check_data_axis(10, 0, 0)
    store = id_store(tmp_path / "s", n=50)
    with pytest.raises(ConfigError, match="global batch_size=64 is larger than the 50 tokens"):
        DataShardedLoader(store, 64, data_rank=0, data_size=2)
    with pytest.raises(ConfigError, match="use batch_size=20"):
        shard_batches(batch_source(store, 21, 0, torch.device("cpu")), 0, 2)


def test_rank_part_splits_a_partial_batch_evenly():
    rows = np.arange(10)
    assert [rank_part(rows, r, 4).tolist() for r in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    kept = [rows for _, _, rows in batch_positions(45, 20, 0, epochs=1, drop_last=False)]
    last = [list(data_batch_positions(45, 20, 0, r, 4, epochs=1, drop_last=False))[-1][2] for r in range(4)]
    assert sorted(np.concatenate(last).tolist()) == sorted(kept[-1].tolist()) and kept[-1].size == 5
