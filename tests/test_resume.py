"""Issue #14: a resume checks what it resumes, a run folder holds one run, printed commands run as printed.

Each test is one of the issue's cases; every one failed on the main branch it was filed against.
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
import signal
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser

from conftest import TINY, compose_config, read_json, run_cli, start_cli
from mlplab.resume import ResumeError, RunFolder, continue_command
from mlplab.config import ConfigError
from mlplab.train import run

QUIET = ["~callbacks.parameter_histograms", "model.hidden_sizes=[16]"]


@pytest.fixture(scope="module")
def finished(data_root, tmp_path_factory) -> Path:
    """A finished 1-epoch run (cosine schedule, optimizer.lr=0.05), trained once for this module's tests."""
    out = tmp_path_factory.mktemp("finished")
    assert run(compose_config(QUIET, out, data_root))["status"] == "ok"
    return out


@pytest.fixture
def run_dir(finished, tmp_path) -> Path:
    """A copy of the finished run, for a test to resume or spoil."""
    return Path(shutil.copytree(finished, tmp_path / "run"))


def last_of(out: Path) -> Path:
    return out / "checkpoints" / "last.ckpt"


# ------------------------------------------------------------------ what ckpt_path points at


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: d / "nonexistent.ckpt", r"ckpt_path=.*nonexistent\.ckpt does not exist"),
    (lambda d: d / "checkpoints", r"ckpt_path=.*checkpoints is a folder, not a checkpoint file. Give the file"),
    (lambda d: _write(d / "notes.txt", b"not a checkpoint\n"), r"notes\.txt is not a readable checkpoint .*truncated or "
                                                                 r"not a checkpoint"),
    (lambda d: _write(d / "cut.ckpt", last_of(d).read_bytes()[:20000]), r"cut\.ckpt is not a readable checkpoint"),
    (lambda d: _save(d / "plain.ckpt", {"state_dict": {}}), r"plain\.ckpt was not written by an mlplab run"),
])
def test_unusable_checkpoints_fail_before_training_naming_the_file(make, message, run_dir, data_root):
    before = (run_dir / "metrics.json").read_bytes()
    with pytest.raises(ResumeError, match=message) as caught:
        run(compose_config([*QUIET, "trainer.max_epochs=2", f"ckpt_path={make(run_dir)}"], run_dir, data_root))
    assert "\n" not in str(caught.value)
    assert (run_dir / "metrics.json").read_bytes() == before  # the folder's record is not made worse


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _save(path: Path, obj: dict) -> Path:
    torch.save(obj, path)
    return path


@pytest.mark.parametrize(("overrides", "message"), [
    (["data=fashion_mnist"], r"data\.dataset: 'mnist' in the checkpoint, 'fashion_mnist' here"),
    (["model.hidden_sizes=[8,8]"], r"model\.hidden_sizes: \[16\] in the checkpoint, \[8, 8\] here"),
    (["activation=tanh", "optimizer.lr=0.1"], r"activation\._target_: .*optimizer\.lr: 0\.05 in the checkpoint, 0\.1 here"),
])
def test_a_checkpoint_of_another_experiment_is_refused_naming_each_key(overrides, message, run_dir, data_root):
    before = (run_dir / "metrics.json").read_bytes()
    with pytest.raises(ResumeError, match=message):
        run(compose_config([*QUIET, "trainer.max_epochs=2", *overrides, f"ckpt_path={last_of(run_dir)}"], run_dir,
                           data_root))
    assert (run_dir / "metrics.json").read_bytes() == before


