"""The kit end to end through its real entry points, with tiny settings on the CPU."""

from __future__ import annotations

import re

import pytest
import torch
import yaml

from conftest import CONF, TINY, compose_config, read_json, run_cli
from mlplab.evaluate import evaluate
from mlplab.train import run

GROUPS = ("data", "model", "activation", "loss", "optimizer", "scheduler", "trainer", "callbacks", "logger")
NEEDS_GPU = {"trainer/gpu.yaml", "trainer/ddp.yaml"}  # tested in test_distributed.py
SEPARATE = {"trainer/ddp_cpu.yaml"}  # spawns processes: tested in test_distributed.py


def choices() -> list[str]:
    found = sorted(str(p.relative_to(CONF)) for g in GROUPS for p in (CONF / g).rglob("*.yaml"))
    assert len(found) >= 2 + 2 + 8 + 6 + 3 + 2 + 5 + 2 + 3, found  # every group's files were discovered
    return [c for c in found if c not in NEEDS_GPU | SEPARATE]


@pytest.mark.parametrize("choice", choices())
def test_every_config_choice_trains_and_tests(choice, data_root, tmp_path):
    group, name = choice.removesuffix(".yaml").split("/", 1)
    record = run(compose_config([f"{group}={name}"], tmp_path, data_root))
    assert record["status"] == "ok"
    assert record["choices"] == {} and record["epochs"] == 1  # composed outside Hydra's runtime
    for key in ("train/loss", "train/acc", "val/loss", "val/acc", "val/entropy_bits", "test/loss", "test/acc"):
        assert key in record["metrics"], key
    assert 0 <= record["metrics"]["test/acc"] <= 1
    assert (tmp_path / "metrics.json").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() == (choice != "callbacks/none.yaml")


def test_single_run_leaves_config_events_checkpoints_metrics(data_root, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli([*TINY, "activation=tanh", f"hydra.run.dir={run_dir}"], data_root, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # one closing line: test accuracy, wall time, directory
    assert re.search(rf"^test/acc [01]\.\d{{4}} .* \d+\.\d s  {re.escape(str(run_dir))}$", result.stdout, re.M)
    # train.py freezes the libraries' objects out of garbage collection, and unfreezes them for the exit's last
    # collection: otherwise nanobind (in triton, loaded by torch >= 2.15) lists hundreds of "leaked" objects
    assert "leaked" not in result.stderr, result.stderr[-2000:]
    assert "activation=tanh" in yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "resolved_config.yaml").is_file()
    assert list(run_dir.glob("events.out.tfevents.*"))
    record = read_json(run_dir / "metrics.json")
    assert record["status"] == "ok" and record["choices"]["activation"] == "tanh"
    assert record["environment"]["packages"]["torch"] == torch.__version__.split("+")[0] or \
        record["environment"]["packages"]["torch"].startswith(torch.__version__.split("+")[0])
    for name in ("best", "last"):
        checkpoint = torch.load(run_dir / "checkpoints" / f"{name}.ckpt", weights_only=True)  # no pickled objects
        assert checkpoint["config"]["activation"]["_target_"] == "torch.nn.Tanh"
    # the checkpoint alone re-evaluates to the recorded test accuracy
    assert evaluate(run_dir / "checkpoints" / "best.ckpt")["test/acc"] == pytest.approx(
        record["metrics"]["test/acc"], abs=1e-6)


def test_multirun_leaves_one_job_dir_per_value_and_a_report(data_root, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", *TINY, "activation=relu,selu", f"hydra.sweep.dir={sweep}"], data_root, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2  # job dirs are named <num>_<the job's overrides>
    assert jobs[0].startswith("0_") and "activation=relu" in jobs[0]
    assert jobs[1].startswith("1_") and "activation=selu" in jobs[1]
    for job in jobs:
        assert (sweep / job / ".hydra" / "config.yaml").is_file()
        assert list((sweep / job).glob("events.out.tfevents.*"))
        assert read_json(sweep / job / "metrics.json")["status"] == "ok"
    assert (sweep / "summary.md").is_file() and (sweep / "summary.png").is_file()
    assert not (tmp_path / "outputs").exists()  # nothing strays outside the sweep dir


def test_rerunning_a_saved_config_reproduces_its_metrics_exactly(data_root, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert run_cli([*TINY, "seed=3", f"hydra.run.dir={first}"], data_root, cwd=tmp_path).returncode == 0
    result = run_cli(["--config-path", str(first / ".hydra"), "--config-name", "config", f"hydra.run.dir={second}"],
                     data_root, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    a, b = read_json(first / "metrics.json"), read_json(second / "metrics.json")
    assert a["metrics"] == b["metrics"] and a["history"] == b["history"]
    assert a["environment"]["git"] == b["environment"]["git"]


def test_real_datasets_load_with_the_documented_split(real_data_root, tmp_path):
    for dataset in ("mnist", "fashion_mnist"):
        cfg = compose_config([f"data={dataset}", "data.val_size=5000", "trainer.limit_test_batches=1"],
                             tmp_path / dataset, real_data_root)
        record = run(cfg)
        assert record["status"] == "ok"
    from mlplab.data import ImageClassificationData
    dm = ImageClassificationData(dataset="mnist", root=str(real_data_root))
    dm.setup()
    assert [len(dm.splits[s][0]) for s in ("train", "val", "test")] == [55_000, 5_000, 10_000]
    x = dm.splits["train"][0]
    assert x.shape[1] == 784 and abs(x.mean().item()) < 0.02 and abs(x.std().item() - 1) < 0.02  # standardised
