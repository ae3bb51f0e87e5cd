"""DDP through the real entry point, on 2 CPU processes (gloo); GPU runs where a GPU is visible.

A DDP job must leave what a single-process job leaves (one run dir, one metrics.json written by
rank 0, no stray sweep dirs, no job run twice), shard the training data so that every sample is
seen once per epoch across the ranks, and reduce val/test metrics over all of them.
Each DDP run spends a few seconds starting its processes, so the runs are shared where they can be.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy

from conftest import TINY, compose_config, read_json, run_cli, start_cli
from mlplab.evaluate import evaluate, load_checkpoint, predict
from mlplab.launch import ddp_strategy, ranks_to_start
from mlplab.train import run

TESTS = Path(__file__).resolve().parent
DDP = ["trainer=ddp_cpu"]  # after TINY's trainer=cpu: the later choice wins
# Two whole epochs over an odd number of training images (1200 - 199 = 1001): each rank takes
# 1001 // 2 = 500 a epoch and one image is left out. val (199) and test (400) fit in one batch per rank.
FULL = ["trainer.max_epochs=2", "trainer.limit_train_batches=1.0", "data.val_size=199"]
N_TRAIN = 1200 - 199
EVENTS = re.compile(r"events\.out\.tfevents\..*")


class RecordBatches(L.Callback):
    """Writes <dirpath>/rank<r>.json: the training-split indices of each epoch's batches on this rank,
    where its data and batches lived, its torch threads, its step count and a sum per trained parameter.

    Args:
        dirpath: where the files go, outside the run dir.
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.epochs: list[list[int]] = []
        self.batch_devices: set[str] = set()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        x, _ = trainer.datamodule.splits["train"]
        self.index = {row.numpy().tobytes(): i for i, row in enumerate(x.cpu())}  # image -> index in the split
        assert len(self.index) == len(x)  # no two training images are equal

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs.append([])

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        for x, _ in batch:  # data.steps_per_call (x, y) batches
            self.batch_devices.add(str(x.device))
            self.epochs[-1] += [self.index[row.numpy().tobytes()] for row in x.cpu()]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / f"rank{trainer.global_rank}.json").write_text(json.dumps({
            "world_size": trainer.world_size, "root_device": str(trainer.strategy.root_device),
            "data_devices": sorted({str(t.device) for pair in trainer.datamodule.splits.values() for t in pair}),
            "batch_devices": sorted(self.batch_devices), "threads": torch.get_num_threads(), "epochs": self.epochs,
            "weights": [p.detach().double().sum().item() for p in pl_module.parameters()],
            "steps": trainer.global_step,
        }))


def record_batches(dirpath: Path) -> list[str]:
    return ["+callbacks.record_batches._target_=test_distributed.RecordBatches",
            f"+callbacks.record_batches.dirpath={dirpath}"]


def read_ranks(dirpath: Path) -> list[dict]:
    files = sorted(dirpath.glob("rank*.json"))
    assert [f.name for f in files] == [f"rank{r}.json" for r in range(len(files))]
    return [read_json(f) for f in files]


def layout(run_dir: Path) -> list[str]:
    """Every file under run_dir, relative, event files named alike (their names hold time, host and pid)."""
    return sorted(EVENTS.sub("events.out.tfevents.*", p.relative_to(run_dir).as_posix())
                  for p in run_dir.rglob("*") if p.is_file())


def closing_lines(stdout: str) -> list[str]:
    """train.py's one closing line per finished job."""
    return re.findall(r"^test/acc .*$", stdout, re.M)