def test_resuming_a_finished_run_is_refused_and_keeps_its_metrics(run_dir, data_root, tmp_path):
    before = (run_dir / "metrics.json").read_bytes()
    result = run_cli([*TINY, *QUIET, f"ckpt_path={last_of(run_dir)}", f"hydra.run.dir={run_dir}"], data_root,
                     cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: ckpt_path={last_of(run_dir)} has finished 1 epoch, and trainer.max_epochs=1: nothing is left to train")
    assert "Traceback" not in result.stderr and "KeyError" not in result.stderr
    assert (run_dir / "metrics.json").read_bytes() == before


class RecordsLR(L.Callback):
    """The optimiser's LR at the start of each training epoch."""

    def __init__(self) -> None:
        self.lrs: dict[int, float] = {}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.lrs[trainer.current_epoch] = trainer.optimizers[0].param_groups[0]["lr"]


def test_extending_max_epochs_replans_the_cosine_schedule(run_dir, data_root):
    lrs = RecordsLR()
    record = run(compose_config([*QUIET, "trainer.max_epochs=3", f"ckpt_path={last_of(run_dir)}"], run_dir, data_root),
                 extra_callbacks=[lrs])
    assert record["status"] == "ok" and record["epochs"] == 3
    # as a run planned for 3 epochs: lr0 (1 + cos(pi e / 3)) / 2, not 0 (the 1-epoch plan's end) from epoch 1 on
    assert lrs.lrs == pytest.approx({e: 0.05 * (1 + math.cos(math.pi * e / 3)) / 2 for e in (1, 2)})


def test_a_failed_resume_leaves_the_folders_metrics_as_they_were(run_dir, data_root):
    before = (run_dir / "metrics.json").read_bytes()
    with pytest.raises(ConfigError):
        run(compose_config([*QUIET, "trainer.max_epochs=2", "optimizer.lr=-1", f"ckpt_path={last_of(run_dir)}"],
                           run_dir, data_root))
    assert (run_dir / "metrics.json").read_bytes() == before


# ------------------------------------------------------------------ one run per folder


def test_a_checkpoint_from_another_folder_is_refused_into_a_folder_that_holds_a_run(run_dir, finished, data_root,
                                                                                     tmp_path):
    other = Path(shutil.copytree(finished, tmp_path / "other"))
    before = (run_dir / "metrics.json").read_bytes()
    with pytest.raises(ResumeError, match=r"already holds a run .*comes from another folder"):
        run(compose_config([*QUIET, "trainer.max_epochs=2", f"ckpt_path={last_of(other)}"], run_dir, data_root))
    assert (run_dir / "metrics.json").read_bytes() == before


def test_a_second_fresh_run_into_a_used_folder_is_refused_before_hydra_writes_there(run_dir, data_root, tmp_path):
    saved = {p: p.read_bytes() for p in (run_dir / "metrics.json", last_of(run_dir))}
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text("- the first run's\n")
    result = run_cli([*TINY, *QUIET, "seed=9", f"hydra.run.dir={run_dir}"], data_root, cwd=tmp_path)
    assert result.returncode != 0
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {run_dir} already holds a run (checkpoints best.ckpt, last.ckpt; metrics.json: ok")
    assert "hydra.run.dir=<new folder>" in line and "Traceback" not in result.stderr
    assert all(p.read_bytes() == data for p, data in saved.items())
    assert (run_dir / ".hydra" / "overrides.yaml").read_text() == "- the first run's\n"


def test_two_runs_started_at_once_into_one_folder_one_is_refused(data_root, tmp_path):
    out = tmp_path / "shared"
    procs = [start_cli([*TINY, *QUIET, f"seed={seed}", f"hydra.run.dir={out}"], data_root, cwd=tmp_path)
             for seed in (1, 2)]
    results = [(p.wait(timeout=240), p.communicate()[1]) for p in procs]
    assert sorted(rc == 0 for rc, _ in results) == [False, True], results
    refused = next(err for rc, err in results if rc != 0).strip().splitlines()[-1]
    assert re_any(refused, rf"^error: {out} is in use by another run \(process \d+\)",
                  rf"^error: {out} already holds a run")
    seed = read_json(out / "metrics.json")["overrides"]
    winner = 1 if "seed=1" in seed else 2
    assert torch.load(last_of(out), weights_only=True)["config"]["seed"] == winner  # one run's files, not a mix
    assert not list((out / "checkpoints").glob("*-v1.ckpt"))


def re_any(text: str, *patterns: str) -> bool:
    import re
    return any(re.search(p, text) for p in patterns)


def test_the_claim_on_a_folder_is_held_until_released(tmp_path):
    first = RunFolder.claim(tmp_path, None)
    with pytest.raises(ResumeError, match=rf"{tmp_path} is in use by another run \(process {os.getpid()}\)"):
        RunFolder.claim(tmp_path, None)
    first.release()
    RunFolder.claim(tmp_path, None).release()  # an empty folder is free again


# ------------------------------------------------------------------ printed commands


@pytest.mark.parametrize("folder", ["plain", "0_activation=relu,seed=1", "with space", "q'uote\"s", "[brackets]"])
def test_the_continue_command_reads_back_as_the_same_paths(folder, tmp_path):
    out = tmp_path / folder
    command = continue_command(["seed=1", "model.hidden_sizes=[16]", f"ckpt_path={out}/old.ckpt"], out / "last.ckpt",
                               out)
    argv = shlex.split(command)
    assert argv[:2] == ["python", "train.py"]
    parsed = OverridesParser.create().parse_overrides(argv[2:])
    values = {o.key_or_group: o.value() for o in parsed}
    assert values["ckpt_path"] == str(out / "last.ckpt") and values["hydra.run.dir"] == str(out)
    assert [o.key_or_group for o in parsed].count("ckpt_path") == 1  # a second interruption does not repeat it
    assert values["model.hidden_sizes"] == [16]


def test_an_interrupted_sweep_reports_the_jobs_that_ran_and_its_resume_command_runs(data_root, tmp_path):
    sweep = tmp_path / "sweep"
    # job 0: 2 epochs, finishes; job 1: 100 epochs, interrupted after its first. The job dirs hold '=' and ','.
    # (100: tiny epochs take tens of ms, and a test process on a loaded machine was seen to notice job 1's first
    # checkpoint only after 30 of them had run; the resume command below then runs the rest.)
    args = ["-m", *TINY, *QUIET,
            "trainer.max_epochs=2,100", "seed=4", f"hydra.sweep.dir={sweep}",
            "hydra.sweep.subdir='${hydra.job.num}_epochs=${trainer.max_epochs},seed=4'"]
    proc = start_cli(args, data_root, cwd=tmp_path)
    job1 = sweep / "1_epochs=100,seed=4"
    deadline = time.time() + 180
    while not ((job1 / "history.json").exists() and last_of(job1).exists()) and time.time() < deadline:
        assert proc.poll() is None, f"the sweep ended before the signal: {proc.communicate()[1]}"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert read_json(job1 / "metrics.json")["status"] == "interrupted", "job 1 finished before the signal"
    assert proc.returncode != 0
    assert read_json(sweep / "0_epochs=2,seed=4" / "metrics.json")["status"] == "ok"
    summary = (sweep / "summary.md").read_text()
    assert f"2 jobs under {sweep}: 1 ok, 1 interrupted" in summary

    lines = stderr.splitlines()
    command = lines[lines.index(next(l for l in lines if l.endswith("Continue with:"))) + 1].strip()
    argv = shlex.split(command)
    assert argv[:2] == ["python", "train.py"]
    result = run_cli(argv[2:], data_root, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    record = read_json(job1 / "metrics.json")
    assert record["status"] == "ok" and record["epochs"] == 100
