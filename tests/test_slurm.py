"""The kit on a real SLURM: sweeps through submitit, DDP through srun, scancel, and the launches that go wrong.

The tests marked slurm need the test cluster of scripts/slurm_cluster.sh (.ci/run starts it:
`sudo scripts/slurm_cluster.sh start`) and skip with the reason where it is not running; the first few read
only SLURM's environment variables and run anywhere. Jobs run this interpreter (its directory goes first
on PATH, which sbatch and srun pass on to the jobs) and this source tree (PYTHONPATH), on the synthetic data.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import lightning as L
import pytest
import torch

from omegaconf import OmegaConf

from conftest import ROOT, TINY, TRAIN_PY, read_json, run_cli
from mlplab.config import threads_for_job
from mlplab.launch import StopRequest
from mlplab.resume import checkpoint_to_resume
from mlplab.slurm import LaunchError, check_launch, job_of_task, time_limit_signal

CLUSTER = ROOT / "scripts" / "slurm_cluster.sh"
SBATCH = ROOT / "scripts" / "train.sbatch"
# Long enough that scancel lands mid-run once the first epoch has been saved: an epoch takes ~0.1 s on a fast
# machine, and seeing the checkpoint, then scancel and the signal's way to the task, took more than the 4
# epochs that 5 left; full epochs so that a resume from last.ckpt can equal the uninterrupted run, and one
# thread wherever it runs (a SLURM task without -c gets one core), so that it equals it bit for bit.
LONG_EPOCHS = 20
LONG = ["model.hidden_sizes=[16]", f"trainer.max_epochs={LONG_EPOCHS}", "~callbacks.parameter_histograms",
        "seed=5", "trainer.limit_train_batches=1.0", "trainer.limit_val_batches=1.0", "torch_threads=1"]


@pytest.fixture(scope="module")
def cluster() -> None:
    try:
        status = subprocess.run([str(CLUSTER), "status"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"no SLURM test cluster: {err}")
    if status.returncode != 0:
        pytest.skip(f"no SLURM test cluster ({status.stdout.strip() or status.stderr.strip()}): "
                    "start one with `sudo scripts/slurm_cluster.sh start`")


@pytest.fixture()
def env(data_root: Path) -> dict[str, str]:
    """The environment jobs are submitted from: this interpreter first on PATH, this tree's sources, the data."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    pythonpath = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PATH": path, "PYTHONPATH": pythonpath, "DATA_DIR": str(data_root), "HYDRA_FULL_ERROR": "0"}


class RecordRank(L.Callback):
    """Writes <dirpath>/rank<r>.json at the start of training: what SLURM gave this rank.

    Args:
        dirpath: where the files go.
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / f"rank{trainer.global_rank}.json").write_text(json.dumps({
            "world_size": trainer.world_size, "slurm_procid": os.environ.get("SLURM_PROCID"),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "threads": torch.get_num_threads()}))


def record_ranks(dirpath: Path) -> list[str]:
    return ["+callbacks.record_rank._target_=test_slurm.RecordRank", f"+callbacks.record_rank.dirpath={dirpath}"]


def ranks(dirpath: Path) -> list[dict]:
    return [read_json(path) for path in sorted(dirpath.glob("rank*.json"))]


def train(args: list[str], env: dict[str, str], launcher: Sequence[str] = (),
          timeout: float = 300) -> subprocess.CompletedProcess:
    """`<launcher> python train.py <args>`, from the repo root."""
    if not launcher:
        return run_cli(args, Path(env["DATA_DIR"]), cwd=ROOT, timeout=timeout, env=env)
    return subprocess.run([*launcher, sys.executable, str(TRAIN_PY), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def wait_for_job(job: str, timeout: float = 240) -> None:
    """Returns once SLURM has forgotten job `job` or lists it as finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip()
        if not state:
            return
        time.sleep(0.2)
    pytest.fail(f"job {job} still in the queue after {timeout} s")


# ------------------------------------------------------------------ SLURM's variables alone

STEP = {"SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "python", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0"}


