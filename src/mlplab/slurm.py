"""SLURM: what a job gives this process (its tasks, its cores), and the launches that would hang or mislead.

Under `srun` every task runs train.py, and Lightning's SLURMEnvironment reads its rank from SLURM_PROCID
and the world from SLURM_NTASKS; the checks here turn the launch mistakes that otherwise hang at
"MEMBER: 1/2", or train in one process where several were asked for, into one line naming the fix.
scripts/train.sbatch is the batch script these assume; scripts/slurm_cluster.sh starts a test cluster.
"""

from __future__ import annotations

import os
import re
import signal
import warnings
from typing import Any, Callable

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment

# Lightning warns "The `srun` command is available on your system but is not used" on every machine that has
# srun installed, twice a run (each time it looks for SLURM). Outside a SLURM job it is noise; inside one
# (a batch script that runs python without srun) it is the hint that matters, and it stays.
if "SLURM_JOB_ID" not in os.environ:
    warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system but is not used")


class LaunchError(RuntimeError):
    """train.py was started by SLURM in a way that would hang or run fewer processes than asked for."""


def in_step() -> bool:
    """Whether srun started this process as a task of a job step that Lightning takes for its ranks.

    SLURM_STEP_ID is set in a step's tasks and not in the batch script; Lightning ignores SLURM in jobs
    named "bash" or "interactive" (an salloc shell), and so does this.
    """
    return "SLURM_STEP_ID" in os.environ and SLURMEnvironment.detect()


def _tasks(variable: str) -> int:
    """The leading count of a SLURM task list such as SLURM_STEP_TASKS_PER_NODE="2(x3),1"; 1 if unset."""
    match = re.match(r"\d+", os.environ.get(variable, ""))
    return int(match.group()) if match else 1


def cores_of_task() -> int | None:
    """The cores SLURM gave this task: --cpus-per-task, else the job's cores on this node shared by its
    tasks there; None outside a SLURM job.

    Without task/affinity or task/cgroup nothing binds a task to its cores: torch would start one thread per
    core of the node in every task.
    """
    if "SLURM_JOB_ID" not in os.environ:
        return None
    if "SLURM_CPUS_PER_TASK" in os.environ:
        return int(os.environ["SLURM_CPUS_PER_TASK"])
    cores = int(os.environ.get("SLURM_CPUS_ON_NODE", os.cpu_count() or 1))
    tasks = _tasks("SLURM_STEP_TASKS_PER_NODE" if "SLURM_STEP_ID" in os.environ else "SLURM_TASKS_PER_NODE")
    return max(1, cores // tasks)


def check_launch(trainer_cfg: Any) -> None:
    """Raises LaunchError if SLURM started this process in a way that hangs or runs one process too few.

    Args:
        trainer_cfg: the trainer config (cfg.trainer), read for `devices` and `num_nodes`.
    """
    if "SLURM_JOB_ID" not in os.environ or not SLURMEnvironment.detect():
        return
    ntasks = int(os.environ["SLURM_NTASKS"])
    if "SLURM_STEP_ID" not in os.environ and ntasks > 1:  # Lightning would wait for the other tasks forever
        raise LaunchError(f"this job has {ntasks} tasks but train.py runs once, in the batch script: start it with "
                          "srun (`srun python train.py ...`, as scripts/train.sbatch does)")
    if ntasks > 1 and "SLURM_NTASKS_PER_NODE" not in os.environ:  # Lightning refuses it, naming --ntasks
        raise LaunchError(f"srun -n/--ntasks={ntasks} does not tell Lightning the tasks per node: use "
                          f"--ntasks-per-node={ntasks} (and --nodes=N for several nodes) instead")
    devices, nodes = trainer_cfg.devices, trainer_cfg.num_nodes  # devices: -1 or "auto" are Lightning's to count
    if isinstance(devices, int) and devices > 0 and isinstance(nodes, int) and devices * nodes != ntasks:
        raise LaunchError(
            f"trainer.devices={devices} x trainer.num_nodes={nodes} needs {devices * nodes} SLURM tasks, one per "
            f"device, but this job step has {ntasks}: use srun --ntasks-per-node={devices}"
            + (f" --nodes={nodes}" if nodes > 1 else "") + " (-c/--cpus-per-task sets the cores of each task), "
            "or set trainer.devices to the tasks per node")


class SigtermTo(L.Callback):
    """Sends SIGTERM to `handler` alone in a task srun started, where SLURM signals every rank itself.

    Lightning's own SIGTERM handler, which it installs at the start of each fit and test, broadcasts from
    inside the handler: two ranks that each get scancel's SIGTERM at a different point of a step can deadlock
    in it until SLURM's SIGKILL (seen in 2 of 6 tries on 2 CPU ranks). The handler taken here (StopRequest's)
    only notes the request, and the ranks agree on it at the next training step. It is installed again after
    Lightning installs its own: when the sanity check, training and testing start.

    Args:
        handler: a signal handler, `(signum, frame) -> None`.
    """

    def __init__(self, handler: Callable[[int, Any], None]) -> None:
        self.handler = handler
        signal.signal(signal.SIGTERM, handler)

    def _take(self, *args: Any) -> None:
        signal.signal(signal.SIGTERM, self.handler)

    on_sanity_check_start = on_train_start = on_test_start = _take
