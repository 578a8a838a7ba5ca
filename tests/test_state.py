import numpy as np
import torch

from daskdist.state import (
    load_params,
    mean_flat_into,
    module_to_state,
    optimizer_state_from_numpy,
    params_vector,
    tree_weighted_sum,
)


def test_state_round_trip_restores_module_and_optimizer():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.Adam(module.parameters(), lr=0.1)
    module(torch.randn(8, 4)).sum().backward()
    opt.step()
    state = module_to_state(module, opt, step=1)

    other = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    other_opt = torch.optim.Adam(other.parameters(), lr=0.1)
    load_params(other, state.params, state.buffers)
    optimizer_state_from_numpy(other_opt, state.optimizer)
    np.testing.assert_array_equal(params_vector(other), params_vector(module))
    for (_, a), (_, b) in zip(module.named_buffers(), other.named_buffers()):
        assert torch.equal(a, b)
    a = opt.state_dict()["state"][0]["exp_avg"]
    b = other_opt.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(a, b)


def test_weighted_sum_ignores_zero_weights_and_keeps_non_float_leaves():
    trees = [
        {"p": np.array([1.0, 2.0], np.float32), "n": 3, "ids": np.array([1, 2])},
        {"p": np.array([3.0, 4.0], np.float32), "n": 3, "ids": np.array([1, 2])},
        None,
    ]
    out = tree_weighted_sum(trees, [1.0, 3.0, 0.0])
    np.testing.assert_allclose(out["p"], [10.0, 14.0])
    assert out["n"] == 3
    np.testing.assert_array_equal(out["ids"], [1, 2])


def test_weighted_sum_reads_read_only_arrays_without_changing_them():
    a = np.arange(4, dtype=np.float32)
    b = np.ones(4, dtype=np.float32)
    a.flags.writeable = b.flags.writeable = False  # as arrays received from a peer are
    out = tree_weighted_sum([a, b], [0.5, 2.0])
    np.testing.assert_allclose(out, 0.5 * np.arange(4) + 2.0)
    np.testing.assert_array_equal(a, np.arange(4))


def test_mean_flat_into_writes_the_weighted_mean_into_each_tensor():
    tensors = [torch.zeros(2, 3), torch.zeros(4)]
    rng = np.random.default_rng(0)
    vectors = [rng.normal(size=10).astype(np.float32) for _ in range(3)]
    weights = [0.2, 0.3, 0.5]
    mean_flat_into(tensors, vectors, weights)
    expected = sum(w * v for w, v in zip(weights, vectors))
    got = torch.cat([t.reshape(-1) for t in tensors]).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_shard_arrays_start_on_64_byte_boundaries_also_after_pickling():
    """torch rounds differently for differently aligned inputs: rebuilt shards must match."""
    import pickle

    from daskdist.data.shards import ALIGNMENT, RawShard, aligned, make_shard

    raw = np.arange(4 * 21 * 5, dtype=np.float32).reshape(4 * 21, 5)
    buffer = np.empty(raw.nbytes + 2 * ALIGNMENT, dtype=np.uint8)
    start = (-buffer.ctypes.data) % ALIGNMENT + 4  # 4 bytes past a 64-byte boundary
    misaligned = buffer[start:start + raw.nbytes].view(np.float32).reshape(raw.shape)
    misaligned[...] = raw
    assert misaligned.ctypes.data % ALIGNMENT != 0
    again = aligned(misaligned)
    assert again.ctypes.data % ALIGNMENT == 0
    np.testing.assert_array_equal(again, raw)
    assert aligned(again) is again  # no copy when already aligned

    shard = make_shard(RawShard(misaligned, np.arange(len(raw))), replica=0, holdout=0.25)
    for restored in (shard, pickle.loads(pickle.dumps(shard, protocol=5))):
        for a in (restored.X, restored.y, restored.X_valid, restored.y_valid):
            assert a.ctypes.data % ALIGNMENT == 0 and a.flags.c_contiguous
