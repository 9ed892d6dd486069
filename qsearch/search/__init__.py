"""The search stage: the `Problem` a strategy sees, pure strategies, regions, the Optuna study, its frozen result, and the job queue workers share."""

from qsearch._exports import lazy

_EXPORTS = {
    "problem": ("MeasureDrop", "LayerFacts", "Problem", "Dimensions", "FixDecision", "Incumbent",),
    "framing": ("benefit", "problem_for", "graph_edges",),
    "strategy": ("OPTION_SETS", "with_option_set", "choose_fixed", "build_dimensions", "warm_start_plans", "repair", "greedy_revert", "closed_loop",),
    "seeds": ("Start", "Strategy", "neighbours", "knapsacks", "STRATEGIES",),
    "regions": ("drop_int8_regions", "float_regions",),
    "samplers": ("default_sampler",),
    "study": ("default_study_name", "Search",),
    "stopping": ("BudgetPruner", "CeilingStop", "patience_for",),
    "trials": ("TrialResult", "SearchResult",),
    "jobs": ("sqlite_url", "open_storage", "storage_label", "storage_file", "check_study", "check_owner", "open_lock_file", "hold_worker_lock", "still_alone", "StudyQueue",),
}
__all__, __getattr__, __dir__ = lazy(__name__, _EXPORTS)
