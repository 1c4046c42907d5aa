"""Analysis of a run folder: token difficulty, the paper's figures and findings, the report (DESIGN 4.4).

Everything here is a pure function of the run folder (no model computation):

- ``rundata``: which oracle output is which (budget sweep per context, skip study), router evaluations.
- ``difficulty``: per-token loss all-small / all-big / oracle@k, the gaps, rank statistics.
- ``figures``: the paper's figures as matplotlib figures (Agg), deterministic PNG bytes.
- ``findings``: each finding of the paper checked on the run's numbers with an explicit criterion.
- ``report``: ``write_report(run)`` -> ``RUN/report/index.html``, ``report.md``, ``results.json``.
"""

from .report import write_report

__all__ = ["write_report"]
