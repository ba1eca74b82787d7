"""Training batches: never a single spot (BatchNorm needs two), every spot drawn once per epoch."""

from __future__ import annotations

import numpy as np
import pytest

from stpred.train._data import _EpochShuffledBatches


@pytest.mark.parametrize("sizes", [(9,), (17, 9), (5, 33, 1)])
def test_training_batches_have_no_single_spot_tail(sizes):
    start = np.cumsum((0, *sizes))
    groups = [np.arange(a, a + n) for a, n in zip(start[:-1], sizes, strict=True)]
    for epoch in range(3):
        batches = _EpochShuffledBatches(groups, batch_size=4, shuffle=True, seed=epoch)._make(epoch)
        drawn = np.sort(np.concatenate(batches))
        np.testing.assert_array_equal(drawn, np.arange(sum(sizes)))
        # a group of one spot cannot be merged; every other batch holds at least two spots
        assert all(len(b) >= 2 for b in batches if not (len(b) == 1 and 1 in sizes))
        for b in batches:  # each batch stays within one group
            assert len({int(np.searchsorted(start, i, side="right")) for i in b}) == 1


def test_inference_batches_keep_their_size():
    batches = _EpochShuffledBatches([np.arange(9)], batch_size=4, shuffle=False, seed=0)._make(0)
    assert [len(b) for b in batches] == [4, 4, 1]
