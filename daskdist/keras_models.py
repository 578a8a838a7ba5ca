"""Keras 3 models (torch backend) as daskdist modules.

With ``KERAS_BACKEND=torch``, Keras layers and models are
``torch.nn.Module`` objects whose variables hold torch tensors, but they do
not behave like torch modules where daskdist needs them to:

- ``parameters()`` lists every Keras variable: the trainable weights, but
  also BatchNormalization's moving statistics and Dropout's int32
  seed-generator state, which an optimizer must not step and a float
  average must not mix with the weights;
- ``module.train()``/``eval()`` do not reach Keras layers: a Keras model
  takes ``training=True`` or ``False`` in its call;
- a model built without an input shape has no variables until its first
  call, so an optimizer built from it gets an empty parameter list.

:class:`KerasModule` wraps a Keras model for daskdist: its parameters are
the model's trainable floating-point variables, its buffers the other
variables (moving statistics are averaged with the parameters' buffers as
BatchNorm's are; integer state is carried), its forward pass calls the
model with ``training=self.training``, and a model that is not built yet is
built by the estimator's dry forward pass, from the input's shape, before
any work is sent. The variables are the model's own tensors, so what an
optimizer or a state load changes, the Keras model sees.

:func:`as_torch_module` is what the estimators call on the module they
build: Keras models are wrapped, anything else is returned as it is. Keras
itself is imported only when a module is a Keras object.
"""

from __future__ import annotations

import contextlib
import random
import sys

import numpy as np
import torch

__all__ = ["KerasModule", "as_torch_module", "is_keras", "check_backend", "keras_seeded"]


def is_keras(obj) -> bool:
    """Whether ``obj`` is a Keras layer or model (False when Keras was never imported)."""
    keras = sys.modules.get("keras")
    return keras is not None and isinstance(obj, keras.layers.Layer)


def check_backend() -> None:
    """Raise ``RuntimeError`` unless Keras runs on its torch backend in this process."""
    import keras

    backend = keras.backend.backend()
    if backend != "torch":
        raise RuntimeError(
            f"Keras runs on its {backend!r} backend here; daskdist trains Keras models on the "
            "torch backend. Set KERAS_BACKEND=torch in the environment of the client and of "
            "every worker before Keras is imported.")


@contextlib.contextmanager
def keras_seeded(seed: int | None):
    """Run the block with Keras's generators seeded by ``seed`` (nothing if None or no Keras).

    Through ``keras.utils.set_random_seed``, which also seeds Python's,
    NumPy's and torch's global generators: their states are put back
    afterwards, so that only Keras's own generator (which draws a new
    model's initial weights) keeps the seed.
    """
    keras = sys.modules.get("keras")
    if seed is None or keras is None:
        yield
        return
    # (the legacy global NumPy generator is what set_random_seed seeds)
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()  # noqa: NPY002
    keras.utils.set_random_seed(int(seed))
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])  # noqa: NPY002
        torch.random.set_rng_state(states[2])


def as_torch_module(module, seed: int | None = None):
    """``module`` as daskdist trains it: a Keras model wrapped in :class:`KerasModule`.

    ``seed`` seeds Keras's generators (``keras.utils.set_random_seed``) for
    the weights of a model built later, from the input's shape.
    """
    if isinstance(module, KerasModule) or not is_keras(module):
        return module
    return KerasModule(module, seed=seed)


class KerasModule(torch.nn.Module):
    """A Keras 3 model (torch backend) as a torch module daskdist can train.

    Parameters
    ----------
    model : keras.Model or keras.layers.Layer
        Built or not; an unbuilt model is built by its first call.
    seed : int or None
        Seeds Keras's generators before the call that builds the model.
    """

    def __init__(self, model, seed: int | None = None):
        check_backend()
        super().__init__()
        # kept out of torch's registry: parameters() and buffers() list its variables below
        self.__dict__["keras_model"] = model
        self.seed = seed

    def __setstate__(self, state):
        check_backend()  # on a worker: before its first task uses the model
        super().__setstate__(state)

    @property
    def built(self) -> bool:
        """Whether the Keras model has its variables."""
        return bool(self.keras_model.built and self.keras_model.variables)

    def forward(self, X):
        """The Keras model's output, in training mode when this module is."""
        if not self.built:  # this call builds it: its initial weights come from the seed
            with keras_seeded(self.seed):
                return self.keras_model(X, training=self.training)
        return self.keras_model(X, training=self.training)

    def _variables(self, trainable: bool):
        """``(name, variable)`` of the trainable float variables, or of the others.

        Named by position among the model's variables and the variable's own
        name (``"3.moving_mean"``): Keras makes layer names unique per
        process, so a copy of the model on a worker has other paths.
        """
        if not self.built:
            return []
        model = self.keras_model
        trained = {id(v) for v in model.trainable_variables if v.value.is_floating_point()}
        return [(f"{i}.{v.name}", v) for i, v in enumerate(model.variables)
                if (id(v) in trained) == trainable]

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True):
        """The trainable floating-point variables; one placeholder until the model is built."""
        if not self.built:  # as a lazy torch module does: materialised by the dry pass
            yield prefix + "unbuilt", self._placeholder()
            return
        for name, variable in self._variables(True):
            yield prefix + name, variable.value

    def parameters(self, recurse: bool = True):
        """The tensors of :meth:`named_parameters`."""
        for _, value in self.named_parameters():
            yield value

    def named_buffers(self, prefix: str = "", recurse: bool = True,
                      remove_duplicate: bool = True):
        """The other variables (moving statistics, seed state)."""
        for name, variable in self._variables(False):
            yield prefix + name, variable.value

    def buffers(self, recurse: bool = True):
        """The tensors of :meth:`named_buffers`."""
        for _, value in self.named_buffers():
            yield value

    def _placeholder(self):
        found = self.__dict__.get("_unbuilt")
        if found is None:
            found = self.__dict__["_unbuilt"] = torch.nn.parameter.UninitializedParameter()
        return found

    def _apply(self, fn, recurse: bool = True):
        self.keras_model._apply(fn)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, value in (*self.named_parameters(), *self.named_buffers()):
            destination[prefix + name] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        own = dict((*self.named_parameters(), *self.named_buffers()))
        with torch.no_grad():
            for name, value in own.items():
                if prefix + name in state_dict:
                    value.copy_(state_dict[prefix + name])
                elif strict:
                    missing_keys.append(prefix + name)
        if strict:
            unexpected_keys.extend(k for k in state_dict
                                   if k.startswith(prefix) and k[len(prefix):] not in own)

    def extra_repr(self) -> str:
        return f"{type(self.keras_model).__name__} {self.keras_model.name!r}"
