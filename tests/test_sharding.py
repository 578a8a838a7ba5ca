import numpy as np
import pytest

from daskdist.data.sharding import holdout_split, plan_shards


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


# -- whole chunks --------------------------------------------------------------------------------

from daskdist.data.sharding import chunk_rows, plan_chunks  # noqa: E402


@pytest.mark.parametrize("sharding", ["random", "sequential"])
def test_chunk_plans_use_every_chunk_once_and_balance_samples(sharding):
    sizes = [100] * 11 + [37]
    plan = plan_chunks(sizes, 4, sharding, random_state=0)
    assert sorted(np.concatenate(plan).tolist()) == list(range(12))
    loads = [sum(sizes[c] for c in chunks) for chunks in plan]
    assert max(loads) - min(loads) <= 100
    if sharding == "sequential":
        assert all(np.array_equal(c, np.arange(c[0], c[-1] + 1)) for c in plan)
        assert [c[0] for c in plan] == sorted(c[0] for c in plan)
    assert [c.tolist() for c in plan] == [
        c.tolist() for c in plan_chunks(sizes, 4, sharding, random_state=0)]


def test_random_chunk_plans_depend_on_the_seed():
    a = plan_chunks([10] * 20, 2, "random", random_state=0)
    b = plan_chunks([10] * 20, 2, "random", random_state=1)
    assert any(not np.array_equal(x, y) for x, y in zip(a, b))


def test_stratified_chunk_plans_keep_class_counts_within_one_chunk_of_their_share():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 60, size=(40, 4))  # chunks with very different class mixes
    for n_shards in (2, 3, 5):
        plan = plan_chunks(counts.sum(1), n_shards, "stratified", class_counts=counts,
                           random_state=0)
        held = np.array([counts[c].sum(0) for c in plan])
        share = counts.sum(0) / n_shards
        assert (np.abs(held - share) <= counts.max(0)).all(), (n_shards, held, share)


def test_chunk_plans_need_enough_chunks_and_labels_for_stratified():
    with pytest.raises(ValueError, match="Cannot make 3 shards of whole chunks from 2"):
        plan_chunks([5, 5], 3)
    with pytest.raises(ValueError, match="needs class labels"):
        plan_chunks([5, 5], 2, "stratified")


def test_chunk_rows_are_the_samples_of_the_chunks():
    np.testing.assert_array_equal(chunk_rows([3, 3, 4], [0, 2]), [0, 1, 2, 6, 7, 8, 9])
