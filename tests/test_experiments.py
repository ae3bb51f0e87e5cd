"""The named experiments and the pictures of a run (issue #6), through the real entry points."""

from __future__ import annotations

import os

import pytest
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import CONF, ROOT, TEST_FIGURES_ON, TINY, read_json, run_cli, run_script

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXPERIMENTS = ("activation_study", "best_mlp", "depth_study", "dying_relu", "loss_study", "optimizer_study",
               "softmax_regression_fashion", "tutorial_mlp_fixed", "tutorial_mlp_leaky", "tutorial_mlp_raw")
TEST_FIGURES = ("misclassified", "confusion", "entropy")


def experiment_names() -> list[str]:
    """Every conf/experiment file, found recursively, as the name `experiment=` takes."""
    found = sorted(str(p.relative_to(CONF / "experiment").with_suffix("")) for p in (CONF / "experiment").rglob("*.yaml"))
    assert set(EXPERIMENTS) <= set(found), found  # the documented ones at least: none went undiscovered
    return found


def test_every_experiment_file_is_headed_by_the_command_that_runs_it():
    for name in experiment_names():
        header = (CONF / "experiment" / f"{name}.yaml").read_text().splitlines()[:3]
        assert header[0] == "# @package _global_", name
        assert header[1].startswith(f"# python train.py -m experiment={name}"), name


def test_one_multirun_runs_every_experiment(data_root, tmp_path):
    """`-m experiment=glob(*)`: one job per experiment file; each job runs the experiment itself
    once (its own sweeper params only apply when the experiment is chosen on the command line)."""
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", "experiment=glob(*)", *TINY, f"hydra.sweep.dir={sweep}"], data_root, cwd=tmp_path,
                     timeout=600)
    assert result.returncode == 0, result.stderr
    records = [read_json(job / "metrics.json") for job in sorted(sweep.iterdir()) if job.is_dir()]
    assert sorted(r["choices"]["experiment"] for r in records) == experiment_names()
    assert all(r["status"] == "ok" and r["epochs"] == 1 for r in records)
    by_name = {r["choices"]["experiment"]: r for r in records}
    # the files' own choices came through (command-line TINY settings aside)
    assert by_name["softmax_regression_fashion"]["choices"]["data"] == "fashion_mnist"
    assert by_name["softmax_regression_fashion"]["choices"]["model"] == "softmax_regression"
    assert by_name["tutorial_mlp_leaky"]["choices"]["activation"] == "leaky_relu"
    assert by_name["dying_relu"]["choices"]["optimizer"] == "adam"
    assert (sweep / "summary.md").is_file()


def test_tutorial_quirk_is_a_relu_on_the_logits_and_the_fix_removes_it():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        raw, fixed = (compose("train", overrides=[f"experiment={name}"])
                      for name in ("tutorial_mlp_raw", "tutorial_mlp_fixed"))
    assert raw.model.output_activation is True and fixed.model.output_activation is False
    for cfg in (raw, fixed):  # the tutorial's settings, equal in both
        assert cfg.optimizer.lr == 0.01 and cfg.optimizer.momentum == 0.0 and cfg.scheduler is None
        assert cfg.data.batch_size == 200 and cfg.model.init == "kaiming_normal" and cfg.trainer.max_epochs == 10
        assert cfg.model.hidden_sizes == [200, 200] and cfg.activation._target_ == "torch.nn.ReLU"


def test_test_figures_and_histograms_reach_tensorboard_and_render_to_png(data_root, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli([*TINY, *TEST_FIGURES_ON, "trainer.max_epochs=2", f"hydra.run.dir={run_dir}"], data_root,
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    for name in TEST_FIGURES:
        image = events.Images(f"figures/test_{name}")[-1]
        assert image.encoded_image_string.startswith(PNG_SIGNATURE) and image.width > 100 and image.height > 100
    for kind, steps in (("weights", 3), ("grads", 2)):  # one histogram per parameter per epoch; weights at step 0 too
        layer_tags = [t for t in tags["histograms"] if t.startswith(f"{kind}/model.")]
        assert len(layer_tags) == 6, layer_tags  # 3 Linear layers x (weight, bias)
        assert all(len(events.Histograms(t)) == steps for t in layer_tags)
        assert (events.Histograms(layer_tags[0])[0].step == 0) == (kind == "weights")

    result = run_script(ROOT / "scripts" / "render_figures.py", [run_dir, "--data-root", data_root], ROOT,
                        dict(os.environ), timeout=120)
    assert result.returncode == 0, result.stderr
    for name in TEST_FIGURES:
        png = run_dir / "figures" / f"{name}.png"
        assert str(png) in result.stdout and png.read_bytes().startswith(PNG_SIGNATURE)


def test_render_figures_names_a_dir_without_checkpoints(tmp_path):
    result = run_script(ROOT / "scripts" / "render_figures.py", [tmp_path], ROOT, dict(os.environ), timeout=120)
    assert result.returncode != 0
    assert f"{tmp_path}/checkpoints/best.ckpt not found" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("experiment", ["tutorial_mlp_raw", "softmax_regression_fashion"])
def test_per_class_accuracy_is_recorded_with_class_names(experiment, data_root, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli([f"experiment={experiment}", *TINY, f"hydra.run.dir={run_dir}"], data_root, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    per_class = read_json(run_dir / "metrics.json")["per_class_test_acc"]
    expected = ["0", "1"] if experiment == "tutorial_mlp_raw" else ["T-shirt/top", "Trouser"]
    assert list(per_class)[:2] == expected and len(per_class) == 10
    assert all(0 <= acc <= 1 for acc in per_class.values())
