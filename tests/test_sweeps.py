"""Launchers and sweepers through the real entry point: joblib, submitit (local, SLURM), Optuna.

Each sweep runs `python train.py -m ...` in a subprocess with tiny settings on the synthetic
dataset of conftest.py, into tmp_path. The plugins come with `pip install -e ".[sweeps]"`.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import TINY, read_json, run_cli, start_cli

for plugin in ("hydra_plugins.hydra_joblib_launcher", "hydra_plugins.hydra_submitit_launcher",
               "hydra_plugins.hydra_optuna_sweeper"):
    pytest.importorskip(plugin, reason='the sweep plugins are not installed: pip install -e ".[sweeps]"')
import optuna  # noqa: E402  (installed with hydra-optuna-sweeper)

STUDY = "mlp_optuna"  # hydra.sweeper.study_name of conf/hparams_search/mlp_optuna.yaml
# Job dirs named by job number alone: TINY's overrides and the trial's make names past 255 bytes.
SEARCH = ["-m", "hparams_search=mlp_optuna", *TINY, "hydra.sweep.subdir=${hydra.job.num}"]


def job_dirs(sweep: Path) -> list[Path]:
    """The sweep's job dirs (each has .hydra/), in job-number order."""
    return sorted((p for p in sweep.iterdir() if (p / ".hydra").is_dir()), key=lambda p: int(p.name.split("_")[0]))


def load_study(sweep: Path) -> optuna.Study:
    return optuna.load_study(study_name=STUDY, storage=f"sqlite:///{sweep}/optuna.db")


def headline(sweep: Path) -> str:
    """The first sentence of summary.md, e.g. '2 jobs under <dir>: 2 ok'."""
    return (sweep / "summary.md").read_text().split("\n\n")[1].rstrip(".")


def relu_and_tanh_jobs_reported_ok(result: subprocess.CompletedProcess, sweep: Path) -> list[dict]:
    """Checks a finished `activation=relu,tanh` sweep: both jobs ok, in order, and in its report;
    returns their metrics.json records."""
    assert result.returncode == 0, result.stderr
    records = [read_json(job / "metrics.json") for job in job_dirs(sweep)]
    assert [(r["choices"]["activation"], r["status"]) for r in records] == [("relu", "ok"), ("tanh", "ok")]
    assert headline(sweep) == f"2 jobs under {sweep}: 2 ok"
    summary = (sweep / "summary.md").read_text()
    assert "| relu |" in summary and "| tanh |" in summary
    return records


