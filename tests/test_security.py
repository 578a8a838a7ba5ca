"""Security: TLS clusters refuse strangers; nothing in daskdist unpickles files."""

import pathlib
import re

import dask
import numpy as np
import pytest
from distributed import Client, Security

from daskdist import DaskNeuralNetClassifier
from daskdist.clusters.embedded import embedded_cluster
from daskdist.testing import TinyNet, make_classification


@pytest.fixture(scope="module")
def tls_cluster():
    pytest.importorskip("cryptography")
    with dask.config.set({"daskdist.cluster.tls": True}):
        cluster = embedded_cluster(n_workers=1)
    yield cluster
    cluster.close()


def test_tls_cluster_trains_with_its_certificates(tls_cluster):
    assert tls_cluster.scheduler_address.startswith("tls://127.0.0.1:")
    X, y = make_classification(200)
    with Client(tls_cluster) as client, client.as_current():
        net = DaskNeuralNetClassifier(TinyNet, max_epochs=2, batch_size=32, lr=0.3,
                                      verbose=0, random_state=0).fit(X, y)
    assert net.score(X, y) > 0.5


def test_ddp_is_refused_on_a_tls_cluster_unless_the_user_accepts_plain_traffic(tls_cluster):
    X, y = make_classification(200)
    params = dict(max_epochs=1, batch_size=32, lr=0.3, verbose=0, random_state=0,
                  strategy="ddp", strategy__timeout=30)
    with Client(tls_cluster) as client, client.as_current():
        # refused before any data is sent: the process group is neither encrypted nor
        # authenticated
        with pytest.raises(ValueError, match="neither encrypted nor authenticated"):
            DaskNeuralNetClassifier(TinyNet, **params).fit(X, y)
        assert not client.has_what() or not any(client.has_what().values())
        net = DaskNeuralNetClassifier(TinyNet, strategy__allow_insecure=True,
                                      **params).fit(X, y)
    assert np.isfinite(net.history[-1, "train_loss"])


def test_tls_cluster_refuses_a_client_without_its_certificates(tls_cluster):
    address = tls_cluster.scheduler_address
    with pytest.raises(TypeError, match="TLS expects"):  # no certificates at all
        Client(address, timeout="5s")
    with pytest.raises(OSError, match="certificate"):  # certificates of another authority
        Client(address, security=Security.temporary(), timeout="5s")


#: Calls that would unpickle a file (or bytes read from one).
UNPICKLING = re.compile(r"\b((pickle|cloudpickle|dill)\.loads?|torch\.load|joblib\.load)\s*\(|"
                        r"\b(allow_pickle\s*=\s*True|weights_only\s*=\s*False)")


def test_daskdist_never_unpickles_files():
    package = pathlib.Path(__file__).parents[1] / "daskdist"
    sources = sorted(package.rglob("*.py"))
    assert len(sources) > 10
    offenders = [f"{path.name}:{n}: {line.strip()}"
                 for path in sources
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if UNPICKLING.search(line)]
    assert offenders == []


def test_load_params_reads_safetensors_only(client, tmp_path):
    import numpy as np
    import torch

    from daskdist.state import params_vector

    X, y = make_classification(200)
    net = DaskNeuralNetClassifier(TinyNet, max_epochs=1, batch_size=32, verbose=0,
                                  random_state=0).fit(X, y)
    torch.save(net.module_.state_dict(), tmp_path / "params.pt")
    with pytest.raises(ValueError, match="safetensors files only"):
        net.load_params(f_params=tmp_path / "params.pt")
    net.save_params(f_params=tmp_path / "params.safetensors", use_safetensors=True)
    other = DaskNeuralNetClassifier(TinyNet, verbose=0).initialize()
    other.load_params(f_params=tmp_path / "params.safetensors", use_safetensors=True)
    np.testing.assert_array_equal(params_vector(other.module_), params_vector(net.module_))
