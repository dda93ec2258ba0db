"""Compare methods at several depths on one model: every registered method x every ratio, plus dense.

Each (method, ratio) row loads the model fresh (methods prune in place) and
runs the same job as ``prune`` (:func:`depthprune.job.run_job` with one
:class:`~depthprune.job.DepthStage`) with the bench's one
:class:`~depthprune.evaluate.suite.Evaluation`: perplexity, lm-eval
zero-shot tasks, and optionally speed. Finished rows are cached one JSON file
each under ``OUT/rows/``, so an interrupted or extended run recomputes only
what is missing; a method that fails becomes a row with its error instead of
ending the run.

Calibration and perplexity windows are tokenized once and shared by every
row, so rows differ only in the model.

Reloading beats copying: from the converted safetensors directory a reload
of SmolLM2-135M takes about 0.3 s once the files are in the page cache (the
same as ``copy.deepcopy``), and it never holds a pristine copy beside the
pruned one, which would double memory for large models.

Modules: :mod:`.results` (the rows, the result and its ratios against dense),
:mod:`.render` (the table, the settings line, the plot, the files written),
:mod:`.runner` (:func:`run_bench`: input checks, the rows, their cache).
"""

from .render import results_table, summary_line, write_results
from .results import (
    DENSE,
    REFERENCE_FILE,
    RESULTS_JSON,
    RESULTS_MD,
    RESULTS_PLOT,
    ROWS_DIR,
    BenchResult,
    BenchRow,
)
from .runner import BenchError, check_compensations, check_methods, check_ratios, run_bench, versions

__all__ = [
    "DENSE",
    "REFERENCE_FILE",
    "RESULTS_JSON",
    "RESULTS_MD",
    "RESULTS_PLOT",
    "ROWS_DIR",
    "BenchError",
    "BenchResult",
    "BenchRow",
    "check_compensations",
    "check_methods",
    "check_ratios",
    "run_bench",
    "results_table",
    "summary_line",
    "versions",
    "write_results",
]
