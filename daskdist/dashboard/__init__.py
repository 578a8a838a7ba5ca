"""Watching training on the Dask dashboard: the ``/daskdist`` page and its data.

- :mod:`~daskdist.dashboard.events`: what a fit tells the scheduler (Dask's
  event log, topic ``"daskdist"``);
- :mod:`~daskdist.dashboard.monitor`: the scheduler plugin that keeps the runs;
- :mod:`~daskdist.dashboard.page`: the page and its JSON, on the scheduler's
  own web server.

Clusters daskdist starts serve the page from the start (the setting
``distributed.scheduler.http.routes``); on any other cluster a fit registers
the monitor, which adds the page to the running scheduler. Either way the
scheduler must be able to import daskdist.
"""

from __future__ import annotations

import logging

from .events import TOPIC
from .monitor import TrainingMonitor

__all__ = ["TOPIC", "TrainingMonitor", "install", "page_link"]

logger = logging.getLogger(__name__)

#: The module whose ``routes`` the setting ``distributed.scheduler.http.routes`` names.
ROUTES_MODULE = "daskdist.dashboard.page"


def page_link(client) -> str | None:
    """The address of the ``/daskdist`` page of ``client``'s scheduler (None: no dashboard)."""
    try:
        link = client.dashboard_link
    except Exception:  # no dashboard address known to the client
        return None
    if not link:
        return None
    base = link[:-len("/status")] if link.endswith("/status") else link.rstrip("/")
    return base + "/daskdist"


def install(client) -> str | None:
    """Make sure ``client``'s scheduler keeps daskdist's runs; return the page's address.

    Registers a :class:`TrainingMonitor` once per scheduler. A scheduler that
    cannot import daskdist refuses it: training goes on without the page (a
    warning says so) and ``None`` is returned.
    """
    try:
        client.register_plugin(TrainingMonitor())
    except Exception as error:  # the scheduler's environment lacks daskdist, say
        logger.warning("The /daskdist dashboard page is not available on this cluster "
                       "(%s: %s); install daskdist where the scheduler runs to see it.",
                       type(error).__name__, error)
        return None
    return page_link(client)
