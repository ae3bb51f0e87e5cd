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
import subprocess
import warnings
from typing import Any, Callable

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

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


class TimeLimitStop(SIGTERMException):
    """The ranks' agreed stop on SLURM's warning that the job's time limit is near (see time_limit_signal).

    A SIGTERMException, so that Lightning and the kit stop as on SIGTERM: interrupted.ckpt, metrics.json
    "interrupted"; mlplab.launch then requeues the job, which continues from checkpoints/last.ckpt.
    """


def time_limit_signal() -> signal.Signals:
    """The signal SLURM sends this task shortly before its job's time limit.

    In a job submitit started (hydra/launcher=slurm), submitit's: USR2 or $SUBMITIT_PREEMPT_SIGNAL, from the
    `--signal=USR2@<signal_delay_s>` of its batch script. Elsewhere SIGUSR1, from scripts/train.sbatch's
    `--signal=USR1@120` (also Lightning's requeue signal, whose handler the kit's replaces in srun tasks).
    """
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        return signal.Signals["SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").removeprefix("SIG")]
    return signal.SIGUSR1


def restart_count() -> int:
    """How many times SLURM has requeued this job (SLURM_RESTART_COUNT; 0 outside SLURM or before any)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def job_of_task() -> dict[str, Any] | None:
    """{"job_id", "restarts"} of the SLURM job this process runs in, for metrics.json; None outside one."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job_id = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ["SLURM_JOB_ID"]
    return {"job_id": job_id, "restarts": restart_count()}


def requeue(signum: int, submitit_handler: Any) -> str:
    """Puts this job back in SLURM's queue, to continue from its checkpoint; returns what was done, in a line.

    Called by global rank 0 alone, after the run has stopped and recorded. In a job submitit started, its own
    handler of the signal does it (it saves the job's call, requeues within hydra.launcher.max_num_timeout, and
    exits); else `scontrol requeue`, which needs a requeueable job (scripts/train.sbatch: --requeue).

    Args:
        signum: the time-limit signal received.
        submitit_handler: submitit's handler of it, replaced by the kit's while the run trained; None elsewhere.
    """
    job = job_of_task()
    assert job is not None, "requeue() outside a SLURM job"
    if callable(submitit_handler):
        from submitit.core.utils import UncompletedJobError

        try:
            submitit_handler(signum, None)  # requeues, then sys.exit(-1)
        except UncompletedJobError as err:  # "timed-out too many times": hydra.launcher.max_num_timeout
            return f"submitit did not requeue job {job['job_id']}: {err}"
        return f"submitit did not requeue job {job['job_id']}"  # (it returns only where it does nothing)
    result = subprocess.run(["scontrol", "requeue", job["job_id"]], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        return (f"`scontrol requeue {job['job_id']}` failed ({result.stderr.strip() or result.returncode}): submit "
                "with --requeue (scripts/train.sbatch does)")
    return f"requeued SLURM job {job['job_id']}"
