"""mlplab.report and scripts/summarize.py on synthetic sweep dirs, with numbers checked by hand."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mlplab.report import (MISSING_ERROR, SweepReport, _layer_grad_norms, _to_threshold, collect_jobs, format_markdown,
                           format_table, summarize,
                           write_csv, write_report)

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAN_ERROR = ("DivergenceError: training loss is nan at epoch 0, step 3 (lower optimizer.lr, or check the loss "
             "and activation choices)")


def write_job(sweep: Path, name: str, overrides: list[str], val_acc: list[float] | None = None,
              test_acc: float | None = None, test_loss: float | None = None, status: str = "ok",
              error: str | None = None) -> Path:
    """A job dir as train.py leaves it: .hydra/overrides.yaml and metrics.json (none when status is
    "missing"). val_acc holds one value per finished epoch; the last is the final one."""
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {item}\n" for item in overrides))
    if status == "missing":
        return job
    val_acc = val_acc or []
    history = [{"epoch": i, "train/loss": 1.0 / (i + 1), "val/acc": acc} for i, acc in enumerate(val_acc)]
    metrics = {"train/loss": 1.0 / len(val_acc)} if val_acc else {}
    if val_acc:
        metrics["val/acc"] = val_acc[-1]
    if test_acc is not None:
        metrics.update({"test/acc": test_acc, "test/loss": test_loss})
    record = {"status": status, "error": error, "metrics": metrics, "per_class_test_acc": {}, "history": history,
              "epochs": len(history), "wall_time_s": 1.5 + len(history), "best_checkpoint": None,
              "last_checkpoint": None, "resumed_from": None, "choices": {}, "overrides": overrides,
              "environment": {}}
    (job / "metrics.json").write_text(json.dumps(record))
    return job


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Three activations; trainer.max_epochs is the same everywhere, so it is no column."""
    root = tmp_path / "multirun" / "2026-01-01_00-00-00-000000"
    write_job(root, "0_activation=relu", ["activation=relu", "trainer.max_epochs=3"], [0.91, 0.94, 0.95], 0.952,
              0.16)
    write_job(root, "1_activation=selu", ["activation=selu", "trainer.max_epochs=3"], [0.93, 0.96, 0.97], 0.968,
              0.11)
    write_job(root, "2_activation=tanh", ["activation=tanh", "trainer.max_epochs=3"], [0.90, 0.93, 0.94], 0.941,
              0.2)
    return root


