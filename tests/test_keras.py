"""Keras 3 models (torch backend) as modules: built, trained, resumed and predicted by daskdist.

The test model has the layers whose variables trip a torch-minded trainer:
BatchNormalization (moving statistics are non-trainable variables, not
buffers) and Dropout (an int32 seed-generator state among the variables).
``tests/conftest.py`` sets ``KERAS_BACKEND=torch`` before the session's
workers start.
"""

import copy

import dask.array as da
import numpy as np
import pytest
import torch

keras = pytest.importorskip("keras")

from daskdist import Checkpoint, DaskNeuralNetClassifier  # noqa: E402
from daskdist.keras_models import KerasModule  # noqa: E402
from daskdist.state import params_vector  # noqa: E402


def unbuilt_model():
    """As Keras users write them: no input shape, so no variables until the first call."""
    return keras.Sequential([
        keras.layers.Dense(16, activation="tanh"), keras.layers.BatchNormalization(),
        keras.layers.Dropout(0.2), keras.layers.Dense(3)])


def _net(module=unbuilt_model, **kwargs):
    params = dict(max_epochs=4, lr=0.1, batch_size=32, train_split=None, verbose=0,
                  random_state=0, criterion=torch.nn.CrossEntropyLoss, sync_every=2,
                  optimizer__momentum=0.9)
    return DaskNeuralNetClassifier(module, **{**params, **kwargs})


@pytest.mark.parametrize("strategy", ["sync", "local_sgd", "hierarchical", "diloco", "async",
                                      "ssp"])
def test_a_keras_model_trains_with_futures_strategies(client, tiny_data, strategy):
    X, y = tiny_data
    net = _net(strategy=strategy).fit(X, y)
    module = net.module_
    assert isinstance(module, KerasModule) and module.built
    # the optimizer steps the trainable float variables only; the rest is state
    assert [n.split(".", 1)[1] for n, _ in module.named_parameters()] == \
        ["kernel", "bias", "gamma", "beta", "kernel", "bias"]
    assert [n.split(".", 1)[1] for n, _ in module.named_buffers()] == \
        ["moving_mean", "moving_variance", "seed_generator_state"]
    moving_mean = dict(module.named_buffers())["4.moving_mean"]  # averaged, not left at 0
    assert moving_mean.abs().sum() > 0
    assert net.score(X, y) > 0.75
    # the variables trained are the Keras model's own
    kernel = module.keras_model.layers[0].kernel
    assert kernel.value is next(module.parameters())


def test_one_replica_sync_equals_a_plain_torch_loop_on_the_keras_model(client, tiny_data):
    X, y = tiny_data

    def built_model():  # BatchNormalization, no Dropout: the loops draw no random numbers
        return keras.Sequential([
            keras.Input((20,)), keras.layers.Dense(16, activation="tanh"),
            keras.layers.BatchNormalization(), keras.layers.Dense(3)])

    net = _net(built_model, n_replicas=1, strategy="sync", max_epochs=2,
               optimizer__momentum=0.0, iterator_train__shuffle=False).initialize()
    model = copy.deepcopy(net.module_.keras_model)
    net.fit(X, y)
    opt = torch.optim.SGD([v.value for v in model.trainable_variables], lr=0.1)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    for _ in range(2):
        for first in range(0, len(X), 32):
            opt.zero_grad()
            out = model(Xt[first:first + 32], training=True)
            torch.nn.functional.cross_entropy(out, yt[first:first + 32]).backward()
            opt.step()
    trained = KerasModule(model)
    np.testing.assert_allclose(params_vector(net.module_), params_vector(trained),
                               atol=1e-5, rtol=0)
    for (name, ours), (_, theirs) in zip(net.module_.named_buffers(), trained.named_buffers()):
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-5, err_msg=name)


def test_a_keras_fit_resumes_exactly(client, tiny_data, tmp_path):
    X, y = tiny_data
    whole = _net(strategy="local_sgd").fit(X, y)
    _net(strategy="local_sgd", max_epochs=2,
         callbacks=[("checkpoint", Checkpoint(tmp_path / "ck"))]).fit(X, y)
    resumed = _net(strategy="local_sgd").fit(X, y, resume=tmp_path / "ck")
    np.testing.assert_allclose(params_vector(resumed.module_), params_vector(whole.module_),
                               atol=1e-6, rtol=0)
    np.testing.assert_allclose(resumed.history[:, "train_loss"], whole.history[:, "train_loss"],
                               rtol=1e-6)


def test_a_keras_model_predicts_block_wise(client, tiny_data):
    X, y = tiny_data
    net = _net(strategy="local_sgd", max_epochs=2).fit(X, y)
    lazy = net.predict_proba(da.from_array(X, chunks=60))
    assert isinstance(lazy, da.Array) and lazy.numblocks == (4, 1)
    np.testing.assert_allclose(lazy.compute(), net.predict_proba(X), atol=1e-6)
    # in eval mode: Dropout off and BatchNormalization on its moving statistics
    np.testing.assert_allclose(net.predict_proba(X), net.predict_proba(X), atol=0)


def test_another_keras_backend_is_refused_with_what_to_set(monkeypatch):
    # Keras's other backends need TensorFlow or JAX, which are not installed here: the
    # backend Keras reports is what the check reads
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(RuntimeError, match=r"'jax' backend.*KERAS_BACKEND=torch"):
        KerasModule(keras.Sequential([keras.layers.Dense(2)]))


@pytest.mark.parametrize("strategy", ["ddp", "pipeline"])
def test_ddp_and_pipeline_refuse_a_keras_model_before_any_work(client, tiny_data, strategy):
    X, y = tiny_data
    with pytest.raises((ValueError, TypeError), match="Keras|Sequential"):
        _net(strategy=strategy).fit(X, y)
