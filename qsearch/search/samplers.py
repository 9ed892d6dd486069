"""Which Optuna sampler a study runs: the one the search space names (`search_space.sampler`),
sized for the trial budget. Optuna's own samplers, never a look-alike."""

from __future__ import annotations

import optuna

from qsearch.errors import QsearchError
from qsearch.workbench import Workbench


def default_sampler(bench: Workbench, budget: int) -> optuna.samplers.BaseSampler:
    """The sampler the search space names (`search_space.sampler`), sized for `budget` trials."""
    space = bench.workload.space
    startup = max(4, min(10, budget // 5))
    if space.sampler == "tpe":
        return optuna.samplers.TPESampler(multivariate=True, seed=space.seed, n_startup_trials=startup)
    if space.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=space.seed, population_size=max(8, min(30, budget // 4)))
    if space.sampler == "random":
        return optuna.samplers.RandomSampler(seed=space.seed)
    if space.sampler == "qmc":
        return optuna.samplers.QMCSampler(seed=space.seed)
    try:
        return optuna.samplers.GPSampler(seed=space.seed, n_startup_trials=startup)
    except Exception as exc:
        raise QsearchError(f"sampler 'gp' is not usable here ({exc}); pick tpe, nsga2, random or qmc") from None
