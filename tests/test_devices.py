"""Devices and precision: each worker's device, the CPU fallback, bf16 and fp16."""

import dask
import numpy as np
import pytest
import torch

from daskdist import DaskNeuralNetClassifier
from daskdist.driver.placement import plan_devices
from daskdist.spec import ModelSpec
from daskdist.state import params_vector
from daskdist.testing import TinyNet, TinySequential
from daskdist.worker.devices import check_precision, device_here
from daskdist.worker.replica import Replica, unscaled_overflowed

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device on this machine (GPU check skipped)")


def _info(host, cuda):
    return {"host": host, "cuda": cuda, "gpu_resource": None, "visible": None}


def test_plan_devices_gives_each_worker_of_a_host_its_own_gpu():
    infos = {"tcp://a:1": _info("a", 2), "tcp://a:2": _info("a", 2),
             "tcp://a:3": _info("a", 2), "tcp://b:1": _info("b", 1), "tcp://c:1": _info("c", 0)}
    placement, fallback = plan_devices("cuda", infos)
    assert placement == {"tcp://a:1": "cuda:0", "tcp://a:2": "cuda:1", "tcp://a:3": "cuda:0",
                         "tcp://b:1": "cuda:0", "tcp://c:1": "cpu"}
    assert fallback == ["tcp://c:1"]
    # an explicit index is kept where the worker has it
    placement, fallback = plan_devices("cuda:1", infos)
    assert placement["tcp://a:2"] == "cuda:1" and placement["tcp://b:1"] == "cpu"
    assert sorted(fallback) == ["tcp://b:1", "tcp://c:1"]
    assert plan_devices("cpu", infos) == ({w: "cpu" for w in infos}, [])


def test_each_worker_says_its_host(client):
    from daskdist.worker.devices import worker_info

    infos = client.run(worker_info)
    assert {i["host"] for i in infos.values()} == {"127.0.0.1"}
    assert {i["cuda"] for i in infos.values()} == {torch.cuda.device_count()}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this process has CUDA")
def test_a_process_without_cuda_trains_on_its_cpu_with_a_warning():
    with pytest.warns(RuntimeWarning, match="not available on this worker; training on its CPU"):
        assert device_here("cuda:3") == "cpu"
    assert device_here("cuda", {None: "cuda:1"}) == "cuda:1"  # (the plan wins)


@pytest.mark.parametrize("value, expected", [(None, None), ("fp32", None), ("bf16", "bf16"),
                                             ("fp16", "fp16")])
def test_check_precision(value, expected):
    assert check_precision(value) == expected


def test_an_unknown_precision_is_refused_before_any_work(client):
    net = DaskNeuralNetClassifier(TinyNet, precision="int8", max_epochs=1, train_split=None,
                                  scheduler_address=client.scheduler.address)
    with pytest.raises(ValueError, match="precision must be None, 'fp32', 'bf16' or 'fp16'"):
        net.fit(np.zeros((10, 20), np.float32), np.arange(10) % 2)


def test_fp16_overflow_lowers_the_scale_and_is_not_a_non_finite_update():
    torch.manual_seed(0)
    rep = Replica(ModelSpec(torch.nn.Linear(4, 4), precision="fp16"))
    scale = rep.scaler.get_scale()
    with torch.autocast("cpu", dtype=torch.float16):
        out = rep.module(torch.randn(8, 4))
    # the scaled gradient reaching the fp16 output, 10 * 65536, overflows float16
    loss = (out.float() * 10).sum()
    rep.scaler.scale(loss).backward()
    assert unscaled_overflowed(rep, loss)
    assert rep.scaler.get_scale() == scale / 2
    rep.module.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        out = rep.module(torch.randn(8, 4))
    loss = out.float().mean()
    rep.scaler.scale(loss).backward()
    assert not unscaled_overflowed(rep, loss)
    assert all(torch.isfinite(p.grad).all() for p in rep.module.parameters())


