"""Ctrl-C during a fit on an embedded cluster."""

import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest
import torch
from skorch.callbacks import Callback

from daskdist import DaskNeuralNetClassifier
from daskdist.state import params_vector
from daskdist.testing import TinyNet, make_classification


@pytest.fixture(autouse=True)
def python_sigint_handler():
    """Python's own SIGINT handler, whatever this process inherited.

    A shell starts background jobs with SIGINT ignored, and these tests press
    Ctrl-C with ``os.kill``.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


class InterruptSoon(Callback):
    """Send this process SIGINT shortly after the first epoch, mid-way through the second."""

    def on_epoch_end(self, net, **kwargs):
        if len(net.history) == 1:
            self.timer = threading.Timer(1.0, self._interrupt)
            self.timer.start()

    def _interrupt(self):
        self.sent_at = time.perf_counter()
        os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("strategy", ["local_sgd", "sync"])
def test_ctrl_c_keeps_the_last_round_and_closes_the_embedded_cluster(strategy):
    X, y = make_classification(4000)
    net = DaskNeuralNetClassifier(TinyNet, max_epochs=50, lr=0.1, batch_size=16, verbose=0,
                                  strategy=strategy, sync_every=1, random_state=0,
                                  callbacks=[("interrupt", InterruptSoon())])
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    t0 = time.perf_counter()
    net.fit(X, y)  # skorch's convention: an interrupted fit returns normally
    assert time.perf_counter() - t0 < 90
    # as in skorch, the interrupted epoch has a history row but no epoch scores
    assert len(net.history) == 2 and "train_loss" not in net.history[-1]
    state = net._training_state_
    assert state.round > net.history[0, "rounds"]  # ... but its finished rounds are kept
    np.testing.assert_array_equal(params_vector(net.module_), state.params)
    assert len(net.rounds_) == state.round
    time.sleep(1.0)
    # multiprocessing's resource tracker outlives every cluster by design
    left = {p.pid for p in psutil.Process().children(recursive=True)
            if "resource_tracker" not in " ".join(p.cmdline())} - children_before
    info = [(p.pid, p.name(), p.cmdline()[:4]) for p in map(psutil.Process, left)]
    assert not left, f"the embedded cluster's processes are still running: {info}"


@pytest.mark.timeout(120)
def test_ctrl_c_under_ddp_stops_the_ranks_on_the_workers(client):
    X, y = make_classification(16000)
    interrupt = InterruptSoon()
    net = DaskNeuralNetClassifier(TinyNet, max_epochs=3, batch_size=8, lr=0.1, verbose=0,
                                  strategy="ddp", random_state=0, train_split=None,
                                  scheduler_address=client.scheduler.address,
                                  callbacks=[("interrupt", interrupt)])
    net.fit(X, y)
    stopped_after = time.perf_counter() - interrupt.sent_at
    assert len(net.history) == 2 and "train_loss" not in net.history[-1]
    # Ctrl-C came a second into the second epoch. The ranks gave the epoch up together
    # within a few steps, so the fit (which reads the last state back from the workers)
    # returned long before the epoch would have ended.
    epoch = net.history[0, "dur"]
    assert stopped_after < epoch / 3, (stopped_after, epoch)
    np.testing.assert_array_equal(params_vector(net.module_), net._training_state_.params)


@pytest.mark.timeout(120)
def test_ctrl_c_under_pipeline_lets_go_of_the_stages(client):
    from daskdist.testing import TinySequential

    X, y = make_classification(12000)
    interrupt = InterruptSoon()
    net = DaskNeuralNetClassifier(TinySequential, max_epochs=3, batch_size=64, lr=0.1,
                                  verbose=0, strategy="pipeline", random_state=0,
                                  train_split=None, scheduler_address=client.scheduler.address,
                                  callbacks=[("interrupt", interrupt)])
    net.fit(X, y)
    stopped_after = time.perf_counter() - interrupt.sent_at
    assert len(net.history) == 2 and "train_loss" not in net.history[-1]
    # the steps in flight were let go of; the estimator keeps the first epoch's state
    epoch = net.history[0, "dur"]
    assert stopped_after < epoch / 3, (stopped_after, epoch)
    np.testing.assert_array_equal(params_vector(net.module_), net._training_state_.params)
    assert net._training_state_.round == len(net.rounds_)

    def busy(dask_scheduler=None):
        return [str(k) for k, ts in dask_scheduler.tasks.items() if "daskdist-stage" in str(k)]

    deadline = time.monotonic() + 10
    while client.run_on_scheduler(busy) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.run_on_scheduler(busy) == []
    assert set(client.run(_stages_held).values()) == {0}


class _SlowFinalizer:
    def __del__(self):
        time.sleep(2.0)  # Ctrl-C lands here, where Python ignores exceptions


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_ctrl_c_swallowed_by_a_finalizer_is_raised_at_the_next_safe_point():
    from daskdist import interrupt

    with interrupt.guard():
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
        obj = _SlowFinalizer()
        del obj  # the KeyboardInterrupt raised in __del__ is printed and dropped ...
        with pytest.raises(KeyboardInterrupt):
            interrupt.raise_if_interrupted()  # ... and raised here instead
        interrupt.raise_if_interrupted()  # once
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


class _InterruptedFinalizer:
    def __del__(self):
        signal.raise_signal(signal.SIGINT)  # Ctrl-C lands here, where Python ignores it


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_the_driver_raises_a_swallowed_ctrl_c_however_its_waits_end(client):
    """Waits that end before the driver's poll interval are safe points too.

    Pipeline and ddp epochs wait a second at a time, and a pipeline's steps
    finish within milliseconds: an interrupt that a future's finalizer
    swallowed has to surface from those waits as well.
    """
    from daskdist import interrupt
    from daskdist.driver.trainer import Trainer
    from daskdist.spec import ModelSpec
    from daskdist.strategies import LocalSGD

    trainer = Trainer(client, ModelSpec(module=TinyNet(), optimizer=torch.optim.SGD),
                      LocalSGD(), batch_size=8)
    done = client.submit(int, 1, pure=False)
    done.result()
    pending = client.submit(time.sleep, 5, pure=False)
    try:
        with interrupt.guard():
            for futures, timeout in (([done], None), ([done], 1.0), ([pending], 0.2)):
                obj = _InterruptedFinalizer()
                del obj  # the interrupt is dropped ...
                with pytest.raises(KeyboardInterrupt):  # ... and the wait raises it
                    trainer.wait(futures, timeout=timeout)
            assert trainer.wait([done], timeout=1.0) == {done}  # raised once only
    finally:
        pending.cancel()


def test_the_guard_leaves_an_application_handler_alone():
    from daskdist import interrupt

    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGINT, mine)
    try:
        with interrupt.guard():
            assert signal.getsignal(signal.SIGINT) is mine
    finally:
        signal.signal(signal.SIGINT, previous)


def _stages_held():
    from daskdist.worker import stage_tasks

    return len(stage_tasks._stages)
