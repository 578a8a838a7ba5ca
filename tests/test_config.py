"""daskdist's settings live under Dask's config and match their schema."""

import dask
import jsonschema
import yaml

import daskdist  # noqa: F401  (registers the defaults)
from daskdist.config import SCHEMA_PATH, defaults


def test_defaults_match_the_schema_and_every_key_is_documented():
    with open(SCHEMA_PATH) as f:
        schema = yaml.safe_load(f)
    jsonschema.validate(defaults(), schema)

    def walk(config, props, path=""):
        for key, value in config.items():
            assert key in props, f"{path}{key} is not in the schema"
            node = props[key]
            if isinstance(value, dict) and "properties" in node:
                walk(value, node["properties"], f"{path}{key}.")
            else:
                assert node.get("description"), f"{path}{key} has no description"

    walk(defaults()["daskdist"], schema["properties"]["daskdist"]["properties"], "daskdist.")


def test_embedded_clusters_apply_their_dask_settings(cluster, session_client):
    def settings():
        return dask.config.get("distributed.worker.profile.enabled")

    assert set(session_client.run(settings).values()) == {False}


def test_settings_are_read_through_dask_config():
    assert dask.config.get("daskdist.driver.lookahead") >= 1
    with dask.config.set({"daskdist.driver.lookahead": 3}):
        assert dask.config.get("daskdist.driver.lookahead") == 3


def test_embedded_clusters_listen_on_the_loopback_interface_only(cluster, session_client):
    import psutil

    assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
    assert session_client.dashboard_link.startswith("http://127.0.0.1:")
    me = psutil.Process()
    listening = [conn.laddr.ip for p in [me, *me.children(recursive=True)]
                 for conn in p.net_connections(kind="inet") if conn.status == psutil.CONN_LISTEN]
    assert listening and set(listening) == {"127.0.0.1"}  # dashboard and workers included
