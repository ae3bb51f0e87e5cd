"""The kit end to end through its real entry points, with tiny settings on the CPU."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from conftest import CONF, TINY, compose_config, read_json, run_cli
from mlplab.evaluate import evaluate
from mlplab.train import run

GROUPS = ("data", "model", "activation", "loss", "optimizer", "scheduler", "trainer")
NEEDS_GPU = {"trainer/gpu.yaml", "trainer/ddp.yaml"}  # tested in test_distributed.py
SEPARATE = {"trainer/ddp_cpu.yaml"}  # spawns processes: tested in test_distributed.py


def choices() -> list[str]:
    found = sorted(str(p.relative_to(CONF)) for g in GROUPS for p in (CONF / g).rglob("*.yaml"))
    assert len(found) >= 2 + 2 + 8 + 6 + 3 + 2 + 5, found  # every group's files were discovered
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
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "checkpoints" / "last.ckpt").is_file()


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


def hparams_session(run_dir: Path) -> tuple[dict, dict[str, float]]:
    """(hyperparameters, last value of each metric column) as TensorBoard's HParams tab reads them."""
    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    params = {k: v.string_value or v.number_value or v.bool_value for k, v in start.hparams.items()}
    columns = [m.name.tag for m in experiment.metric_infos]
    return params, {tag: acc.Scalars(tag)[-1].value for tag in columns}


def test_hparams_tab_has_swept_values_and_final_metrics(data_root, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", *TINY, "activation=relu,tanh", "optimizer.lr=0.05", f"hydra.sweep.dir={sweep}"],
                     data_root, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for job, activation in zip(sorted(p for p in sweep.iterdir() if p.is_dir()), ("relu", "tanh")):
        params, metrics = hparams_session(job)
        assert params["choice/activation"] == activation
        assert params["optimizer/lr"] == pytest.approx(0.05)
        assert params["model/hidden_sizes"] == "[200, 200]"  # readable, resolved values
        assert not any("${" in str(v) for v in params.values())
        record = read_json(job / "metrics.json")
        assert set(metrics) == {"val/acc", "test/acc", "test/loss"}
        for tag, value in metrics.items():
            assert value == pytest.approx(record["metrics"][tag], rel=1e-6), tag


def test_rerunning_a_saved_config_reproduces_its_metrics_exactly(data_root, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert run_cli([*TINY, "seed=3", f"hydra.run.dir={first}"], data_root, cwd=tmp_path).returncode == 0
    result = run_cli(["--config-path", str(first / ".hydra"), "--config-name", "config", f"hydra.run.dir={second}"],
                     data_root, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    a, b = read_json(first / "metrics.json"), read_json(second / "metrics.json")
    assert a["metrics"] == b["metrics"] and a["history"] == b["history"]
    assert a["environment"]["git"] == b["environment"]["git"]


class RecordsPaths(L.Callback):
    """Records which paths the module took: (plain loss.backward(), plain optimizer.step())."""

    def __init__(self) -> None:
        self.paths = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.paths = (pl_module.plain_backward, pl_module.plain_step)


class CountsHooks(RecordsPaths):
    """Listens to on_after_backward and on_before_optimizer_step, which puts the module on Lightning's
    manual_backward and optimizer-wrapper paths."""

    def __init__(self) -> None:
        super().__init__()
        self.backward_calls = self.step_calls = 0

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.backward_calls += 1

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        self.step_calls += 1


def test_steps_per_call_and_the_lightning_paths_leave_the_same_weights(data_root, tmp_path):
    """One optimiser step per Lightning batch, three per batch with plain loss.backward() and
    optimizer.step(), and three per batch through manual_backward and Lightning's optimizer wrapper
    (a callback listens to their hooks): the same 2 epochs of 20 steps, the same step count. Every
    step is clipped, which the plain path does itself and the wrapper through its hook."""
    full_epochs = ["trainer.limit_train_batches=1.0", "trainer.max_epochs=2", "seed=4", "gradient_clip_val=0.05"]
    runs = {}
    for name, steps_per_call, hooks in (("one", 1, RecordsPaths()), ("plain", 3, RecordsPaths()),
                                        ("hooked", 3, CountsHooks())):
        cfg = compose_config([*full_epochs, f"data.steps_per_call={steps_per_call}"], tmp_path / name, data_root)
        record = run(cfg, extra_callbacks=[hooks])
        assert record["status"] == "ok"
        checkpoint = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)
        assert checkpoint["global_step"] == 40  # 1000 training images / 50 a step, 2 epochs
        if isinstance(hooks, CountsHooks):
            assert hooks.paths == (False, False)
            assert hooks.backward_calls == hooks.step_calls == 40  # the hooks ran at every step
        else:
            assert hooks.paths == (True, True)
        runs[name] = record, checkpoint["state_dict"]
    (one, one_weights), (plain, plain_weights), (hooked, hooked_weights) = runs.values()
    for weights in (plain_weights, hooked_weights):
        assert weights.keys() == one_weights.keys()
        assert all(torch.equal(weights[k], one_weights[k]) for k in one_weights)
    for record in (plain, hooked):
        for key in ("val/acc", "val/loss", "test/acc", "test/loss", "train/acc"):
            assert record["metrics"][key] == one["metrics"][key], key
        # train/loss sums the same per-sample values, grouped differently
        assert record["metrics"]["train/loss"] == pytest.approx(one["metrics"]["train/loss"], rel=1e-6)


def test_max_steps_counts_optimiser_steps_inside_a_lightning_batch(data_root, tmp_path):
    cfg = compose_config(["trainer.limit_train_batches=1.0", "data.steps_per_call=4", "+trainer.max_steps=6"],
                         tmp_path, data_root)
    assert run(cfg)["status"] == "ok"
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 6  # not 8: the second batch of 4 stops after 2


class GradientNorms(L.Callback):
    """Records the total gradient norm that each optimiser step applies (read after the step, where the
    gradients are the ones it used: clipping happens inside optimizer.step(), after its pre-hooks)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        def record(optimizer, args, kwargs) -> None:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            self.norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

        trainer.optimizers[0].register_step_post_hook(record)


def test_gradient_clip_val_clips_every_step(data_root, tmp_path):
    runs = {}
    for clip in ("null", "0.05"):
        norms = GradientNorms()
        cfg = compose_config(["trainer.limit_train_batches=1.0", f"gradient_clip_val={clip}"], tmp_path / clip,
                             data_root)
        assert run(cfg, extra_callbacks=[norms])["status"] == "ok"
        runs[clip] = norms.norms
    assert len(runs["null"]) == len(runs["0.05"]) == 20  # every step of the epoch
    assert max(runs["null"]) > 0.5  # unclipped, the early steps' norms are far above the limit
    assert max(runs["0.05"]) <= 0.05 * (1 + 1e-5)


def test_real_datasets_load_with_the_documented_split(real_data_root, tmp_path):
    for dataset in ("mnist", "fashion_mnist"):
        cfg = compose_config([f"data={dataset}", "data.val_size=5000", "+trainer.limit_test_batches=1"],
                             tmp_path / dataset, real_data_root)
        record = run(cfg)
        assert record["status"] == "ok"
    from mlplab.data import ImageClassificationData
    dm = ImageClassificationData(dataset="mnist", root=str(real_data_root))
    dm.setup()
    assert [len(dm.splits[s][0]) for s in ("train", "val", "test")] == [55_000, 5_000, 10_000]
    x = dm.splits["train"][0]
    assert x.shape[1] == 784 and abs(x.mean().item()) < 0.02 and abs(x.std().item() - 1) < 0.02  # standardised
