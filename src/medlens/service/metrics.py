"""The service's Prometheus metrics (``GET /metrics``, text exposition format).

Each app has its own :class:`ServiceMetrics` with its own registries (``prometheus_client.CollectorRegistry``),
so two apps in one process (tests, a load test beside a server) never mix their numbers.

Who sees what. ``/metrics`` is open (no key) but serves only operational series: counts, latencies and batch
sizes, which say that a request happened and how long it took but nothing about what it answered. The
prediction distribution (``predictions_total{label}``, ``predictions_referred_total`` and the
``prediction_probability`` histogram) is in a second registry, served only with an admin key: scraped before
and after one prediction, its label counter and the histogram's ``_sum`` gave away that prediction's label and
exact probability to anyone who could reach the port. An admin may read every prediction in the audit trail
anyway, so nothing new is disclosed to them (Prometheus: ``authorization: {credentials_file: ...}``).

Exposed series (all prefixed ``medlens_``; the three prediction-distribution ones need an admin key):

- ``http_requests_total{route, method, status}``: requests by route template (``/v1/predictions/{id}``,
  never the raw path, so ids do not explode the series count; ``unmatched`` for unknown paths).
- ``http_request_duration_seconds{route}``: latency histogram, from the first byte handled to the response.
- ``predictions_total{method, label}`` and ``predictions_referred_total{method}``: what was predicted, and how
  many predictions carried ``refer = true``.
- ``prediction_probability{method}``: histogram of the calibrated positive-class probabilities (the
  prediction distribution: a drifting input population shows here first).
- ``batch_size{method}``: images per model call (1 without micro-batching), and
  ``batch_duration_seconds{method}``: how long each model call took.
- ``audit_failures_total``: audit rows that could not be written (such requests get a 503, not an answer).
- ``model_info{model_id, weights_sha256, version}``: always 1; which model this process serves.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE", "ServiceMetrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PROBABILITY_BUCKETS = tuple(round(0.05 * k, 2) for k in range(1, 20)) + (1.0,)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServiceMetrics:
    """The counters and histograms of one service instance."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)  # operational: open
        self.results_registry = CollectorRegistry(auto_describe=True)  # what was predicted: admin key only
        r, results = self.registry, self.results_registry
        self.requests = Counter("medlens_http_requests_total", "HTTP requests by route template, method and status",
                                ("route", "method", "status"), registry=r)
        self.latency = Histogram("medlens_http_request_duration_seconds", "HTTP request latency by route template",
                                 ("route",), buckets=LATENCY_BUCKETS, registry=r)
        self.predictions = Counter("medlens_predictions_total", "Predictions returned, by uncertainty method and label",
                                   ("method", "label"), registry=results)
        self.referred = Counter("medlens_predictions_referred_total",
                                "Predictions returned with refer=true (to be read by a radiologist)", ("method",),
                                registry=results)
        self.probability = Histogram("medlens_prediction_probability",
                                     "Calibrated positive-class probability of the predictions returned",
                                     ("method",), buckets=PROBABILITY_BUCKETS, registry=results)
        self.batch_size = Histogram("medlens_batch_size", "Images per model call (1 without micro-batching)",
                                    ("method",), buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("medlens_batch_duration_seconds", "Duration of one model call",
                                       ("method",), buckets=LATENCY_BUCKETS, registry=r)
        self.audit_failures = Counter("medlens_audit_failures_total",
                                      "Audit rows that could not be written (the request was answered 503)",
                                      registry=r)
        self.model_info = Gauge("medlens_model_info", "The model this process serves (value always 1)",
                                ("model_id", "weights_sha256", "version"), registry=r)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, method=method, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def observe_prediction(self, method: str, probability: float, label: str, refer: bool | None) -> None:
        self.predictions.labels(method=method, label=label).inc()
        self.probability.labels(method=method).observe(probability)
        if refer:
            self.referred.labels(method=method).inc()
        else:  # make the series exist (at 0) from the first prediction on, so rates can be computed
            self.referred.labels(method=method)

    def observe_batch(self, size: int, method: str, seconds: float) -> None:
        self.batch_size.labels(method=method).observe(size)
        self.batch_seconds.labels(method=method).observe(seconds)

    def set_model(self, model_id: str, weights_sha256: str, version: str) -> None:
        self.model_info.labels(model_id=model_id, weights_sha256=weights_sha256, version=version).set(1)

    def render(self, *, results: bool = False) -> bytes:
        """The metrics in the Prometheus text format: the operational series, and with ``results`` (an admin's
        scrape) the prediction distribution too."""
        text = generate_latest(self.registry)
        return text + generate_latest(self.results_registry) if results else text
