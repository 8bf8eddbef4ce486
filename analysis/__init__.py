"""Reading a study back: MLflow runs into pandas, views, the HTML report, config export, and
the statistics and table of the predictor question (``jepa-study answer``).

The public names are re-exported here lazily (PEP 562): ``study/tracking.py`` imports
``analysis.schema`` on every trial, and that must not pull in pandas, matplotlib or Optuna.

* :mod:`analysis.schema` - the names a study writes to MLflow (writer and readers agree here)
* :mod:`analysis.runs` - ``load_runs``, ``load_history``, ``load_optuna``, ``find_parent``
* :mod:`analysis.views` - ``top_k``, ``compare_by``, ``lambda_buckets``, ``importance``,
  ``optimisation_history`` and the figures
* :mod:`analysis.report` - ``write_report``, ``log_report``
* :mod:`analysis.export` - ``export_configs``, ``load_warm_start``
* :mod:`analysis.stats` - tests over queries, the two-level bootstrap, TOST, families (Holm,
  adjusted intervals, verdicts), pooled endpoints, power
* :mod:`analysis.answer` - the answer's data model, pre-registered comparisons and tables
* :mod:`analysis.answer_render` - its verdicts and findings, as Markdown, HTML and JSON
* :mod:`analysis.registry` - a trained model into MLflow's registry (sentence-transformers)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "runs": ["StudyNotFound", "config_from_params", "find_parent", "load_history",
             "load_optuna", "load_runs", "run_config"],
    "views": ["KNOBS", "Importances", "compare_by", "history_plot", "importance",
              "lambda_buckets", "optimisation_history", "parallel_coordinates_plot",
              "pareto_front", "pareto_plot", "stop_reasons", "top_k"],
    "report": ["Report", "SECTIONS", "log_report", "render_report", "write_report"],
    "export": ["export_configs", "load_warm_start"],
    "stats": ["VERDICTS", "Comparison", "Equivalence", "HypothesisResult", "PooledEndpoint",
              "bootstrap_ci", "compare", "compare_all", "equivalence_test", "holm",
              "paired_t", "per_query_matrix", "permutation_test", "pooled_endpoint",
              "power_from_interval"],
    "answer": ["COMPARISONS", "FAMILIES", "Measured", "Run", "Search", "Side", "Spec", "System",
               "answer_dict", "best_search", "comparisons", "plan_rows", "search_rows",
               "system_rows"],
    "registry": ["log_and_register", "registered_model_name"],
    "answer_render": ["describe_budget", "describe_config", "dumps", "findings", "html_report",
                      "markdown", "verdicts"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"analysis.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
