"""``address``: no cluster is started; the client connects to a running scheduler."""

from __future__ import annotations

from distributed import Client

from ..errors import display
from ..schema import STRING
from ..tls import security, tls_text
from .base import Backend


class Address(Backend):
    name = "address"
    scaling = None
    tls = "files"

    def extra_properties(self):
        return {"address": {**STRING, "expected": "a scheduler address such as "
                                                  "'tcp://scheduler:8786'"},
                "wait_for_workers": {"type": ["integer", "null"], "minimum": 0,
                                     "expected": "an integer >= 0 or null"}}

    def schema(self):
        schema = super().schema()
        schema["required"].append("address")
        return schema

    def start(self, spec):
        return None

    def client(self, spec, cluster, timeout):
        client_security = security(spec, roles=("client",))
        try:
            return Client(spec.data["address"], security=client_security, timeout=timeout,
                          set_as_default=False)
        except OSError as error:
            raise OSError(f"{display(spec.path)}: cannot reach the scheduler at "
                          f"{spec.data['address']}: {error}") from error

    def expected_workers(self, spec, cluster):
        return spec.data.get("wait_for_workers")

    def describe(self, spec):
        return f"# connects to the running scheduler at\n{spec.data['address']}\n" + (
            f"# security: {tls_text(spec)}" if spec.data.get("tls") else "")

    def fixed_text(self, spec):
        return "none: the workers are the running scheduler's"

    def hint(self, spec, cluster=None):
        return " (are workers connected to this scheduler?)"
