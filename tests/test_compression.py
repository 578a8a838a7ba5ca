"""Packing updates: half precision within its rounding, top-k with error feedback."""

import numpy as np
import pytest

from daskdist.compression import check_compression, decompress, pack


def _update(n=10_000, seed=0):
    return np.random.default_rng(seed).normal(size=n).astype(np.float32)


@pytest.mark.parametrize("kind, rtol", [("fp16", 2**-11), ("bf16", 2**-8)])
def test_half_precision_halves_the_bytes_within_its_rounding(kind, rtol):
    v = _update()
    packed, left = pack(v, kind)
    assert left is None
    assert packed.nbytes == v.nbytes // 2
    np.testing.assert_allclose(decompress(packed), v, rtol=rtol, atol=1e-6)


def test_topk_sends_the_largest_entries_and_remembers_the_rest():
    v = _update()
    packed, left = pack(v, "topk", density=0.01)
    indices, values = packed.data
    assert len(indices) == 100 and packed.nbytes == 100 * 8
    assert np.abs(v[indices]).min() >= np.abs(np.delete(v, indices)).max()
    np.testing.assert_array_equal(decompress(packed) + left, v)


def test_error_feedback_sends_every_part_of_the_updates_eventually():
    """Over rounds, what was sent plus what is remembered is what was given, exactly."""
    given, sent, memory = np.zeros(1000, np.float32), np.zeros(1000, np.float32), None
    for seed in range(50):
        v = _update(1000, seed)
        packed, memory = pack(v, "topk", density=0.05, residual=memory)
        given += v
        sent += decompress(packed)
    np.testing.assert_allclose(sent + memory, given, atol=1e-4)
    assert np.abs(memory).max() < np.abs(given).max()  # nothing is stuck for good


def test_bad_options_are_refused():
    for compression, density in [("zip", 0.01), ("topk", 0.0), ("topk", 1.5), ("fp16", "x")]:
        with pytest.raises(ValueError, match="compression|density"):
            check_compression(compression, density)
