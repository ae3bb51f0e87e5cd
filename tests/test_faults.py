"""Bad input and faults: each ends in a message that names the fix, and no run loses its work."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CONF, ROOT, TINY, cli_env, compose_config, read_json, run_cli, run_script, start_cli
from mlplab.config import ConfigError
from mlplab.train import EXPECTED_ERRORS, run

# ------------------------------------------------------------------ config mistakes


@pytest.mark.parametrize(("overrides", "message"), [
    (["optimizer.lr=0"], r"optimizer\.lr=0 must be a number > 0"),
    (["optimizer.lr=-0.1"], r"optimizer\.lr=-0\.1 must be a number > 0"),
    (["optimizer.lr=abc"], r"optimizer\.lr='abc' must be a number > 0"),
    (["data.batch_size=0"], r"data\.batch_size=0 must be a positive integer"),
    (["data.batch_size=abc"], r"data\.batch_size='abc' must be a positive integer"),
    (["data.steps_per_call=0"], r"data\.steps_per_call=0 must be a positive integer"),
    (["data.batch_size=60000"], r"data\.batch_size=60000 is larger than the 59800 training images left after "
                                r"val_size=200"),
    (["model.hidden_sizes=[0]"], r"model\.hidden_sizes=\[0\] must be a list of positive integers"),
    (["model.hidden_sizes=[200,-1]"], r"model\.hidden_sizes=\[200, -1\] must be a list of positive integers"),
    (["model.dropout=1.0"], r"model\.dropout=1\.0 must be in \[0, 1\)"),
    (["model.dropout=-0.5"], r"model\.dropout=-0\.5 must be in \[0, 1\)"),
    (["model.init=orthogonal"], r"model\.init='orthogonal' is not one of \['kaiming_normal', 'lecun_normal', 'xavier', 'normal', "
                                r"'default'\]"),
    (["data.val_size=60000"], r"data\.val_size=60000 must be an integer in \[1, 59999\]"),
    (["data.val_size=0"], r"data\.val_size=0 must be an integer in \[1, 59999\]"),
    (["trainer.max_epochs=0"], r"trainer\.max_epochs=0 must be an integer >= 1"),
    (["trainer.gradient_clip_val=-1"], r"trainer\.gradient_clip_val=-1 must be a number > 0, or null"),
    (["data.steps_per_call=2.5"], r"data\.steps_per_call=2\.5 must be a positive integer"),
    (["loss=huber", "loss.delta=0"], r"loss\.delta=0 must be a positive number"),    (["seed=-1"], r"^seed=-1 must be an integer in \[0, 4294967295\]$"),
    (["seed=abc"], r"^seed='abc' must be an integer in \[0, 4294967295\]$"),
    (["seed=1e20"], r"^seed=1e\+20 must be an integer in \[0, 4294967295\]$"),
    (["torch_threads=0"], r"^torch_threads=0 must be an integer >= 1, or null for torch's default$"),
    (["monitor=val/bogus"], r"^monitor='val/bogus' is not a metric of each epoch: choose one of \['val/acc', "),
    (["scheduler=step", "scheduler.step_size=0"], r"^scheduler\.step_size=0 must be a positive integer$"),
    (["model.hidden_sizes=null"], r"^model\.hidden_sizes=None must be a list of positive integers \(\[\] for none\)$"),
])
def test_out_of_range_values_fail_before_training_naming_key_value_and_rule(overrides, message, data_root, tmp_path):
    with pytest.raises(ConfigError, match=message):
        run(compose_config(overrides, tmp_path, data_root))
    record = read_json(tmp_path / "metrics.json")
    assert record["status"] == "failed" and "ConfigError" in record["error"]
    assert not (tmp_path / "checkpoints").exists()  # failed before any training


def test_val_split_larger_than_the_data_found_is_named(data_root, tmp_path):
    # 1200 synthetic training images: val_size within the 60k bound but not within this folder
    with pytest.raises(Exception, match=r"val_size=5000 leaves no training images: .* holds only 1200"):
        run(compose_config(["data.val_size=5000", "data.batch_size=10"], tmp_path, data_root))


@pytest.mark.parametrize(("args", "expected"), [
    (["activation=foo"], r"Could not find 'activation/foo'.*Available options in 'activation':.*relu.*selu"),
    (["data.bogus=1"], r"Could not override 'data\.bogus'.*To append to your config use \+data\.bogus=1"),
    (["data.batch_size=abc"], r"^error: data\.batch_size='abc' must be a positive integer$"),
    (["optimizer.lr=-1"], r"^error: optimizer\.lr=-1 must be a number > 0$"),
])
def test_cli_mistakes_end_in_one_clear_message_before_training(args, expected, data_root, tmp_path):
    result = run_cli([*TINY, *args, f"hydra.run.dir={tmp_path / 'run'}"], data_root, cwd=tmp_path)
    assert result.returncode != 0
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before any training (no timing: a shared machine)
    assert re_search(expected, result.stderr), result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) < 30


def re_search(pattern: str, text: str) -> bool:
    return re.search(pattern, text, re.M | re.S) is not None


def test_unwritable_output_folder_is_reported_before_any_job(data_root, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for args in ([*TINY, f"hydra.run.dir={blocker / 'run'}"],
                 ["-m", *TINY, "seed=1,2", f"hydra.sweep.dir={blocker / 'sweep'}"]):
        result = run_cli(args, data_root, cwd=tmp_path)
        assert result.returncode != 0
        assert re_search(r"^error: output folder .*a_file/(run|sweep)' is not writable .* hydra\.run\.dir=", result.stderr)
        assert "Traceback" not in result.stderr


# ------------------------------------------------------------------ data problems


def test_missing_data_folder_names_it_and_both_fixes(tmp_path):
    missing = tmp_path / "nowhere"
    result = run_cli([*TINY, f"data.root={missing}", f"hydra.run.dir={tmp_path / 'run'}"], missing, cwd=tmp_path)
    assert result.returncode != 0
    assert re_search(rf"^error: mnist: .*not found in {missing}/MNIST/raw and the download failed", result.stderr)
    assert "DATA_DIR=" in result.stderr and "data.root=" in result.stderr
    assert read_json(tmp_path / "run" / "metrics.json")["status"] == "failed"


def test_corrupt_data_file_is_named(data_root, tmp_path):
    root = tmp_path / "data"
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (data_root / "MNIST" / "raw").iterdir():
        (raw / f.name).write_bytes(f.read_bytes())
    path = raw / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(EXPECTED_ERRORS, match=rf"{path} is 5000 bytes but its header .* truncated or corrupt"):
        run(compose_config([], tmp_path / "run", root))


# ------------------------------------------------------------------ divergence

DIVERGE = ["scheduler=step", "scheduler.step_size=1", "scheduler.gamma=1e7", "trainer.max_epochs=3"]  # epoch 1: lr 5e5


def test_divergence_stops_at_once_names_epoch_and_step_and_keeps_checkpoints(data_root, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli([*TINY, *DIVERGE, f"hydra.run.dir={run_dir}"], data_root, cwd=tmp_path)
    assert result.returncode != 0
    assert re_search(r"^error: training loss is (nan|inf) at epoch 1, step \d+ .*Lower optimizer\.lr", result.stderr)
    record = read_json(run_dir / "metrics.json")
    assert record["status"] == "failed" and record["error"].startswith("DivergenceError")
    assert record["epochs"] == 1  # the epoch before the divergence is recorded
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 0 and all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert not (run_dir / "checkpoints" / "interrupted.ckpt").exists()  # no checkpoint of diverged weights


def test_a_diverging_job_fails_alone_and_the_sweep_exits_non_zero_at_the_end(data_root, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", *TINY, *DIVERGE, "scheduler.gamma=1,1e7", "seed=0", f"hydra.sweep.dir={sweep}"],
                     data_root, cwd=tmp_path)
    assert result.returncode != 0
    statuses = sorted(read_json(job / "metrics.json")["status"] for job in sweep.iterdir() if job.is_dir())
    assert statuses == ["failed", "ok"]
    summary = (sweep / "summary.md").read_text()
    assert "failed" in summary and "DivergenceError" in summary
    assert "1 of 2 jobs failed" in result.stderr


# ------------------------------------------------------------------ interruption and resume

LONG = ["model.hidden_sizes=[16]", "trainer.max_epochs=20", "~callbacks.parameter_histograms",
        "seed=5", "trainer.limit_train_batches=1.0", "trainer.limit_val_batches=1.0"]  # TINY added both limits


@pytest.fixture(scope="module")
def uninterrupted(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """metrics.json of the LONG run, run to its end in one go (in this process: the run, not the CLI, is compared)."""
    return run(compose_config(LONG, tmp_path_factory.mktemp("uninterrupted"), data_root))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_checkpoint_and_metrics_and_resume_matches_uninterrupted_run(sig, data_root, tmp_path,
                                                                                 uninterrupted):
    interrupted = tmp_path / "interrupted"
    proc = start_cli([*TINY, *LONG, f"hydra.run.dir={interrupted}"], data_root, cwd=tmp_path)
    last = interrupted / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not (last.exists() and (interrupted / "history.json").exists()) and time.time() < deadline:
        assert proc.poll() is None, f"the run ended before the signal: {proc.communicate()[1]}"
        time.sleep(0.05)
    time.sleep(0.3)  # a few epochs in
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    record = read_json(interrupted / "metrics.json")
    assert record["status"] == "interrupted", "the run finished before the signal arrived"
    assert 1 <= record["epochs"] < 20 and record["history"]  # partial metrics kept
    assert (interrupted / "checkpoints" / "interrupted.ckpt").is_file()
    assert "Continue with:" in stderr and f"ckpt_path={last} hydra.run.dir={interrupted}" in stderr

    # continued as the message says: in the same dir, which then holds the whole run
    a, b = run(compose_config([*LONG, f"ckpt_path={last}"], interrupted, data_root)), uninterrupted
    assert a["epochs"] == b["epochs"] == 20
    assert [r["val/acc"] for r in a["history"]] == [r["val/acc"] for r in b["history"]]
    assert a["metrics"]["test/acc"] == b["metrics"]["test/acc"]
    assert a["metrics"]["test/loss"] == pytest.approx(b["metrics"]["test/loss"], rel=1e-6)


# ------------------------------------------------------------------ checkpoints


def test_evaluate_script_prints_the_recorded_test_accuracy(data_root, tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli([*TINY, f"hydra.run.dir={run_dir}"], data_root, cwd=tmp_path).returncode == 0
    recorded = read_json(run_dir / "metrics.json")["metrics"]["test/acc"]
    result = run_script(ROOT / "scripts" / "evaluate.py", [run_dir / "checkpoints" / "best.ckpt"], tmp_path,
                        cli_env(data_root), timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"test/acc {recorded:.4f} ")


# ------------------------------------------------------------------ fuzz


def group_choices(group: str) -> list[str]:
    found = sorted(p.stem for p in (CONF / group).rglob("*.yaml"))
    assert found, group
    return found


OVERRIDES = st.fixed_dictionaries({
    "activation": st.sampled_from(group_choices("activation")),
    "loss": st.sampled_from(group_choices("loss")),
    "model": st.sampled_from(group_choices("model")),
    "optimizer": st.sampled_from(group_choices("optimizer")),
    "data": st.sampled_from(group_choices("data")),
}).flatmap(lambda groups: st.lists(st.sampled_from([
    "optimizer.lr=0", "optimizer.lr=1e9", "optimizer.lr=0.01", "data.batch_size=0", "data.batch_size=7",
    "data.batch_size=-3", "model.dropout=0.5", "model.dropout=2", "model.hidden_sizes=[]", "model.hidden_sizes=[0]",
    "model.hidden_sizes=[8,8]", "model.init=xavier", "model.init=bogus", "data.val_size=100", "data.val_size=0",
    "trainer.max_epochs=0", "data.normalize=false", "seed=7",
]), max_size=3, unique=True).map(lambda extra: [f"{k}={v}" for k, v in groups.items()] + extra))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=OVERRIDES)
def test_random_override_combinations_run_or_fail_clearly(overrides, data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz")
    try:
        record = run(compose_config(overrides, out, data_root))
    except EXPECTED_ERRORS as err:
        assert str(err) and "\n" not in str(err)  # one line, naming what to change
        record = read_json(out / "metrics.json")
        assert record["status"] == "failed"
        return
    assert record["status"] == "ok"
