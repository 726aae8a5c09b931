"""The autouse poisoning of fresh allocations (tests/conftest.py) catches what it is for."""

import pytest
import torch


def test_fresh_allocations_are_poisoned():
    assert torch.isnan(torch.empty(3, 4)).all()
    assert (torch.empty(5, dtype=torch.int64) == -7).all()
    assert torch.isnan(torch.empty_like(torch.zeros(2, 2))).all()
    assert torch.isnan(torch.zeros(1).new_empty(6)).all()


def test_a_write_past_the_end_is_caught(poison_empty):
    t = torch.empty(2, 3)
    assert t.shape == (2, 3) and t.is_contiguous()
    poison_empty.check()  # untouched: fine
    t._base[6] = 0.0  # one element past the end, as an out-of-bounds kernel store would
    with pytest.raises(AssertionError, match=r"wrote past the end of a fresh \[6\]"):
        poison_empty.check()
    t._base[6:] = 1234.5  # repair, so the fixture's own check passes
