"""The clinical service's persistence and access-control layer.

- :mod:`medlens.service.settings`: :class:`ServiceSettings` from ``MEDLENS_*`` variables and a settings file.
- :mod:`medlens.service.audit`: the append-only audit trail (:class:`AuditLog`) and DICOM de-identification.
- :mod:`medlens.service.auth`: API keys with roles (:class:`KeyStore`), :func:`role_allows`, :class:`RateLimiter`.
- :mod:`medlens.service.commands`: the ``medlens keys ...`` and ``medlens audit export`` subcommands.

These modules need the ``service`` extra (``pip install 'medlens[service]'``: SQLAlchemy, psycopg).
"""
