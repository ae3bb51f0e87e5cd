"""The textbook path (data.steps_per_call=1) and the fast path (> 1): the same training, and every
Trainer feature working as Lightning documents it, or on the fast path refused before training."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch

from conftest import compose_config
from mlplab.config import ConfigError
from mlplab.fast_path import PRIVATE_STEP_COUNTER, FastPathClassifier, step_counter
from mlplab.module import Classifier, DivergenceError
from mlplab.train import run

TEXTBOOK = ["data.steps_per_call=1"]
# debug=tiny's data settings, for the tests that choose another debug config in its place
SMALL_DATA = ["data.val_size=200", "data.batch_size=50", "data.eval_batch_size=500", "trainer.enable_progress_bar=false"]


class RecordsModule(L.Callback):
    """Records the module class, and on the fast path which shortcuts it took:
    (plain loss.backward(), plain optimizer.step())."""

    def __init__(self) -> None:
        self.module_type = self.paths = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.module_type = type(pl_module)
        if isinstance(pl_module, FastPathClassifier):
            self.paths = (pl_module.plain_backward, pl_module.plain_step)


class CountsHooks(RecordsModule):
    """Listens to on_after_backward and on_before_optimizer_step, which puts the fast path on Lightning's
    manual_backward and optimizer-wrapper paths."""

    def __init__(self) -> None:
        super().__init__()
        self.backward_calls = self.step_calls = 0

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.backward_calls += 1

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        self.step_calls += 1


def test_the_textbook_and_fast_paths_leave_the_same_weights(data_root, tmp_path):
    """The textbook path (Lightning's automatic optimisation and clipping), the fast path with plain
    loss.backward() and optimizer.step(), and the fast path through manual_backward and Lightning's
    optimizer wrapper (a callback listens to their hooks): the same 2 epochs of 20 steps, the same step
    count, bit-equal weights. Every step is clipped: by the Trainer, by the plain path itself, and by the
    wrapper through its hook."""
    settings = ["trainer.max_epochs=2", "seed=4", "trainer.gradient_clip_val=0.05"]
    runs = {}
    for name, steps_per_call, hooks in (("textbook", 1, RecordsModule()), ("plain", 3, RecordsModule()),
                                        ("hooked", 3, CountsHooks())):
        cfg = compose_config([*settings, f"data.steps_per_call={steps_per_call}"], tmp_path / name, data_root)
        record = run(cfg, extra_callbacks=[hooks])
        assert record["status"] == "ok"
        checkpoint = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)
        assert checkpoint["global_step"] == 40  # 1000 training images / 50 a step, 2 epochs
        if name == "textbook":
            assert hooks.module_type is Classifier
        elif isinstance(hooks, CountsHooks):
            assert hooks.module_type is FastPathClassifier and hooks.paths == (False, False)
            assert hooks.backward_calls == hooks.step_calls == 40  # the hooks ran at every step
        else:
            assert hooks.module_type is FastPathClassifier and hooks.paths == (True, True)
        runs[name] = record, checkpoint["state_dict"]
    (textbook, textbook_weights), (plain, plain_weights), (hooked, hooked_weights) = runs.values()
    for weights in (plain_weights, hooked_weights):
        assert weights.keys() == textbook_weights.keys()
        assert all(torch.equal(weights[k], textbook_weights[k]) for k in textbook_weights)
    for record in (plain, hooked):
        for key in ("val/acc", "val/loss", "test/acc", "test/loss", "train/acc"):
            assert record["metrics"][key] == textbook["metrics"][key], key
        # train/loss sums the same per-sample values, grouped differently
        assert record["metrics"]["train/loss"] == pytest.approx(textbook["metrics"]["train/loss"], rel=1e-6)


def test_limit_train_batches_counts_optimiser_steps_on_the_fast_path(data_root, tmp_path):
    cfg = compose_config(["data.steps_per_call=4", "trainer.limit_train_batches=6", "trainer.max_epochs=2"],
                         tmp_path, data_root)
    assert run(cfg)["status"] == "ok"
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 12  # 6 steps an epoch: a group of 4 and 2 of the next


def test_max_steps_counts_optimiser_steps_inside_a_lightning_batch(data_root, tmp_path):
    cfg = compose_config(["data.steps_per_call=4", "trainer.max_steps=6"], tmp_path, data_root)
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

        optimizer = trainer.optimizers[0]
        getattr(optimizer, "optimizer", optimizer).register_step_post_hook(record)


@pytest.mark.parametrize("steps_per_call", [1, 8])
def test_trainer_gradient_clip_val_clips_every_step(steps_per_call, data_root, tmp_path):
    runs = {}
    for clip in ("null", "0.05"):
        norms = GradientNorms()
        cfg = compose_config([f"data.steps_per_call={steps_per_call}", f"trainer.gradient_clip_val={clip}"],
                             tmp_path / clip, data_root)
        assert run(cfg, extra_callbacks=[norms])["status"] == "ok"
        runs[clip] = norms.norms
    assert len(runs["null"]) == len(runs["0.05"]) == 20  # every step of the epoch
    assert max(runs["null"]) > 0.5  # unclipped, the early steps' norms are far above the limit
    assert max(runs["0.05"]) <= 0.05 * (1 + 1e-5)


class CountsSteps(L.Callback):
    """Counts training batches (Lightning's) and optimiser steps, and validation runs."""

    def __init__(self) -> None:
        self.batches = self.val_runs = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.val_runs += not trainer.sanity_checking


def textbook_run(overrides: list[str], tmp_path, data_root) -> tuple[dict, CountsSteps, torch.Tensor | None]:
    counts = CountsSteps()
    record = run(compose_config([*TEXTBOOK, *overrides], tmp_path, data_root), extra_callbacks=[counts])
    last = tmp_path / "checkpoints" / "last.ckpt"
    step = torch.load(last, weights_only=True)["global_step"] if last.exists() else None
    return record, counts, step


def test_textbook_path_accumulates_gradient_batches(data_root, tmp_path):
    record, counts, step = textbook_run(["trainer.accumulate_grad_batches=2"], tmp_path, data_root)
    assert record["status"] == "ok"
    assert counts.batches == 20 and step == 10  # 20 batches, one optimiser step every 2


def test_textbook_path_limits_train_batches_and_validates_within_the_epoch(data_root, tmp_path):
    record, counts, step = textbook_run(["trainer.limit_train_batches=12", "trainer.val_check_interval=4"],
                                        tmp_path, data_root)
    assert record["status"] == "ok"
    assert counts.batches == step == 12 and counts.val_runs == 3  # after batches 4, 8 and 12


def test_textbook_path_overfits_one_batch(data_root, tmp_path):
    record, counts, step = textbook_run([*SMALL_DATA, "debug=overfit", "trainer.max_epochs=30"], tmp_path, data_root)
    assert record["status"] == "ok"
    assert counts.batches == step == 30  # one batch an epoch
    assert record["metrics"]["train/acc"] == 1.0  # 50 images learnt by heart


def test_textbook_path_checkpoints_every_n_train_steps(data_root, tmp_path):
    record, _, _ = textbook_run(["+callbacks.step_checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
                                 f"+callbacks.step_checkpoint.dirpath={tmp_path / 'steps'}",
                                 "+callbacks.step_checkpoint.every_n_train_steps=7",
                                 "+callbacks.step_checkpoint.save_top_k=-1"], tmp_path, data_root)
    assert record["status"] == "ok"
    assert sorted(p.name for p in (tmp_path / "steps").iterdir()) == ["epoch=0-step=14.ckpt", "epoch=0-step=7.ckpt"]


@pytest.mark.parametrize("steps_per_call", [1, 8])
def test_bf16_mixed_precision_trains(steps_per_call, data_root, tmp_path):
    record = run(compose_config([f"data.steps_per_call={steps_per_call}", "trainer.precision=bf16-mixed"],
                                tmp_path, data_root))
    assert record["status"] == "ok" and record["metrics"]["test/acc"] > 0.5


@pytest.mark.parametrize("steps_per_call", [1, 8])
def test_fast_dev_run_and_the_profiler_run(steps_per_call, data_root, tmp_path):
    # fast_dev_run=N: N Lightning batches, the last one validated, then a test pass: N optimiser steps on the
    # textbook path, N groups of steps_per_call on the fast path (README, "The fast path")
    for n, overrides in ((1, ["debug=fdr"]), (2, ["trainer.fast_dev_run=2"])):
        record = run(compose_config([*SMALL_DATA, f"data.steps_per_call={steps_per_call}", *overrides],
                                    tmp_path / f"fdr{n}", data_root))
        assert record["status"] == "ok" and [row["step"] for row in record["history"]] == [n * steps_per_call]
        assert {"val/acc", "test/acc"} <= set(record["metrics"]), record["metrics"]
        assert not (tmp_path / f"fdr{n}" / "checkpoints").exists()  # fast_dev_run writes no checkpoints
    assert run(compose_config([*SMALL_DATA, f"data.steps_per_call={steps_per_call}", "debug=profiler"], tmp_path / "profiler",
                              data_root))["status"] == "ok"
    assert "run_training_epoch" in (tmp_path / "profiler" / "fit-profile.txt").read_text()  # the profiler's table


@pytest.mark.parametrize(("override", "key"), [
    ("trainer.accumulate_grad_batches=2", "trainer.accumulate_grad_batches=2"),
    ("trainer.overfit_batches=1", "trainer.overfit_batches=1"),
    ("trainer.limit_train_batches=0.5", "trainer.limit_train_batches=0.5"),
    ("trainer.val_check_interval=3", "trainer.val_check_interval=3"),
    ("+callbacks.last_checkpoint.every_n_train_steps=10", "callbacks.last_checkpoint.every_n_train_steps"),
])
def test_fast_path_refuses_batch_counting_keys_before_training_naming_the_fix(override, key, data_root, tmp_path):
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}\b.*data[.]steps_per_call=1"):
        run(compose_config([override], tmp_path, data_root))
    assert not (tmp_path / "checkpoints").exists()  # refused before training


def test_the_private_step_counter_is_where_the_fast_path_expects_it(data_root, tmp_path):
    """The one private Lightning attribute the kit touches. If an upgrade moves it, this fails naming it."""
    trainer = L.Trainer(logger=False, enable_checkpointing=False)
    assert step_counter(trainer) is not None, PRIVATE_STEP_COUNTER
    record = run(compose_config(["data.steps_per_call=8"], tmp_path, data_root))
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert record["status"] == "ok" and checkpoint["global_step"] == 20  # the counter behind global_step counted
    with pytest.raises(RuntimeError, match=rf"has no trainer[.]{PRIVATE_STEP_COUNTER.replace('.', '[.]')}.*"
                                           r"data[.]steps_per_call=1"):
        step_counter(SimpleNamespace(fit_loop=SimpleNamespace()))


@pytest.mark.parametrize("steps_per_call", [1, 8])
def test_a_resumed_run_continues_as_if_never_stopped(steps_per_call, data_root, tmp_path):
    """Two epochs in one go, and one epoch then a resume for the second, leave the same weights: the LR schedule
    (stepped each epoch) and the data order continue from the checkpoint on both paths."""
    settings = [f"data.steps_per_call={steps_per_call}", "scheduler=step", "scheduler.step_size=1",
                "scheduler.gamma=0.1", "seed=2"]
    run(compose_config([*settings, "trainer.max_epochs=2"], tmp_path / "whole", data_root))
    run(compose_config([*settings, "trainer.max_epochs=1"], tmp_path / "halves", data_root))
    last = tmp_path / "halves" / "checkpoints" / "last.ckpt"
    run(compose_config([*settings, "trainer.max_epochs=2", f"ckpt_path={last}"], tmp_path / "halves", data_root))
    whole = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", weights_only=True)
    halves = torch.load(last, weights_only=True)
    assert whole["global_step"] == halves["global_step"] == 40
    assert all(torch.equal(whole["state_dict"][k], halves["state_dict"][k]) for k in whole["state_dict"])


@pytest.mark.parametrize(("steps_per_call", "log_every_n_steps"), [(1, 50), (8, 50), (8, 4), (8, 1000)])
def test_divergence_names_the_first_bad_step_whatever_the_logging_interval(steps_per_call, log_every_n_steps,
                                                                           data_root, tmp_path):
    """optimizer.lr=inf: step 0's loss is finite (initial weights), its update makes every later loss NaN. The
    logging interval's check (step 4 here) must not report its own step, nor the per-call scan come second."""
    cfg = compose_config([f"data.steps_per_call={steps_per_call}", f"trainer.log_every_n_steps={log_every_n_steps}",
                          "optimizer.lr=inf"], tmp_path, data_root)
    with pytest.raises(DivergenceError, match=r"training loss is nan at epoch 0, step 1 "):
        run(cfg)


@pytest.mark.parametrize(("steps_per_call", "warned"), [(1, True), (8, False)])
def test_few_batches_warning_is_silenced_for_fast_path_fits_alone(steps_per_call, warned, data_root, tmp_path):
    """debug=tiny's 32 steps an epoch are fewer than log_every_n_steps=50: a true warning on the textbook
    path (32 batches); on the fast path log_every_n_steps counts steps, not its 4 batches, and no warning
    applies. The silencing ends with the fit."""
    import warnings

    cfg = compose_config([f"data.steps_per_call={steps_per_call}", "~callbacks.parameter_histograms"], tmp_path,
                         data_root)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        before = list(warnings.filters)
        run(cfg)
        assert warnings.filters == before
    assert any("smaller than the logging interval" in str(w.message) for w in seen) == warned