@pytest.fixture
def seeds(tmp_path: Path) -> Path:
    """relu with seeds 0-2, selu with seeds 0-1; seed 2 of selu diverged, seed 3 of relu was killed."""
    root = tmp_path / "seeds"
    for i, (act, seed, val, test, loss) in enumerate([("relu", 0, 0.90, 0.91, 0.30), ("relu", 1, 0.92, 0.93, 0.20),
                                                       ("relu", 2, 0.97, 0.95, 0.10), ("selu", 0, 0.95, 0.96, 0.15),
                                                       ("selu", 1, 0.96, 0.94, 0.25)]):
        write_job(root, f"{i}_activation={act},seed={seed}", [f"activation={act}", f"seed={seed}"], [0.5, val], test,
                  loss)
    write_job(root, "5_activation=selu,seed=2", ["activation=selu", "seed=2"], [0.4], status="failed",
              error=NAN_ERROR)
    write_job(root, "6_activation=relu,seed=3", ["activation=relu", "seed=3"], status="missing")
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_report_files(sweep: Path) -> None:
    paths = write_report(summarize(sweep))
    assert [p.name for p in paths] == ["summary.csv", "summary.md", "summary.png"]
    assert all(p.parent == sweep for p in paths)
    png = (sweep / "summary.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000


def test_values_match_metrics_json(sweep: Path) -> None:
    summary = summarize(sweep)
    write_report(summary)
    rows = read_csv(sweep / "summary.csv")
    assert len(rows) == 3
    markdown = (sweep / "summary.md").read_text().splitlines()
    for row in rows:
        record = json.loads((sweep / row["job"] / "metrics.json").read_text())
        for name in ("val/acc", "test/acc", "test/loss", "train/loss"):
            assert float(row[name]) == record["metrics"][name]  # unrounded
        assert int(row["epochs"]) == record["epochs"] and float(row["wall_time_s"]) == record["wall_time_s"]
        assert row["overrides"] == " ".join(record["overrides"])
        line = next(line for line in markdown if line.startswith(f"| {row['activation']} |"))
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        m = record["metrics"]
        assert cells == [row["activation"], "1", f"{m['val/acc']:.4f}", f"{m['test/acc']:.4f}",
                         f"{m['test/loss']:.4f}", "3", f"{record['wall_time_s']:.1f}", "ok"]


def test_best_first_and_differing_columns(sweep: Path) -> None:
    summary = summarize(sweep)
    assert summary.keys == ["activation"]  # trainer.max_epochs=3 everywhere: not a column
    assert [g.label for g in summary.groups] == ["activation=selu", "activation=relu", "activation=tanh"]
    write_csv(summary, sweep / "summary.csv")  # the plot is tested above; this test needs the rows only
    assert [r["activation"] for r in read_csv(sweep / "summary.csv")] == ["selu", "relu", "tanh"]
    table = format_table(summary).splitlines()
    assert table[0].split() == ["activation", "n", "val/acc", "test/acc", "test/loss", "epochs", "time", "(s)",
                                "status"]
    assert [line.split()[0] for line in table[1:]] == ["selu", "relu", "tanh"]
    assert "trainer.max_epochs" not in format_markdown(summary)


def test_seed_groups(seeds: Path) -> None:
    summary = summarize(seeds)
    assert summary.keys == ["activation", "seed"]
    # two seed groups (selu ranks first: mean val/acc 0.955 > 0.93), then the failed and the missing job
    assert [(g.label, g.status, g.n) for g in summary.groups] == [
        ("activation=selu", "ok", 2), ("activation=relu", "ok", 3), ("activation=selu", "failed", 1),
        ("activation=relu", "missing", 1)]
    selu, relu = summary.groups[:2]
    assert selu.mean("val/acc") == pytest.approx(0.955) and selu.std("val/acc") == pytest.approx(math.sqrt(5e-5))
    # relu test/acc 0.91, 0.93, 0.95: mean 0.93, sample variance (0.02² + 0 + 0.02²) / 2 = 4e-4
    assert relu.mean("test/acc") == pytest.approx(0.93) and relu.std("test/acc") == pytest.approx(0.02)
    # relu val/acc 0.90, 0.92, 0.97: mean 0.93, sample variance (0.03² + 0.01² + 0.04²) / 2 = 1.3e-3
    assert relu.mean("val/acc") == pytest.approx(0.93) and relu.std("val/acc") == pytest.approx(math.sqrt(1.3e-3))
    assert relu.mean("test/loss") == pytest.approx(0.2) and relu.std("test/loss") == pytest.approx(0.1)

    table = format_table(summary).splitlines()
    assert table[2].split()[:9] == ["relu", "0,1,2", "3", "0.9300", "±", "0.0361", "0.9300", "±", "0.0200"]
    assert table[1].split()[:6] == ["selu", "0,1", "2", "0.9550", "±", "0.0071"]
    write_csv(summary, seeds / "summary.csv")
    rows = read_csv(seeds / "summary.csv")  # one row per job, each naming its group
    assert [(r["seed"], r["group"]) for r in rows] == [("0", "activation=selu"), ("1", "activation=selu"),
                                                       ("0", "activation=relu"), ("1", "activation=relu"),
                                                       ("2", "activation=relu"), ("2", "activation=selu"),
                                                       ("3", "activation=relu")]


def test_failed_and_missing_jobs(seeds: Path) -> None:
    summary = summarize(seeds)
    failed, missing = summary.groups[-2:]  # unsuccessful rows last, in path order
    assert (failed.status, failed.n, failed.jobs[0].error) == ("failed", 1, NAN_ERROR)
    assert (missing.status, missing.jobs[0].error) == ("missing", MISSING_ERROR)
    assert [job.path.name for job in summary.unsuccessful] == ["5_activation=selu,seed=2", "6_activation=relu,seed=3"]
    assert summary.headline.endswith(": 5 ok, 1 failed, 1 missing")

    table = format_table(summary).splitlines()
    assert table[-2].split()[:2] == ["selu", "2"] and "failed: DivergenceError: training loss is nan" in table[-2]
    assert table[-2].endswith("…") and NAN_ERROR not in table[-2]  # shortened in the table
    assert table[-1].split()[:2] == ["relu", "3"] and table[-1].endswith(f"missing: {MISSING_ERROR}")

    markdown = format_markdown(summary)
    assert f"`5_activation=selu,seed=2`: failed: {NAN_ERROR}" in markdown  # whole in the list below the table
    assert f"`6_activation=relu,seed=3`: missing: {MISSING_ERROR}" in markdown
    write_csv(summary, seeds / "summary.csv")
    rows = {r["job"]: r for r in read_csv(seeds / "summary.csv")}
    assert rows["5_activation=selu,seed=2"]["status"] == "failed"
    assert rows["5_activation=selu,seed=2"]["error"] == NAN_ERROR
    assert rows["5_activation=selu,seed=2"]["val/acc"] == "0.4" and rows["5_activation=selu,seed=2"]["test/acc"] == ""
    assert rows["6_activation=relu,seed=3"]["status"] == "missing" and rows["6_activation=relu,seed=3"]["epochs"] == ""


def test_nested_tree(tmp_path: Path) -> None:
    """outputs/ as a whole: two sweeps and a single run, job numbers in natural order."""
    outputs = tmp_path / "outputs"
    first, second = outputs / "multirun" / "a", outputs / "multirun" / "b"
    for i in (0, 2, 10):
        write_job(first, f"{i}_optimizer.lr={i}", [f"optimizer.lr={i}"], [0.5 + i / 100], 0.5, 1.0)
    (first / "multirun.yaml").write_text("hydra: {}\n")
    write_job(second, "0_activation=selu", ["activation=selu"], status="missing")
    single = write_job(outputs / "runs", "2026-01-01", [], [0.7], 0.7, 0.9)
    (single / "checkpoints").mkdir()
    jobs = collect_jobs(outputs)
    assert [job.path.relative_to(outputs).as_posix() for job in jobs] == [
        "multirun/a/0_optimizer.lr=0", "multirun/a/2_optimizer.lr=2", "multirun/a/10_optimizer.lr=10",
        "multirun/b/0_activation=selu", "runs/2026-01-01"]
    summary = summarize(outputs)
    assert summary.keys == ["optimizer.lr", "activation"]
    assert [g.label for g in summary.groups] == ["runs/2026-01-01", "optimizer.lr=10", "optimizer.lr=2",
                                                 "optimizer.lr=0", "activation=selu"]
    assert format_table(summary).splitlines()[1].split()[:2] == ["-", "-"]  # the single run left both at default


def test_single_run_dir(tmp_path: Path) -> None:
    """A run dir is its own only job; with no differing key a `run` column names it."""
    run = write_job(tmp_path, "run", ["trainer.max_epochs=2"], [0.9, 0.96], 0.966, 0.12)
    summary = summarize(run)
    assert summary.keys == [] and [job.path for job in summary.jobs] == [run]
    assert format_table(summary).splitlines()[1].split()[:5] == ["run", "1", "0.9600", "0.9660", "0.1200"]
    assert summary.headline == f"1 job under {run}: 1 ok"


def test_sweep_report_exit_status(sweep: Path, seeds: Path) -> None:
    callback = SweepReport()
    callback.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))  # all ok: returns
    assert (sweep / "summary.md").is_file() and (sweep / "summary.png").is_file()
    with pytest.raises(SystemExit, match=r"^2 of 7 jobs failed; see .*summary\.md$") as exit_info:
        callback.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(seeds)}}}))
    assert str(exit_info.value.code).endswith(str(seeds / "summary.md"))  # a str code: exit status 1
    assert (seeds / "summary.csv").is_file()  # written before the exit


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("summarize", ROOT / "scripts" / "summarize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli(cli, seeds: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli([str(seeds)])  # failed jobs are reported, not an error
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:2] == ["activation", "seed"] and "7 jobs under" in out
    assert (seeds / "summary.png").is_file()
    for bad, message in [(tmp_path / "nowhere", "is not a directory"), (tmp_path / "empty", "no job dirs under")]:
        (tmp_path / "empty").mkdir(exist_ok=True)
        with pytest.raises(SystemExit) as exit_info:
            cli([str(bad)])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


