"""Study reports: tables, figures and a self-contained HTML page from a trials table."""

from malloc_ray.report.build import Report, build_report

__all__ = ["Report", "build_report"]
