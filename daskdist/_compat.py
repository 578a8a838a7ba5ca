"""The one place daskdist relies on ``distributed`` internals.

``tests/test_dashboard.py`` checks each of them against the installed
version, so that a change in ``distributed`` fails there, loudly, rather than
somewhere in a fit.
"""

from __future__ import annotations

__all__ = ["add_http_routes", "http_routes_added"]


def add_http_routes(scheduler, routes) -> None:
    """Add ``(pattern, handler, kwargs)`` routes to a running scheduler's web server.

    ``routes`` are given like the modules named in the documented setting
    ``distributed.scheduler.http.routes`` give theirs; handlers that take
    ``dask_server`` get the scheduler, and patterns get the scheduler's
    ``http_prefix``. Uses the scheduler's ``http_application`` (a tornado
    application), which the documented setting fills at start-up only. Routes
    already added (by that setting, or by an earlier call) are left alone.
    """
    import inspect

    application = getattr(scheduler, "http_application", None)
    if application is None:
        raise RuntimeError("The scheduler has no web server (distributed internals changed, "
                           "or it was started without one): the /daskdist page is not served.")
    if http_routes_added(scheduler, routes):
        return
    prefix = "/" + (getattr(scheduler, "http_prefix", None) or "").strip("/")
    handlers = []
    for pattern, handler, kwargs in routes:
        if "dask_server" in inspect.signature(handler.initialize).parameters:
            kwargs = {**kwargs, "dask_server": scheduler}
        handlers.append((prefix.rstrip("/") + "/" + pattern.lstrip("/"), handler, kwargs))
    application.add_handlers(r".*", handlers)


def http_routes_added(scheduler, routes) -> bool:
    """Whether the scheduler's web server already serves the first of ``routes``."""
    from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine

    application = scheduler.http_application
    prefix = "/" + (getattr(scheduler, "http_prefix", None) or "").strip("/")
    path = prefix.rstrip("/") + "/" + routes[0][0].lstrip("/")
    request = HTTPServerRequest(start_line=RequestStartLine("GET", path, "HTTP/1.1"),
                                headers=HTTPHeaders({"Host": "localhost"}))
    handler = application.find_handler(request)
    return handler.handler_class is routes[0][1]