@pytest.fixture(scope="module")
def runs(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One 2-process DDP run (recording its batches) and the same run in one process, both via train.py."""
    root = tmp_path_factory.mktemp("runs")
    paths = {"ddp": root / "ddp", "single": root / "single", "batches": root / "batches"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))  # for the callback
        result = run_cli([*TINY, *DDP, *FULL, *record_batches(paths["batches"]), f"hydra.run.dir={paths['ddp']}"],
                         data_root, cwd=root)
    assert result.returncode == 0, result.stderr
    assert len(closing_lines(result.stdout)) == 1, result.stdout  # the job ran once
    result = run_cli([*TINY, *FULL, f"hydra.run.dir={paths['single']}"], data_root, cwd=root)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in root.iterdir()) == ["batches", "ddp", "single"]  # nothing else, no outputs/
    return paths


def test_ddp_run_leaves_what_a_single_process_run_leaves(runs):
    ddp, single = runs["ddp"], runs["single"]
    assert layout(ddp) == layout(single)
    assert "metrics.json" in layout(ddp) and "checkpoints/best.ckpt" in layout(ddp)
    assert layout(ddp).count("events.out.tfevents.*") == layout(single).count("events.out.tfevents.*")
    record = read_json(ddp / "metrics.json")
    assert record["status"] == "ok" and record["error"] is None
    assert record["choices"]["trainer"] == "ddp_cpu" and "trainer=ddp_cpu" in record["overrides"]
    assert record["epochs"] == 2 and [row["epoch"] for row in record["history"]] == [0, 1]
    assert record["best_checkpoint"] == str(ddp / "checkpoints" / "best.ckpt")
    assert record["environment"]["torch_threads"] == max(1, (os.cpu_count() or 1) // 2)  # the cores, shared


def test_ddp_test_and_val_metrics_are_reduced_over_all_ranks(runs, data_root):
    ddp = runs["ddp"]
    record = read_json(ddp / "metrics.json")
    # test: rank 0 and rank 1 each tested half of the 400 images; the reduced metrics are those of
    # the same checkpoint evaluated over the whole test set in one process
    single = evaluate(ddp / "checkpoints" / "best.ckpt", data_root=str(data_root))
    assert single["n"] == 400
    assert record["metrics"]["test/acc"] == pytest.approx(single["test/acc"], abs=1e-6)
    assert record["metrics"]["test/loss"] == pytest.approx(single["test/loss"], abs=1e-6)
    # val: the last epoch's val/acc is that of last.ckpt's weights over all 199 val images
    _, model, datamodule = load_checkpoint(ddp / "checkpoints" / "last.ckpt", data_root=str(data_root))
    datamodule.setup("validate")  # load_checkpoint loads the test split only
    _, logits, targets = predict(model, datamodule, "val")
    assert len(targets) == 199
    val_acc = (logits.argmax(-1) == targets).double().mean().item()
    assert record["history"][-1]["val/acc"] == pytest.approx(val_acc, abs=1e-6)
    assert record["metrics"]["val/acc"] == pytest.approx(val_acc, abs=1e-6)


def test_each_training_image_is_seen_once_per_epoch_across_the_ranks(runs):
    ranks = read_ranks(runs["batches"])
    assert len(ranks) == 2 and all(r["world_size"] == 2 for r in ranks)
    for r in ranks:  # each rank's data on its own device, and its share of the cores
        assert r["data_devices"] == r["batch_devices"] == [r["root_device"]]
        assert r["threads"] == max(1, (os.cpu_count() or 1) // 2)
    for epoch in range(2):
        shards = [r["epochs"][epoch] for r in ranks]
        assert [len(s) for s in shards] == [N_TRAIN // 2] * 2  # equal steps on both ranks
        seen = shards[0] + shards[1]
        assert len(set(seen)) == len(seen)  # no image twice, within or across ranks
        assert set(seen) <= set(range(N_TRAIN)) and N_TRAIN - len(seen) == N_TRAIN % 2  # only the remainder left out
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1]  # a new order each epoch


def test_ranks_end_with_the_same_weights_after_every_step_was_synchronised(runs):
    """Several optimiser steps per Lightning batch (data.steps_per_call): each step's gradients are
    all-reduced (manual_backward arms DDP's reducer), so ranks that saw different images agree."""
    ranks = read_ranks(runs["batches"])
    assert ranks[0]["steps"] == ranks[1]["steps"] == 2 * -(-(N_TRAIN // 2) // 50)  # 2 epochs of batch 50
    assert ranks[0]["weights"] == ranks[1]["weights"]


def test_multirun_of_ddp_jobs_leaves_one_dir_per_job_and_a_report(runs, data_root, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", *TINY, *DDP, "activation=relu,tanh", f"hydra.sweep.dir={sweep}"], data_root, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["sweep"]  # no outputs/ from a re-run of the command
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [job.name.split("_", 1)[0] for job in jobs] == ["0", "1"]
    assert sorted(p.name for p in sweep.iterdir() if p.is_file()) == [
        "layers.png", "multirun.yaml", "summary.csv", "summary.md", "summary.png"]
    assert len(closing_lines(result.stdout)) == 2  # each job ran once
    single = layout(runs["single"])
    for job, activation in zip(jobs, ("relu", "tanh")):
        assert list(job.rglob(".hydra")) == [job / ".hydra"]
        assert layout(job) == single
        record = read_json(job / "metrics.json")
        assert record["status"] == "ok" and record["choices"]["activation"] == activation
        assert record["epochs"] == 1
    summary = (sweep / "summary.md").read_text()
    assert f"2 jobs under {sweep}: 2 ok." in summary
    assert "| relu |" in summary and "| tanh |" in summary


# A run long enough to be interrupted mid-way: 8 epochs of 10 small steps per rank.
LONG = ["model.hidden_sizes=[16]", "trainer.max_epochs=8", "~callbacks.parameter_histograms",
        "trainer.limit_train_batches=1.0", "trainer.limit_val_batches=1.0"]


def test_sigterm_stops_every_rank_keeps_trained_weights_and_the_run_resumes(data_root, tmp_path):
    interrupted = tmp_path / "interrupted"
    proc = start_cli([*TINY, *DDP, *LONG, f"hydra.run.dir={interrupted}"], data_root, cwd=tmp_path,
                     start_new_session=True)  # its own process group
    last = interrupted / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not (last.exists() and (interrupted / "history.json").exists()) and time.time() < deadline:
        assert proc.poll() is None, f"the run ended before the signal: {proc.communicate()[1]}"
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)  # to the job's process only, as `kill <pid>` does: it passes it on
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    record = read_json(interrupted / "metrics.json")
    assert record["status"] == "interrupted" and record["error"] == "SIGTERM", "the run finished before the signal"
    assert 1 <= record["epochs"] < 8
    assert "Continue with:" in stderr and f"ckpt_path={last}" in stderr
    checkpoint = torch.load(interrupted / "checkpoints" / "interrupted.ckpt", weights_only=True)
    assert checkpoint["global_step"] >= 10 * record["epochs"]  # the ranks' trained weights, not a fresh model
    deadline = time.time() + 30
    while time.time() < deadline:  # no rank left running
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("processes of the interrupted run are still running")

    # continued as the message says, in the same dir, which then holds the whole run
    resumed = run(compose_config([*DDP, *LONG, f"ckpt_path={last}"], interrupted, data_root))
    assert resumed["status"] == "ok" and resumed["resumed_from"] == str(last)
    assert [row["epoch"] for row in resumed["history"]] == list(range(8))
    assert read_json(interrupted / "metrics.json") == resumed


def test_trainer_configs_compose_to_the_processes_lightning_would_start(data_root, tmp_path, monkeypatch):
    def cfg(*overrides: str):
        return compose_config(list(overrides), tmp_path, data_root)

    ddp = cfg("trainer=ddp").trainer
    assert (ddp.accelerator, ddp.devices, ddp.num_nodes) == ("gpu", -1, 1)
    strategy = instantiate(ddp.strategy)
    assert isinstance(strategy, DDPStrategy) and strategy._start_method == "spawn"
    assert ranks_to_start(cfg("trainer=ddp_cpu")) == 2
    assert ranks_to_start(cfg("trainer=cpu")) == 0
    assert ranks_to_start(cfg("trainer=cpu", "trainer.devices=2")) == 2  # Lightning's "auto" DDP: started here too
    monkeypatch.setenv("LOCAL_RANK", "0")  # inside a rank, or under torchrun: nothing to start
    assert ranks_to_start(cfg("trainer=ddp_cpu")) == 0
    assert ddp_strategy()._start_method == "popen"


# ------------------------------------------------------------------ GPU (skipped without one)

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")


@needs_gpu
def test_gpu_run_keeps_the_data_on_the_gpu(data_root, tmp_path):
    record = run(compose_config(["trainer=gpu", *record_batches(tmp_path / "batches")], tmp_path / "run", data_root))
    assert record["status"] == "ok"
    (rank,) = read_ranks(tmp_path / "batches")
    assert rank["data_devices"] == rank["batch_devices"] == ["cuda:0"]


@needs_gpu
def test_ddp_on_every_gpu_gives_each_rank_its_own(data_root, tmp_path):
    record = run(compose_config(["trainer=ddp", *FULL, *record_batches(tmp_path / "batches")], tmp_path / "run",
                                data_root))
    assert record["status"] == "ok"
    ranks = read_ranks(tmp_path / "batches")
    assert len(ranks) == torch.cuda.device_count()
    for r, rank in enumerate(ranks):
        assert rank["data_devices"] == rank["batch_devices"] == [f"cuda:{r}"]
    seen = [i for rank in ranks for i in rank["epochs"][0]]
    assert len(set(seen)) == len(seen) == N_TRAIN - N_TRAIN % len(ranks)
