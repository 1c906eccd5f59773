"""Evaluation reports: a self-contained ``report.html`` plus the figures as PNG files.

The caller (``medlens.evaluate``) writes ``metrics.json``; :func:`write_report` writes everything else.
"""

from __future__ import annotations

from medlens.report.html import METRIC_LABELS, write_report

__all__ = ["METRIC_LABELS", "write_report"]
