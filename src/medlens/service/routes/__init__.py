"""The endpoints, one module per resource; each has a ``router`` that :func:`medlens.service.app.create_app`
includes: :mod:`.predictions` (``/v1/predictions``), :mod:`.models` (``/v1/models``), :mod:`.audit`
(``/v1/audit``) and :mod:`.operations` (``/healthz``, ``/readyz``, ``/metrics`` and the web viewer at ``/``)."""
