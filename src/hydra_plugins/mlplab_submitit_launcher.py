"""Hydra's submitit SLURM launcher, where a job that SLURM ends (scancel, time limit, node failure) fails alone.

hydra-submitit-launcher collects each job's return value with `job.results()`, which raises submitit's
UncompletedJobError for a job that produced no result ("has not produced any output (state: CANCELLED by 0)"):
the sweep then ends there, with the other jobs' results and the sweep report lost. Hydra's launchers have no
way to report one failed job (facebookresearch/hydra#1377), so this one returns it as train.py returns a failed
job, None, and logs SLURM's reason; what the job saved is in its run dir (metrics.json "interrupted" after a
SIGTERM) and the sweep report lists it. Everything else is the plugin's launch(), repeated here because the
`results()` call sits at its end. submitit also needs sacct to see that a job ended without a result: squeue
answers here too (wait_until_out_of_the_queue).
"""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class KeepGoingSlurmLauncher(Launcher):
    """hydra_plugins.hydra_submitit_launcher's SlurmLauncher, going on past jobs that SLURM ended (see above).

    Hydra imports every module of hydra_plugins at each start: the plugin (the `sweeps` extra) is imported
    only when this launcher is used.

    Args:
        **params: the keys of hydra/launcher=submitit_slurm (timeout_min, tasks_per_node, gpus_per_node, ...).
    """

    def __init__(self, **params: Any) -> None:
        from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

        self.slurm = SlurmLauncher(**params)  # what each job runs (its __call__), and the sbatch parameters

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.slurm.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

        params, config = self.slurm.params, self.slurm.config
        assert config is not None
        init_keys = {"submitit_folder", "max_num_timeout"}
        executor = submitit.AutoExecutor(cluster="slurm", folder=params["submitit_folder"],
                                         slurm_max_num_timeout=params["max_num_timeout"])
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{key if key in base else f"slurm_{key}": value
                                      for key, value in params.items() if key not in init_keys})
        log.info(f"Submitit 'slurm' sweep output dir : {config.hydra.sweep.dir}")
        Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        numbers = list(range(initial_job_idx, initial_job_idx + len(job_overrides)))
        for number, overrides in zip(numbers, job_overrides):
            log.info(f"\t#{number} : {' '.join(filter_overrides(overrides))}")
        n = len(job_overrides)
        jobs = executor.map_array(self.slurm, [list(o) for o in job_overrides], ["hydra.sweep.dir"] * n, numbers,
                                  [f"job_id_for_{number}" for number in numbers], [Singleton.get_state()] * n)
        wait_until_out_of_the_queue(jobs)
        returns = []
        for number, overrides, job in zip(numbers, job_overrides, jobs):
            try:
                if not job.paths.result_pickle.exists():
                    raise submitit.core.utils.UncompletedJobError("it left SLURM's queue without one")
                returns.append(job.results()[0])
            except submitit.core.utils.UncompletedJobError as err:  # SLURM ended the job: scancel, time limit, ...
                log.error("job #%d (SLURM job %s) ended without a result: %s", number, job.job_id,
                          str(err).splitlines()[0])
                returns.append(JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED, _return_value=None))
        return returns


def wait_until_out_of_the_queue(jobs: Sequence[Any], grace_s: float = 30) -> None:
    """Waits until each job has written its result, or has left SLURM's queue and `grace_s` have passed.

    submitit learns that a job ended without a result from sacct alone; where SLURM keeps no accounting
    (sacct: "Slurm accounting storage is disabled", as on the cluster of scripts/slurm_cluster.sh) it
    waits for such a job forever. squeue lists the jobs still pending, running or completing; the grace
    lets a result written just before a job's end reach a shared file system.
    """
    left: dict[str, float] = {}  # job id -> when it was first seen out of the queue
    while True:
        now = time.monotonic()
        waiting = [job for job in jobs
                   if not job.paths.result_pickle.exists() and now - left.get(job.job_id, now) < grace_s]
        if not waiting:
            return
        for job in waiting:
            queued = subprocess.run(["squeue", "-h", "-j", job.job_id], capture_output=True, text=True).stdout.strip()
            if not queued:
                left.setdefault(job.job_id, now)
        time.sleep(2)