def set_slurm_variables(monkeypatch: pytest.MonkeyPatch, variables: dict[str, str]) -> None:
    """SLURM's variables as `variables` alone (none of a job this test may run in)."""
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize(("variables", "devices", "message"), [
    ({**STEP, "SLURM_NTASKS": "2"}, 2, r"srun -n/--ntasks=2 .* use --ntasks-per-node=2"),
    ({**STEP, "SLURM_NTASKS": "1", "SLURM_CPUS_PER_TASK": "2"}, 2,
     r"trainer\.devices=2 x trainer\.num_nodes=1 needs 2"),
    ({**STEP, "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2"}, 1,
     r"needs 1 SLURM tasks, .* but this job step has 2"),
    ({"SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "train.sbatch", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2"}, 2,
     r"this job has 2 tasks but train\.py runs once, in the batch script: start it with srun"),
], ids=["srun -n2", "srun -c2", "2 tasks, 1 device", "batch script without srun"])
def test_launches_that_hang_or_run_too_few_ranks_are_refused(monkeypatch, variables, devices, message):
    set_slurm_variables(monkeypatch, variables)
    with pytest.raises(LaunchError, match=message):
        check_launch(OmegaConf.create({"devices": devices, "num_nodes": 1}))


@pytest.mark.parametrize("variables", [
    {},  # no SLURM
    {**STEP, "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2"},  # srun --ntasks-per-node=2, trainer.devices=2
    {"SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "train.sbatch"},  # a batch script without -n: the kit starts the ranks
    {**STEP, "SLURM_JOB_NAME": "interactive", "SLURM_NTASKS": "1"},  # Lightning leaves SLURM alone there
])
def test_launches_that_work_pass(monkeypatch, variables):
    set_slurm_variables(monkeypatch, variables)
    check_launch(OmegaConf.create({"devices": 2, "num_nodes": 1}))


@pytest.mark.parametrize(("variables", "threads"), [
    ({"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "3", "SLURM_CPUS_ON_NODE": "6"}, 3),
    ({**STEP, "SLURM_CPUS_ON_NODE": "4", "SLURM_STEP_TASKS_PER_NODE": "2(x3)"}, 2),  # no -c: the node's share
    ({"SLURM_JOB_ID": "7", "SLURM_CPUS_ON_NODE": "1", "SLURM_TASKS_PER_NODE": "1"}, 1),
], ids=["-c3", "4 cores, 2 tasks", "batch, 1 core"])
def test_torch_threads_follow_the_cores_slurm_gave_the_task(monkeypatch, variables, threads):
    set_slurm_variables(monkeypatch, variables)
    assert threads_for_job(None) == threads
    assert threads_for_job(5) == 5  # torch_threads=5 wins


@pytest.mark.parametrize(("variables", "expected"), [
    ({}, signal.SIGUSR1),  # scripts/train.sbatch's --signal=USR1@120
    ({"SUBMITIT_EXECUTOR": "slurm"}, signal.SIGUSR2),  # submitit's default
    ({"SUBMITIT_EXECUTOR": "slurm", "SUBMITIT_PREEMPT_SIGNAL": "USR1"}, signal.SIGUSR1),
])
def test_the_time_limit_signal_is_the_one_the_job_asked_for(monkeypatch, variables, expected):
    set_slurm_variables(monkeypatch, STEP)
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert time_limit_signal() == expected


def test_a_requeued_job_continues_from_its_last_checkpoint_and_records_its_restarts(monkeypatch, tmp_path):
    last = tmp_path / "checkpoints" / "last.ckpt"
    set_slurm_variables(monkeypatch, {"SLURM_JOB_ID": "7"})
    assert checkpoint_to_resume(tmp_path, None) is None  # a fresh job
    assert job_of_task() == {"job_id": "7", "restarts": 0}
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert checkpoint_to_resume(tmp_path, None) is None  # requeued before its first epoch was saved
    last.parent.mkdir()
    last.write_bytes(b"")
    assert checkpoint_to_resume(tmp_path, None) == str(last)
    assert checkpoint_to_resume(tmp_path, "other.ckpt") == "other.ckpt"  # a ckpt_path given wins
    assert job_of_task() == {"job_id": "7", "restarts": 2}
    set_slurm_variables(monkeypatch, {"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "8", "SLURM_ARRAY_TASK_ID": "1"})
    assert job_of_task() == {"job_id": "8_1", "restarts": 0}
    set_slurm_variables(monkeypatch, {})
    assert job_of_task() is None and checkpoint_to_resume(tmp_path, None) is None


def test_signals_held_while_train_py_starts_reach_the_stop_request_except_the_time_limit(monkeypatch):
    """A Ctrl-C noted before the StopRequest existed stops the run at its first step; an early time-limit
    warning does not (stopping before an epoch leaves nothing to requeue)."""
    monkeypatch.setattr("mlplab.launch.EARLY_SIGNALS", [signal.SIGUSR1])
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGUSR1)}
    try:
        levels = {signal.SIGINT: StopRequest.INTERRUPT, signal.SIGUSR1: StopRequest.TIME_LIMIT}
        assert StopRequest(levels).requested == 0
        monkeypatch.setattr("mlplab.launch.EARLY_SIGNALS", [signal.SIGUSR1, signal.SIGINT])
        assert StopRequest(levels).requested == StopRequest.INTERRUPT
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# ------------------------------------------------------------------ sweeps


@pytest.mark.slurm
def test_gpu_launcher_gives_each_rank_every_gpu_of_its_node(cluster, env, tmp_path):
    """conf/hydra/launcher/submitit_slurm_gpu.yaml with 2 tasks: a DDP sweep job on a node with 2 fake GPUs.

    The job trains on the CPU (trainer=ddp_cpu); what matters is what SLURM shows each rank. With
    gpus_per_node each rank sees both GPUs, as Lightning's DDP needs; gpus_per_task=1 would show each one.
    """
    sweep, seen = tmp_path / "sweep", tmp_path / "ranks"
    result = train(["-m", *TINY, "trainer=ddp_cpu", "hydra/launcher=submitit_slurm_gpu",
                    "hydra.launcher.tasks_per_node=2", "hydra.launcher.gpus_per_node=2",
                    "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=4", "hydra.launcher.timeout_min=10",
                    f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}", *record_ranks(seen)], env)
    assert result.returncode == 0, result.stderr
    assert [read_json(path)["status"] for path in sweep.glob("*/metrics.json")] == ["ok"]  # one job, one record
    assert [(r["world_size"], r["slurm_procid"], r["cuda_visible_devices"]) for r in ranks(seen)] == \
        [(2, "0", "0,1"), (2, "1", "0,1")]


# ------------------------------------------------------------------ srun


@pytest.mark.slurm
def test_srun_ddp_ranks_write_one_record_and_use_their_share_of_the_cores(cluster, env, tmp_path):
    run_dir, seen = tmp_path / "run", tmp_path / "ranks"
    result = train([*TINY, "trainer=ddp_cpu", f"hydra.run.dir={run_dir}", *record_ranks(seen)], env,
                   launcher=["srun", "--ntasks-per-node=2"])
    assert result.returncode == 0, result.stderr
    assert read_json(run_dir / "metrics.json")["status"] == "ok"
    assert result.stdout.count("test/acc") == 1  # rank 0 prints the result
    # no -c: SLURM gives each task one core, and each rank runs one torch thread
    assert [(r["world_size"], r["slurm_procid"], r["threads"]) for r in ranks(seen)] == [(2, "0", 1), (2, "1", 1)]


@pytest.mark.slurm
@pytest.mark.parametrize(("launcher", "message"), [
    (["srun", "-c2"],
     r"^error: trainer\.devices=2 x trainer\.num_nodes=1 needs 2 SLURM tasks, one per device, but this "
                      r"job step has 1: use srun --ntasks-per-node=2"),
    (["sbatch", "--ntasks-per-node=2", "--wait", "--wrap"],
     r"^error: this job has 2 tasks but train\.py runs once, in the batch script: start it with srun"),
], ids=["srun -c2", "sbatch without srun"])  # srun -n2: SLURM's variables alone, above
def test_wrong_launches_fail_at_once_naming_the_fix(cluster, env, tmp_path, launcher, message):
    args = [*TINY, "trainer=ddp_cpu", f"hydra.run.dir={tmp_path / 'run'}"]
    if launcher[0] == "sbatch":  # --wrap takes the command as one string; the job's output goes to a file
        log = tmp_path / "job.out"
        result = subprocess.run([*launcher[:-1], f"--output={log}", launcher[-1],
                                 shlex.join([sys.executable, str(TRAIN_PY), *args])],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        stderr = log.read_text()
    else:
        result = train(args, env, launcher=launcher)
        stderr = result.stderr
    assert result.returncode != 0
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.match(message, errors[0]), stderr  # one line: rank 0's
    assert "Traceback" not in stderr


# ------------------------------------------------------------------ scancel


@pytest.fixture(scope="module")
def uninterrupted(cluster, data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """metrics.json of the LONG run, run to its end in one go."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    env = {**os.environ, "DATA_DIR": str(data_root)}
    result = train([*TINY, *LONG, f"hydra.run.dir={run_dir}"], env)
    assert result.returncode == 0, result.stderr
    return read_json(run_dir / "metrics.json")


@pytest.mark.slurm
@pytest.mark.parametrize("scancel", [["scancel"], ["scancel", "--signal=TERM"]],
                         ids=["scancel", "scancel --signal=TERM"])
def test_cancelled_batch_job_keeps_its_work_and_its_resume_command_finishes_the_run(cluster, env, tmp_path, scancel,
                                                                                     uninterrupted):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = subprocess.run(["sbatch", "--parsable", f"--output={log}", str(SBATCH), *TINY, *LONG,
                          f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    job_id = job.stdout.strip().split(";")[0]
    cancel_after_first_epoch(job_id, run_dir, scancel)
    record = read_json(run_dir / "metrics.json")
    assert record["status"] == "interrupted" and record["error"] == "SIGTERM", "the run finished before scancel"
    assert (run_dir / "checkpoints" / "interrupted.ckpt").is_file()
    output = log.read_text()
    assert output.count("Continue with:") == 1, output
    command = shlex.split(output.split("Continue with:\n", 1)[1].splitlines()[0])
    assert command[:2] == ["python", "train.py"] and command[-1] == f"hydra.run.dir={run_dir}"

    resumed = train(command[2:], env)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(read_json(run_dir / "metrics.json"), uninterrupted)


@pytest.mark.slurm
def test_cancelled_srun_ddp_ranks_stop_together(cluster, env, tmp_path):
    """scancel signals both ranks at once; they agree on the stop at one step instead of deadlocking in
    Lightning's SIGTERM handler until SLURM's SIGKILL."""
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = subprocess.run(["sbatch", "--parsable", "--ntasks-per-node=2", f"--output={log}", str(SBATCH), *TINY, *LONG,
                          "trainer=ddp_cpu", f"hydra.run.dir={run_dir}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    cancel_after_first_epoch(job.stdout.strip().split(";")[0], run_dir, ["scancel"])
    record = read_json(run_dir / "metrics.json")
    assert record["status"] == "interrupted" and record["error"] == "SIGTERM", "the run finished before scancel"
    assert (run_dir / "checkpoints" / "interrupted.ckpt").is_file()
    assert log.read_text().count("Continue with:") == 1  # rank 0 says it


def cancel_after_first_epoch(job_id: str, run_dir: Path, scancel: list[str]) -> None:
    """Cancels the job once it has saved its first epoch, and waits until SLURM has ended it."""
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not (last.exists() and (run_dir / "history.json").exists()):
        state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                               text=True).stdout.strip()
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job_id} is {state or 'gone'} before an epoch"
        assert time.monotonic() < deadline, f"job {job_id} saved no epoch in 240 s"
        time.sleep(0.05)
    subprocess.run([*scancel, job_id], check=True)
    wait_for_job(job_id)


# ------------------------------------------------------------------ time limits and requeue
# SLURM warns a job of its time limit with a signal (scripts/train.sbatch: --signal=USR1@120; submitit:
# USR2, signal_delay_s before it). A real limit's warning comes a minute or more after the start; here it is
# sent with `scancel --signal` once the first epoch is saved, which reaches the job's tasks the same way.


def assert_same_run(a: dict, b: dict) -> None:
    """Two metrics.json records of the LONG run that must have trained alike, bit for bit."""
    assert a["status"] == "ok" and a["epochs"] == b["epochs"] == LONG_EPOCHS
    assert [r["val/acc"] for r in a["history"]] == [r["val/acc"] for r in b["history"]]
    assert [r["val/loss"] for r in a["history"]] == [r["val/loss"] for r in b["history"]]
    assert a["metrics"]["test/loss"] == b["metrics"]["test/loss"]


@pytest.mark.slurm
def test_batch_job_at_its_time_limit_is_requeued_and_continues_in_its_run_dir(cluster, env, tmp_path, uninterrupted):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = subprocess.run(["sbatch", "--parsable", f"--output={log}", str(SBATCH), *TINY, *LONG,
                          f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    job_id = job.stdout.strip().split(";")[0]
    cancel_after_first_epoch(job_id, run_dir, ["scancel", "--signal=USR1"])  # waits for the requeued attempt too
    record = read_json(run_dir / "metrics.json")
    assert record["resumed_from"] == str(run_dir / "checkpoints" / "last.ckpt"), "the run finished before the signal"
    assert record["slurm"] == {"job_id": job_id, "restarts": 1}
    assert_same_run(record, uninterrupted)
    output = log.read_text()  # both attempts' (--open-mode=append)
    assert "SLURM's time limit is near" in output and f"requeued SLURM job {job_id}" in output, output
    assert "SLURM requeued this job (restart 1): continuing from" in output


@pytest.mark.slurm
def test_sweep_job_requeued_at_its_time_limit_continues_and_a_cancelled_one_is_reported(cluster, env, tmp_path,
                                                                                        uninterrupted):
    """A submitit sweep on SLURM (hydra/launcher=slurm), each job a SLURM job. Job 0 gets submitit's time-limit
    signal (USR2): submitit requeues it and it continues in its job dir, ending as the uninterrupted run. Job 1
    is cancelled: the sweep goes on (the plugin's own launcher would stop with UncompletedJobError) and its
    report lists the job as interrupted."""
    sweep = tmp_path / "sweep"
    sweep_process = subprocess.Popen(
        [sys.executable, str(TRAIN_PY), "-m", *TINY, *LONG, "hydra/launcher=slurm", "hydra.launcher.timeout_min=10",
         "seed=5,6", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        signals, jobs = {"0": ["scancel", "--signal=USR2"], "1": ["scancel"]}, {}
        while signals:  # each job as soon as it has saved its first epoch (they may start seconds apart)
            assert sweep_process.poll() is None, sweep_process.communicate()[1]
            assert time.monotonic() < deadline, f"jobs {sorted(signals)} saved no epoch in 240 s"
            jobs = {path.name.rsplit("_", 1)[1]: path.name for path in (sweep / ".submitit").glob("*_*")}  # <array>_<n>
            for n in [n for n in signals if n in jobs and (sweep / n / "checkpoints" / "last.ckpt").exists()]:
                subprocess.run([*signals.pop(n), jobs[n]], check=True)
            time.sleep(0.05)
        stdout, stderr = sweep_process.communicate(timeout=300)
    finally:
        if sweep_process.poll() is None:
            sweep_process.kill()
    assert sweep_process.returncode != 0 and "1 of 2 jobs failed" in stderr  # at the end of the sweep
    assert re.search(r"job #1 \(SLURM job \d+_1\) ended without a result", stdout), stdout  # Hydra logs to stdout
    record = read_json(sweep / "0" / "metrics.json")
    assert record["resumed_from"] == str(sweep / "0" / "checkpoints" / "last.ckpt"), "job 0 finished before USR2"
    assert record["slurm"] == {"job_id": jobs["0"], "restarts": 1}
    assert_same_run(record, uninterrupted)
    assert read_json(sweep / "1" / "metrics.json")["status"] == "interrupted"
    assert f"2 jobs under {sweep}: 1 ok, 1 interrupted." in (sweep / "summary.md").read_text()
