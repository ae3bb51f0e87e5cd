"""scripts/bench.py end to end in its quick mode, on the synthetic IDX files: no timing is asserted,
only that every variant ran through its real path and that the table and the JSON say so; and its
summary's arithmetic on made-up runs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

BENCH = ROOT / "scripts" / "bench.py"
VARIANTS = ["floor", "kit", "textbook", "classic"]
PER_VARIANT = ("epoch_s", "epoch_cpu_s", "first_step_s", "wall_s", "cpu_s", "peak_rss_mb", "val_s", "test_s",
               "figures_s", "diagnostics_s", "recording_s", "test_acc")
RECORDING = ("checkpoints", "diagnostics", "histograms", "history")


def test_quick_bench_runs_every_variant_prints_the_table_and_writes_json(data_root, tmp_path):
    out = tmp_path / "bench.json"
    # one torch thread: on a busy 2-core machine two threads wait on each other at every op
    result = subprocess.run([sys.executable, str(BENCH), "--quick", "--data-root", str(data_root), "--val-size", "200",
                             "--batch-size", "50", "--threads", "1", "--json", str(out)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr

    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("variant"))
    assert lines[header].split()[1:3] == ["epoch", "s"]
    assert [line.split()[0] for line in lines[header + 1:header + 5]] == VARIANTS  # one row each, in order
    for name in ("kit/floor epoch", "kit/floor val", "kit/floor test", "textbook/floor epoch", "classic/kit epoch",
                 "kit first step s",
                 "kit wall s", "kit peak RSS MB"):
        assert any(line.startswith(name) for line in lines), name
    assert f"wrote {out}" in result.stdout
    assert "--quick: a smoke run; the targets below are read from full runs" in result.stdout

    record = json.loads(out.read_text())
    settings = record["settings"]
    assert settings["quick"] is True and settings["epochs"] == 2 and settings["limit_batches"] == 64
    assert settings["batch_size"] == 50 and settings["rounds"] == 1 and settings["threads"] == 1
    assert list(record["variants"]) == VARIANTS
    for variant, summary in record["variants"].items():
        assert set(summary) == set(PER_VARIANT), variant
        for key, value in summary.items():
            if key in ("figures_s", "diagnostics_s", "recording_s") and variant not in ("kit", "textbook"):  # train.py's
                assert value is None
            else:
                assert isinstance(value, float) and value >= 0, (variant, key, value)
        assert summary["first_step_s"] < summary["wall_s"]
        assert 0 <= summary["test_acc"] <= 1
    assert set(record["ratios"]) == {"kit/floor epoch", "kit/floor epoch cpu", "kit/floor val", "kit/floor test",
                                     "kit/floor wall", "textbook/floor epoch", "textbook/floor wall",
                                     "classic/kit epoch", "classic/kit wall", "kit diagnostics/epoch",
                                     "kit diagnostics/epoch cpu", "kit recording/epoch", "kit recording/epoch cpu",
                                     "kit/floor epoch less recording"}
    assert all(value > 0 for value in record["ratios"].values())

    runs = record["runs"]
    # interleaved, one of each per round, then a closing floor run: each run between two floor runs
    assert [run["variant"] for run in runs] == [*VARIANTS, "floor"] and runs[-1]["closing"] is True
    for run in runs:
        assert run["returncode"] == 0
        assert len(run["epoch_s"]) == len(run["epoch_cpu_s"]) == len(run["val_s"]) == 2  # a val pass per epoch
    assert runs[1]["figures_s"] > 0 and runs[2]["figures_s"] > 0  # the kit's real test path: figures, metrics.json
    assert len(runs[1]["diagnostics_s"]) == 2 and 0 < record["ratios"]["kit diagnostics/epoch"] < 1  # once an epoch

    # the floor's table row is its round's run; the ratio divides by the geometric mean of both floor runs
    floor, kit, closing = runs[0], runs[1], runs[-1]
    assert record["variants"]["floor"]["epoch_s"] == floor["epoch_s"][1]
    assert record["ratios"]["kit/floor epoch"] == pytest.approx(
        kit["epoch_s"][1] / (floor["epoch_s"][1] * closing["epoch_s"][1]) ** 0.5)
    # what the kit records each epoch, timed part by part: every part ran in both epochs (2 checkpoints each)
    for part in RECORDING:
        assert len(kit[f"{part}_s"]) == 2 and all(seconds > 0 for seconds in kit[f"{part}_s"]), part
    recorded = sum(kit[f"{part}_s"][1] for part in RECORDING)
    assert record["variants"]["kit"]["recording_s"] == pytest.approx(recorded)
    assert record["kit_recording_s"] == pytest.approx({part: kit[f"{part}_s"][1] for part in RECORDING})
    assert record["ratios"]["kit/floor epoch less recording"] == pytest.approx(
        (kit["epoch_s"][1] - recorded) / (floor["epoch_s"][1] * closing["epoch_s"][1]) ** 0.5)
    assert any(line.startswith("kit recording s   checkpoints ") for line in lines)


def test_side_by_side_runs_a_rounds_variants_at_the_same_time(data_root, tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(BENCH), "--quick", "--side-by-side", "--threads", "1",
                             "--variants", "floor", "kit", "--data-root", str(data_root), "--val-size", "200",
                             "--batch-size", "50", "--json", str(out)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "medians of 1 rounds, side by side" in result.stdout
    record = json.loads(out.read_text())
    floor, kit = record["runs"]  # side by side: no closing floor run, each round's ratio is to its own floor
    assert (floor["variant"], kit["variant"]) == ("floor", "kit") and floor["round"] == kit["round"] == 0
    # each started before the other ended: they ran at the same time
    assert kit["started_at"] < floor["started_at"] + floor["wall_s"]
    assert floor["started_at"] < kit["started_at"] + kit["wall_s"]
    assert record["ratios"]["kit/floor epoch"] == pytest.approx(kit["epoch_s"][1] / floor["epoch_s"][1])


def test_side_by_side_refuses_more_threads_than_cores(tmp_path):
    cores = os.cpu_count() or 1
    result = subprocess.run([sys.executable, str(BENCH), "--side-by-side", "--threads", str(cores),
                             "--variants", "floor", "kit"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"more threads than the {cores} cores: give --threads {max(1, cores // 2)}" in result.stderr


def test_paired_times_each_kit_epoch_beside_a_floor_epoch_in_its_process(data_root, tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(BENCH), "--paired", "--quick", "--threads", "1", "--data-root",
                             str(data_root), "--val-size", "200", "--batch-size", "50", "--json", str(out)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "paired in one process" in result.stdout
    assert "kit/floor train epoch" in result.stdout and "kit/floor whole epoch" in result.stdout
    record = json.loads(out.read_text())
    (pairs,) = record["runs"]  # --quick: one round
    for part in ("train", "whole"):
        assert len(pairs[part]) == 2  # a (floor s, kit s) pair per epoch
        assert all(floor > 0 and kit > 0 for floor, kit in pairs[part])
        assert record["paired_ratios"][part] == pytest.approx(pairs[part][1][1] / pairs[part][1][0])  # epochs after the first
    # a whole epoch holds its training part, and more: the val passes (and the kit's checkpoints, diagnostics...)
    for (floor_train, kit_train), (floor_whole, kit_whole) in zip(pairs["train"], pairs["whole"]):
        assert floor_whole > floor_train and kit_whole > kit_train


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def record(variant: str, round_: int, epoch_s: float, **extra) -> dict:
    """A run's record as run_variant writes it, two epochs of `epoch_s` each; a kit's records 0.1 s an epoch."""
    kit = variant == "kit"
    parts = {f"{part}{unit}_s": [0.025, 0.025] if kit else [] for part in RECORDING for unit in ("", "_cpu")}
    return {"variant": variant, "round": round_, "epoch_s": [epoch_s] * 2, "epoch_cpu_s": [epoch_s] * 2,
            "val_s": [0.01] * 2, "first_step_s": 1.0, "wall_s": 5.0, "cpu_s": 5.0, "peak_rss_mb": 1000.0,
            "test_s": 0.02, "figures_s": 0.5 if kit else None, "test_acc": 0.98, "load_1min": 0.5, **parts, **extra}


def test_a_ratio_to_the_floor_divides_by_the_floor_runs_on_both_sides_of_the_run():
    summarize = load_bench().summarize
    # the machine slows steadily: floor runs of 1.0, 1.2, 1.44 s around kit runs of 1.1 and 1.32 s
    records = [record("floor", 0, 1.0), record("kit", 0, 1.1), record("floor", 1, 1.2), record("kit", 1, 1.32),
               record("floor", 2, 1.44, closing=True)]
    summary = summarize(records)
    expected = 1.1 / (1.0 * 1.2) ** 0.5  # both rounds alike: 1.32 / (1.2 * 1.44) ** 0.5
    assert summary["ratios"]["kit/floor epoch"] == pytest.approx(expected)
    less = [(1.1 - 0.1) / (1.0 * 1.2) ** 0.5, (1.32 - 0.1) / (1.2 * 1.44) ** 0.5]  # 0.1 s of recording each
    assert summary["ratios"]["kit/floor epoch less recording"] == pytest.approx(sum(less) / 2)  # median of two
    assert summary["variants"]["floor"]["epoch_s"] == pytest.approx(1.1)  # the rounds' runs only, not the closing one
    assert summary["kit_recording_s"] == pytest.approx({part: 0.025 for part in RECORDING})
    assert summary["ratios"]["kit recording/epoch"] == pytest.approx((0.1 / 1.1 + 0.1 / 1.32) / 2)  # median of two

    # side by side (no closing run): each round's ratio is to the floor that ran beside it
    side_by_side = summarize(records[:4])
    assert side_by_side["ratios"]["kit/floor epoch"] == pytest.approx(1.1)
