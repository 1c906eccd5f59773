"""The clinical service: a FastAPI app serving one trained run (``medlens serve RUN``), its audit trail and keys.

The web app (needs FastAPI):

- :mod:`medlens.service.app`: :func:`~medlens.service.app.create_app`, which wires the parts below together.
- :mod:`medlens.service.routes`: the endpoints, one module per resource (predictions, models, audit, operations).
- :mod:`medlens.service.schemas`: the request / response models that ``/openapi.json`` describes.
- :mod:`medlens.service.deps`: the caller's identity from its API key (401 / 403 / 429), the ready service (503).
- :mod:`medlens.service.uploads`: upload checks (size, format sniffing, decompression bombs) and decoding.
- :mod:`medlens.service.middleware`: request id, request timeout, one audit row per ``/v1`` request, metrics.
- :mod:`medlens.service.context`: the per-request context, :class:`~medlens.service.context.ApiError`.
- :mod:`medlens.service.state`: model, database, batcher and audit writer, opened in the app's lifespan.
- :mod:`medlens.service.batching`: micro-batching of model calls; :mod:`medlens.service.metrics`: Prometheus.

Persistence and access control (SQLAlchemy only, no web framework):

- :mod:`medlens.service.settings`: :class:`ServiceSettings` from ``MEDLENS_*`` variables and a settings file.
- :mod:`medlens.service.db`: engines (SQLite in WAL mode with full sync, or PostgreSQL), schema creation and
  the append-only triggers, write transactions.
- :mod:`medlens.service.audit`: the append-only audit trail (:class:`AuditLog`, group commit).
- :mod:`medlens.service.deid`: de-identification of DICOM fields for the audit trail and the API.
- :mod:`medlens.service.auth`: API keys with roles (:class:`KeyStore`), :func:`role_allows`, :class:`RateLimiter`.
- :mod:`medlens.service.commands`: the ``medlens keys ...`` and ``medlens audit export`` subcommands.

These modules need the ``service`` extra (``pip install 'medlens[service]'``: FastAPI, SQLAlchemy, psycopg).
"""
