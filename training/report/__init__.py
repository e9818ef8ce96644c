"""The paper-style study report: ``build_report(run_dir) -> Path`` writes report.html and report.md.

``pdl1 study report RUN_DIR`` calls it on a finished run; ``pdl1 study run`` calls it at the end.
"""

from training.report.build import build_report

__all__ = ["build_report"]
