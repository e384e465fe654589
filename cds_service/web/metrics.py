"""GET /metrics and the web tier's measurements: hook latency per service, error responses.

/metrics needs no authentication, like /healthz: it holds counts and durations only, no PHI
(see cds_service.observability.metrics), and a Prometheus scraper has no CDS client JWT.
Where the service faces the internet, the site's proxy keeps /metrics internal, or
CXR_CDS_METRICS=off removes it.
"""

from __future__ import annotations

import time

from flask import Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST

from cds_service.config import Settings
from cds_service.hooks import SERVICES
from cds_service.observability import metrics
from cds_service.results import ModelInfo
from cds_service.storage.ports import Storage

HOOK_ENDPOINT = "cds_hooks.call_service"


def install_metrics(app: Flask, settings: Settings, store: Storage, model: ModelInfo) -> None:
    """Measure every request; serve /metrics unless CXR_CDS_METRICS=off."""

    @app.before_request
    def start_clock() -> None:
        g.cxr_cds_started = time.perf_counter()

    @app.after_request
    def measure(response: Response) -> Response:
        # Label values are the route's endpoint name and the service id the service offers
        # (never the URL: it may carry ids).
        endpoint = request.endpoint or "unmatched"
        started = g.get("cxr_cds_started")
        service_id = (request.view_args or {}).get("service_id")
        if (
            endpoint == HOOK_ENDPOINT
            and request.method == "POST"
            and service_id in SERVICES
            and started is not None
        ):
            metrics.record_hook(service_id, time.perf_counter() - started)
        if response.status_code >= 400:
            metrics.record_http_error(endpoint, response.status_code)
        return response

    if not settings.metrics_enabled:
        return
    queue = metrics.QueueCollector(store.jobs, model, store.errors)

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        return Response(metrics.render([queue]), content_type=CONTENT_TYPE_LATEST)