def test_joblib_gives_each_parallel_job_its_share_of_the_cores(data_root, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", *TINY, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "activation=relu,tanh",
                      f"hydra.sweep.dir={sweep}"], data_root, cwd=tmp_path)
    records = relu_and_tanh_jobs_reported_ok(result, sweep)
    assert [r["environment"]["torch_threads"] for r in records] == [max(1, os.cpu_count() // 2)] * 2


def test_submitit_local_runs_each_job_in_a_process_of_its_own(data_root, tmp_path):
    sweep = tmp_path / "sweep"
    # submitit_local starts every job at once: torch_threads gives each its share of the 2 cores
    result = run_cli(["-m", *TINY, "hydra/launcher=submitit_local", "torch_threads=1", "activation=relu,tanh",
                      f"hydra.sweep.dir={sweep}"], data_root, cwd=tmp_path)
    relu_and_tanh_jobs_reported_ok(result, sweep)
    assert len(list(sweep.glob(".submitit/*/*_result.pkl"))) == 2  # each job's return value came back through submitit


def test_submitit_slurm_gpu_config_writes_the_sbatch_script_it_promises(data_root, tmp_path, monkeypatch):
    """No cluster here: a stand-in `sbatch` keeps the script submitit hands it, then refuses it."""
    bin_dir, script = tmp_path / "bin", tmp_path / "submitted.sh"
    bin_dir.mkdir()
    commands = {"sbatch": f'cp "$1" "{script}"\necho "sbatch: error: no cluster in a test" >&2\nexit 1',
                "srun": "exit 1"}  # submitit looks for srun first; the script would call it on the nodes
    for name, body in commands.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    result = run_cli(["-m", *TINY, "hydra/launcher=submitit_slurm_gpu", "hydra.launcher.partition=gpu",
                      "hydra.launcher.timeout_min=30", "activation=relu,tanh", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                     data_root, cwd=tmp_path)
    assert result.returncode != 0 and "no cluster in a test" in result.stderr
    lines = set(script.read_text().splitlines())
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=30", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=2", "#SBATCH --mem=16GB",
                 "#SBATCH --array=0-1%2"):
        assert line in lines, line
    assert not any(line.startswith("#SBATCH --gpus-per-task") for line in lines)  # it binds one GPU to each rank


def test_optuna_search_records_every_trial_in_the_study_and_the_report(data_root, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli([*SEARCH, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}"], data_root, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    trials, jobs = load_study(sweep).trials, job_dirs(sweep)
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3 and len(jobs) == 3
    for trial, job in zip(trials, jobs):  # trial n ran as job n, and its value is the job's final val/acc
        assert job.name == str(trial.number)
        record = read_json(job / "metrics.json")
        assert trial.value == record["metrics"]["val/acc"]
        assert {f"{k}={v}" for k, v in trial.params.items()} <= set(record["overrides"])
        assert set(trial.params) == {"optimizer.lr", "model.hidden_sizes", "activation"}
    assert headline(sweep) == f"3 jobs under {sweep}: 3 ok"
    assert OmegaConf.load(sweep / "optimization_results.yaml").best_value == max(t.value for t in trials)


def test_failed_trials_are_marked_failed_and_the_search_goes_on_to_its_report(data_root, tmp_path):
    sweep = tmp_path / "sweep"
    # optimizer.lr=-1 fails the config check: train.py records the failure and returns None
    result = run_cli([*SEARCH, "hydra.sweeper.n_trials=2", "optimizer.lr=choice(-1.0)", f"hydra.sweep.dir={sweep}"],
                     data_root, cwd=tmp_path)
    assert [t.state for t in load_study(sweep).trials] == [optuna.trial.TrialState.FAIL] * 2
    assert [read_json(job / "metrics.json")["status"] for job in job_dirs(sweep)] == ["failed"] * 2
    # no trial completed, so there is no best one; the report is written all the same, and fails the sweep
    assert "no trial of study mlp_optuna has completed" in result.stdout  # Hydra logs to stdout
    assert headline(sweep) == f"2 jobs under {sweep}: 2 failed"
    assert result.returncode == 1 and "2 of 2 jobs failed" in result.stderr


def test_optuna_study_continues_after_the_sweep_is_killed(data_root, tmp_path):
    sweep = tmp_path / "sweep"
    args = [*SEARCH, f"hydra.sweep.dir={sweep}"]
    first = start_cli([*args, "hydra.sweeper.n_trials=20"], data_root, cwd=tmp_path)  # trials run in its process
    started = [sweep / "0" / "metrics.json", sweep / "1" / ".hydra" / "overrides.yaml"]
    try:  # killed once trial 0 has finished and trial 1 has started
        deadline = time.monotonic() + 120
        while not all(path.exists() for path in started):
            assert first.poll() is None and time.monotonic() < deadline, "the first sweep ended before the kill"
            time.sleep(0.05)
    finally:
        first.kill()
        first.wait()
    before = load_study(sweep).trials
    assert before[0].state == optuna.trial.TrialState.COMPLETE
    first_jobs = {job: (job / "metrics.json").read_bytes() for job in job_dirs(sweep)
                  if (job / "metrics.json").exists()}

    result = run_cli([*args, "hydra.sweeper.n_trials=2"], data_root, cwd=tmp_path)
    after = load_study(sweep).trials
    assert len(after) == len(before) + 2  # the same study, two trials longer
    assert [(t.number, t.params, t.state) for t in after[:len(before)]] == \
        [(t.number, t.params, t.state) for t in before]
    assert [t.state for t in after[len(before):]] == [optuna.trial.TrialState.COMPLETE] * 2
    assert after[len(before)].params != after[0].params  # the reseeded sampler does not replay the first run
    # trial n ran as job n in either run: the continued run's job dirs sit beside the first run's,
    # which are untouched
    assert [job.name for job in job_dirs(sweep)] == [str(t.number) for t in after]
    assert all((job / "metrics.json").read_bytes() == data for job, data in first_jobs.items())
    # the report covers both runs; the trial killed mid-run is "missing" and fails the sweep
    missing = len(before) - len(first_jobs)
    ok = len(after) - missing
    assert headline(sweep) == f"{len(after)} jobs under {sweep}: {ok} ok" + (f", {missing} missing" if missing else "")
    assert result.returncode == (1 if missing else 0), result.stderr


def test_sweeps_started_at_the_same_moment_get_dirs_of_their_own(data_root, tmp_path):
    # torch_threads=1: two 2-thread processes on 2 cores run many times slower than one after the other
    sweeps = [start_cli(["-m", *TINY, "torch_threads=1", f"activation={name}"], data_root, cwd=tmp_path)
              for name in ("relu", "tanh")]
    for sweep in sweeps:
        _, stderr = sweep.communicate(timeout=240)
        assert sweep.returncode == 0, stderr
    dirs = sorted((tmp_path / "outputs" / "multirun").iterdir())
    assert len(dirs) == 2
    assert sorted(read_json(job / "metrics.json")["choices"]["activation"] for d in dirs for job in job_dirs(d)) == \
        ["relu", "tanh"]
    assert all((d / "summary.md").is_file() for d in dirs)
