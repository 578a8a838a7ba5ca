import numpy as np
import pytest

from daskdist.sharding import holdout_split, plan_shards


@pytest.mark.parametrize("sharding", ["random", "sequential", "stratified"])
def test_every_sample_lands_in_exactly_one_shard(sharding):
    labels = np.repeat(np.arange(4), [50, 30, 15, 8])
    shards = plan_shards(len(labels), 3, sharding, labels=labels, random_state=1)
    assert len(shards) == 3
    joined = np.concatenate(shards)
    assert len(joined) == len(labels)
    np.testing.assert_array_equal(np.sort(joined), np.arange(len(labels)))


def test_random_is_reproducible_for_a_seed_and_differs_across_seeds():
    a = plan_shards(1000, 4, "random", random_state=7)
    b = plan_shards(1000, 4, "random", random_state=7)
    c = plan_shards(1000, 4, "random", random_state=8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, z) for x, z in zip(a, c))
    # not simply contiguous blocks
    assert not np.array_equal(a[0], np.arange(len(a[0])))


def test_sequential_keeps_order_in_contiguous_blocks():
    shards = plan_shards(10, 3, "sequential")
    assert [s.tolist() for s in shards] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_stratified_keeps_class_proportions_within_one_sample():
    rng = np.random.default_rng(0)
    labels = rng.choice(5, size=997, p=[0.4, 0.3, 0.15, 0.1, 0.05])
    n_shards = 4
    shards = plan_shards(len(labels), n_shards, "stratified", labels=labels, random_state=3)
    for cls in np.unique(labels):
        share = np.sum(labels == cls) / n_shards
        for s in shards:
            assert abs(np.sum(labels[s] == cls) - share) < 1.0
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_stratified_needs_labels_and_bad_plans_are_refused():
    with pytest.raises(ValueError, match="labels"):
        plan_shards(10, 2, "stratified")
    with pytest.raises(ValueError, match="sharding must be one of"):
        plan_shards(10, 2, "blocks")
    with pytest.raises(ValueError, match="at least one sample"):
        plan_shards(3, 4, "random")


def test_holdout_split_is_stratified_and_disjoint():
    labels = np.repeat([0, 1, 2], [40, 40, 20])
    train, valid = holdout_split(len(labels), 0.2, labels=labels, random_state=0)
    assert len(np.intersect1d(train, valid)) == 0
    assert len(train) + len(valid) == len(labels)
    assert [np.sum(labels[valid] == c) for c in range(3)] == [8, 8, 4]
