"""Dict inputs: ``X = {"image": ..., "meta": ...}`` for a module whose ``forward(image, meta)``."""

import numpy as np
import pytest
import scipy.sparse
import torch
import xarray

from daskdist import DaskNeuralNetClassifier
from daskdist.data.named import is_named
from daskdist.state import params_vector
from daskdist.testing import TinySequential


class _TwoInputs(torch.nn.Module):
    """Two inputs, each through its own layer, then one head."""

    def __init__(self, n_image=12, n_meta=8, n_outputs=3):
        super().__init__()
        self.image = torch.nn.Linear(n_image, 8)
        self.meta = torch.nn.Linear(n_meta, 8)
        self.head = torch.nn.Linear(16, n_outputs)

    def forward(self, image, meta):
        hidden = torch.cat([torch.tanh(self.image(image)), torch.tanh(self.meta(meta))], dim=1)
        return torch.softmax(self.head(hidden), dim=-1)


class _Concatenated(_TwoInputs):
    """The same module taking one array whose first 12 columns are the image's."""

    def forward(self, X):
        return super().forward(X[:, :12], X[:, 12:])


class _TokensAndMeta(torch.nn.Module):
    """Token ids through an embedding beside float features."""

    def __init__(self, vocabulary=6, n_meta=4, n_outputs=2):
        super().__init__()
        self.embed = torch.nn.EmbeddingBag(vocabulary, 8)
        self.meta = torch.nn.Linear(n_meta, 8)
        self.head = torch.nn.Linear(16, n_outputs)

    def forward(self, tokens, meta):
        hidden = torch.cat([self.embed(tokens), torch.tanh(self.meta(meta))], dim=1)
        return torch.softmax(self.head(hidden), dim=-1)


def _net(module, **kwargs):
    params = {**dict(max_epochs=3, lr=0.5, batch_size=32, verbose=0, random_state=0,
                     optimizer__momentum=0.9), **kwargs}
    return DaskNeuralNetClassifier(module, **params)


def _split(X):
    return {"image": X[:, :12], "meta": X[:, 12:]}


@pytest.mark.parametrize("strategy", ["sync", "local_sgd", "ddp"])
def test_a_dict_trains_as_its_arrays_side_by_side(client, tiny_data, strategy):
    X, y = tiny_data
    # the same weights, the same rows in every shard and batch: the same fit
    named = _net(_TwoInputs, strategy=strategy, sync_every=3).fit(_split(X), y)
    whole = _net(_Concatenated, strategy=strategy, sync_every=3).fit(X, y)
    np.testing.assert_allclose(params_vector(named.module_), params_vector(whole.module_),
                               atol=1e-6, rtol=0)
    np.testing.assert_allclose(named.history[:, "valid_loss"], whole.history[:, "valid_loss"],
                               rtol=1e-5)
    assert named.input_keys_ == ["image", "meta"]
    proba = named.predict_proba(_split(X))
    np.testing.assert_allclose(proba, whole.predict_proba(X), atol=1e-6)
    assert named.score(_split(X), y) > 0.8
    # a row's output does not depend on the rows predicted with it
    np.testing.assert_array_equal(named.predict_proba(_split(X[:5])), proba[:5])


def test_integer_arrays_of_a_dict_reach_an_embedding_as_indices(client):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 6, size=(300, 5))
    meta = rng.normal(size=(300, 4)).astype(np.float32)
    y = (tokens == 3).any(axis=1).astype(np.int64)
    net = _net(_TokensAndMeta, max_epochs=20).fit({"tokens": tokens, "meta": meta}, y)
    assert net.score({"tokens": tokens, "meta": meta}, y) > 0.9


_BAD = [
    (lambda X: {"image": X[:, :12], "meta": X[:-1, 12:]}, "the same number of samples"),
    (lambda X: {}, "empty dict"),
    (lambda X: {0: X[:, :12], "meta": X[:, 12:]}, "must be strings"),
    (lambda X: {"image": np.where(X > 2, np.nan, X)[:, :12], "meta": X[:, 12:]},
     r"X\['image'\] contains NaN"),
]


@pytest.mark.parametrize("make, message", _BAD, ids=[m for _, m in _BAD])
def test_bad_dicts_are_refused_before_any_work(tiny_data, make, message):
    X, y = tiny_data
    net = _net(_TwoInputs, scheduler_address="tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match=message):
        net.fit(make(X), y)


def test_what_a_dict_cannot_go_with_is_refused(tiny_data):
    X, y = tiny_data
    unreachable = dict(scheduler_address="tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match="preprocess each array"):
        _net(_TwoInputs, preprocessor=lambda a: a, **unreachable).fit(_split(X), y)
    with pytest.raises(ValueError, match="passes one tensor between its stages"):
        _net(TinySequential, strategy="pipeline", **unreachable).fit(_split(X), y)


def test_only_plain_dicts_are_dict_inputs(tiny_data):
    X, _ = tiny_data
    assert is_named(_split(X))
    assert not is_named(scipy.sparse.dok_array(X))  # a dict with a shape: sparse input
    assert not is_named(xarray.Dataset({"a": ("sample", X[:, 0])}))  # a mapping, not a dict


def test_prediction_needs_the_names_seen_in_fit(client, tiny_data):
    X, y = tiny_data
    net = _net(_TwoInputs, max_epochs=1).fit(_split(X), y)
    with pytest.raises(ValueError, match=r"fitted on \['image', 'meta'\]"):
        net.predict({"image": X[:, :12], "other": X[:, 12:]})
