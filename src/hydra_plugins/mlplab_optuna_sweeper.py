"""Hydra's Optuna sweeper, made to continue a study that an earlier process started.

hparams_search configs select it as hydra.sweeper._target_ on top of hydra/sweeper=optuna
(hydra-optuna-sweeper); it takes the same keys. Re-running a search into the sweep dir that holds
its study (`hydra.sweep.dir=<that dir>`) adds trials to that study; there the plain sweeper

- numbers the new jobs from 0 again, so their dirs sit among (or, with equal overrides, on top
  of) the first run's; here trial n always runs as job n;
- restarts a seeded sampler's random draws, so TPE's start-up trials repeat the first run's;
  here a continued study's sampler is reseeded at random (a fresh study stays reproducible);
- ends in a ValueError, before the sweep report is written, when no trial of the study has
  completed (it asks the study for its best trial); here that is logged and the report follows.

It also makes the sweep dir before the study is opened, for a storage inside it
(sqlite:///${hydra.sweep.dir}/optuna.db): the launcher makes it only when the first job starts.

The trial numbers match the job numbers while one process at a time runs the study. A plugin
lives under the hydra_plugins namespace (Hydra instantiates no sweeper from elsewhere); Hydra
imports it at every start, so hydra-optuna-sweeper and optuna are imported only when it is used.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class ContinuableOptunaSweeper(Sweeper):
    """hydra_plugins.hydra_optuna_sweeper's OptunaSweeper, continuing a stored study (see above).

    Args:
        **params: the keys of hydra/sweeper=optuna (sampler, direction, storage, study_name, ...).
    """

    def __init__(self, **params: Any) -> None:
        from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

        self.optuna = OptunaSweeper(**params)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.optuna.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        import optuna

        impl = self.optuna.sweeper  # OptunaSweeperImpl: its job_idx numbers the jobs it launches
        stored = impl.storage is not None and impl.study_name is not None

        def trials() -> list[optuna.trial.FrozenTrial]:
            try:
                return optuna.load_study(study_name=impl.study_name, storage=impl.storage).trials
            except KeyError:  # no such study yet: the sweep creates it
                return []

        Path(impl.sweep_dir).mkdir(parents=True, exist_ok=True)
        if stored:
            impl.job_idx = len(trials())  # trials killed mid-run included: each number is used once
            if impl.job_idx and hasattr(impl.sampler, "reseed_rng"):  # GridSampler is still a partial here
                impl.sampler.reseed_rng()
        try:
            return self.optuna.sweep(arguments)
        except ValueError:
            if not stored or any(t.state == optuna.trial.TrialState.COMPLETE for t in trials()):
                raise
            log.error("no trial of study %s has completed, so it has no best parameters", impl.study_name)