# ---------------------------------------------------------------- convergence and per-layer gradient norms


def add_convergence(job: Path, threshold: float, grad_norms: list[list[float]] | None = None) -> None:
    """Records "epochs to threshold" as train.py does, and optionally per-epoch, per-layer gradient norms."""
    from mlplab.report import epochs_to_reach
    record = json.loads((job / "metrics.json").read_text())
    for row, norms in zip(record["history"], grad_norms or []):
        row.update({f"diagnostics/layer_{i}/grad_norm": value for i, value in enumerate(norms, start=1)})
    record["convergence"] = {"metric": "val/acc", "threshold": threshold,
                             "epochs": epochs_to_reach(record["history"], threshold)}
    (job / "metrics.json").write_text(json.dumps(record))


def test_epochs_to_threshold_column_csv_and_override(seeds: Path) -> None:
    # val/acc per epoch: relu seeds [0.5, 0.90], [0.5, 0.92], [0.5, 0.97]; selu [0.5, 0.95], [0.5, 0.96]
    for job in sorted(seeds.iterdir()):
        if (job / "metrics.json").is_file():
            add_convergence(job, 0.95, grad_norms=[[1e-3, 0.1], [2e-3, 0.3]])
    summary = summarize(seeds)
    table = format_table(summary).splitlines()
    assert "epochs to threshold" in table[0]
    assert [(g.label, g.status, _to_threshold(g)) for g in summary.groups] == [
        ("activation=selu", "ok", "2.0 ± 0.0"),  # both reached 0.95 after epoch 2
        ("activation=relu", "ok", "2 (1 of 3)"),  # only seed 2 did
        ("activation=selu", "failed", "not reached"),  # 0.4 only
        ("activation=relu", "missing", "-")]  # nothing recorded
    # recomputed from the histories at another threshold (the report setting)
    assert [_to_threshold(g) for g in summarize(seeds, acc_threshold=0.5).groups] == [
        "1.0 ± 0.0", "1.0 ± 0.0", "not reached", "-"]
    paths = write_report(summary)
    rows = {r["job"]: r for r in read_csv(seeds / "summary.csv")}
    assert rows["2_activation=relu,seed=2"]["epochs_to_threshold"] == "2"
    assert rows["0_activation=relu,seed=0"]["epochs_to_threshold"] == ""  # never: empty
    assert rows["0_activation=relu,seed=0"]["acc_threshold"] == "0.95"
    assert "until val/acc first reached 0.95" in (seeds / "summary.md").read_text()
    # the per-layer gradient norms by row, as a figure
    assert paths[-1].name == "layers.png" and paths[-1].read_bytes().startswith(PNG_SIGNATURE)
    assert "layers.png" in (seeds / "summary.md").read_text()
    assert _layer_grad_norms(summary.groups[0].jobs) == {1: {"first": 1e-3, "last": 2e-3},
                                                         2: {"first": pytest.approx(0.1), "last": pytest.approx(0.3)}}


def test_runs_without_threshold_or_diagnostics_have_neither_column_nor_figure(sweep: Path) -> None:
    summary = summarize(sweep)
    assert "epochs to threshold" not in format_table(summary)
    assert [p.name for p in write_report(summary)] == ["summary.csv", "summary.md", "summary.png"]