def _digits_net(client, strategy, module=TinyNet, **kwargs):
    params = dict(max_epochs=4, lr=0.1, batch_size=64, optimizer__momentum=0.9,
                  iterator_train__shuffle=True, strategy=strategy, train_split=None,
                  verbose=0, random_state=0, scheduler_address=client.scheduler.address,
                  module__n_features=64, module__hidden=32, module__n_outputs=10)
    return DaskNeuralNetClassifier(module, **{**params, **kwargs})


@pytest.mark.parametrize("strategy, precision", [
    ("sync", "bf16"), ("sync", "fp16"), ("local_sgd", "fp16"), ("ddp", "bf16"),
    ("ddp", "fp16"), ("pipeline", "bf16"),
])
def test_reduced_precision_trains_digits(client, digits, strategy, precision):
    X, y = digits
    module = TinySequential if strategy == "pipeline" else TinyNet
    full = _digits_net(client, strategy, module).fit(X, y)
    # an overflow of fp16's scaled gradients is the scaler's business, never a failed fit
    with dask.config.set({"daskdist.driver.max-non-finite": 0}):
        net = _digits_net(client, strategy, module, precision=precision).fit(X, y)
    assert net.score(X, y) > 0.9
    assert abs(net.score(X, y) - full.score(X, y)) < 0.05
    # the forward pass ran in reduced precision: the result is close, not equal
    ours, theirs = params_vector(net.module_), params_vector(full.module_)
    assert ours.dtype == np.float32 and not np.array_equal(ours, theirs)
    assert np.abs(ours - theirs).max() < 0.5


def test_pipeline_refuses_fp16(client):
    net = _digits_net(client, "pipeline", TinySequential, precision="fp16")
    with pytest.raises(ValueError, match="does not train in precision='fp16'.*bf16"):
        net.fit(np.zeros((64, 64), np.float32), np.arange(64) % 10)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_on_cpu_workers_falls_back_with_a_warning(client, digits):
    X, y = digits
    net = _digits_net(client, "local_sgd", device="cuda")
    with pytest.warns(UserWarning, match=r"device='cuda': 2 of 2 workers have no CUDA device"):
        net.fit(X, y)
    assert net.score(X, y) > 0.9  # trained on the workers' CPUs, predicted on the client's
    assert next(net.module_.parameters()).device.type == "cpu"


@needs_cuda
def test_sync_on_cuda_equals_sync_on_cpu(client, digits):
    X, y = digits
    cpu = _digits_net(client, "sync", max_epochs=2).fit(X, y)
    gpu = _digits_net(client, "sync", max_epochs=2, device="cuda").fit(X, y)
    np.testing.assert_allclose(params_vector(gpu.module_), params_vector(cpu.module_),
                               atol=1e-4)


@needs_cuda
def test_ddp_on_cuda_trains_with_nccl(client, digits):
    X, y = digits
    net = _digits_net(client, "ddp", device="cuda").fit(X, y)
    assert net.score(X, y) > 0.9


def test_the_criterion_follows_the_loss_to_the_replicas_device():
    # class weights live in the criterion: on a GPU worker they must move there with it
    weight = torch.tensor([1.0, 2.0, 3.0])
    spec = ModelSpec(module=TinyNet(), criterion=torch.nn.NLLLoss(weight=weight))
    y_pred = torch.randn(4, 3).log_softmax(-1)
    y_true = torch.tensor([0, 1, 2, 2])
    expected = torch.nn.functional.nll_loss(y_pred, y_true, weight=weight)
    assert spec.loss(y_pred, y_true) == expected
    # "meta" stands in for a second device on a machine without one
    loss = spec.loss(y_pred.to("meta"), y_true.to("meta"))
    assert loss.device.type == "meta" and spec.criterion.weight.device.type == "meta"


@needs_cuda
def test_class_weights_train_on_cuda(client, digits):
    X, y = digits
    weight = torch.linspace(0.5, 1.5, 10)
    cpu = _digits_net(client, "sync", max_epochs=2, criterion__weight=weight).fit(X, y)
    gpu = _digits_net(client, "sync", max_epochs=2, criterion__weight=weight,
                      device="cuda").fit(X, y)
    np.testing.assert_allclose(params_vector(gpu.module_), params_vector(cpu.module_),
                               atol=1e-4)
