"""The HParams tab and the scalars beside it, read back the way a user's browser reads them: from a real
`tensorboard` server on 127.0.0.1, over its HTTP API (experiment, session groups, scalars, histograms, images).

One sweep `-m data=fashion_mnist activation=relu,softplus seed=0,1` (2 epochs each, the fast path) and one
single run with another learning rate on the textbook path (data.steps_per_call=1), on the synthetic data of
conftest.py; TensorBoard is started on the sweep alone and on the folder holding both (as
`tensorboard --logdir outputs`).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import TEST_FIGURES_ON, TINY, compose_config, read_json, run_cli
from mlplab.hparams import hparams_of

SWEEP = ["data=fashion_mnist", "activation=relu,softplus", "seed=0,1", "trainer.max_epochs=2"]
STATUSES = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]


class TensorBoard:
    """A `tensorboard --logdir <logdir>` process on a free port of 127.0.0.1, and its HTTP API."""

    def __init__(self, logdir: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
             "--port", str(self.port), "--reload_interval", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def get(self, path: str, **query: str) -> object:
        url = f"http://127.0.0.1:{self.port}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.load(response)

    def post(self, path: str, body: dict) -> dict:
        # TensorBoard refuses a POST without this header (its guard against cross-site requests)
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json", "X-XSRF-Protected": "1"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def experiment(self) -> dict:
        return self.post("/data/plugin/hparams/experiment", {"experimentName": ""})

    def session_groups(self) -> list[dict]:
        body = {"experimentName": "", "allowedStatuses": STATUSES, "startIndex": 0, "sliceSize": 100}
        return self.post("/data/plugin/hparams/session_groups", body).get("sessionGroups", [])

    def wait_for_sessions(self, n: int, timeout: float = 90) -> list[dict]:
        """The session groups once n of them are read to their end (TensorBoard loads in the background; a
        session's end info is the last event of its file)."""
        deadline = time.monotonic() + timeout
        groups: list[dict] = []
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.stderr.read()
            try:
                groups = self.session_groups()
            except OSError:  # not listening yet
                groups = []
            if len(groups) == n and all(s["status"] != "STATUS_UNKNOWN" for g in groups for s in g["sessions"]):
                return groups
            time.sleep(0.5)
        raise AssertionError(f"TensorBoard served {len(groups)} session groups, not {n} read to their end, in {timeout} s")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def outputs(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """outputs/multirun/sweep (4 jobs) and outputs/runs/single (relu, seed 0, optimizer.lr=0.1, the textbook
    path), as train.py leaves them."""
    outputs = tmp_path_factory.mktemp("outputs")
    sweep = outputs / "multirun" / "sweep"
    result = run_cli(["-m", *TINY, *TEST_FIGURES_ON, *SWEEP, f"hydra.sweep.dir={sweep}",
                      "hydra.sweep.subdir=${hydra.job.num}"],
                     data_root, cwd=outputs)
    assert result.returncode == 0, result.stderr
    single = outputs / "runs" / "single"
    result = run_cli([*TINY, "data=fashion_mnist", "trainer.max_epochs=2", "optimizer.lr=0.1", "data.steps_per_call=1",
                      f"hydra.run.dir={single}"], data_root, cwd=outputs)
    assert result.returncode == 0, result.stderr
    return outputs


@pytest.fixture(scope="module")
def sweep_board(outputs: Path) -> Iterator[TensorBoard]:
    board = TensorBoard(outputs / "multirun" / "sweep")
    yield board
    board.close()


def hparam_columns(board: TensorBoard) -> list[dict]:
    """The experiment's hparam columns in the order the HParams tab lists them (it ticks the first five)."""
    return board.experiment()["hparamInfos"]


def test_sweep_hparams_columns_swept_keys_first_with_their_values(sweep_board):
    groups = sweep_board.wait_for_sessions(4)
    columns = hparam_columns(sweep_board)
    names = [c["name"] for c in columns]
    # the swept keys lead, marked as differing; every other key is the same in all jobs
    assert names[:2] == ["activation", "seed"], names
    assert [c["name"] for c in columns if c.get("differs")] == ["activation", "seed"]
    by_name = {c["name"]: c for c in columns}
    assert sorted(by_name["activation"]["domainDiscrete"]) == ["relu", "softplus"]
    assert by_name["seed"]["type"] == "DATA_TYPE_STRING" and sorted(by_name["seed"]["domainDiscrete"]) == ["0", "1"]
    # a key only the softplus jobs have is a column (with its range) all the same
    assert by_name["activation/beta"]["type"] == "DATA_TYPE_FLOAT64"
    assert by_name["activation/beta"]["domainInterval"] == {"minValue": 1.0, "maxValue": 1.0}
    assert by_name["data/normalize"]["type"] == "DATA_TYPE_BOOL" and by_name["data/normalize"]["domainDiscrete"] == [True]
    # plumbing, local paths and display settings are not columns; nor is data/shuffle_seed (= ${seed})
    assert not [n for n in names if "_target_" in n or "_partial_" in n], names
    assert not {"data/root", "output_dir", "ckpt_path", "trainer/enable_progress_bar", "data/shuffle_seed",
                "scheduler/T_max"} & set(names)
    rows = {(g["hparams"]["activation"], g["hparams"]["seed"]): g for g in groups}
    assert sorted(rows) == [("relu", "0"), ("relu", "1"), ("softplus", "0"), ("softplus", "1")]
    assert all(rows["softplus", seed]["hparams"]["activation/beta"] == 1.0 for seed in "01")
    assert all("activation/beta" not in rows["relu", seed]["hparams"] for seed in "01")  # an empty cell


def test_sweep_metric_columns_are_metrics_json_at_the_tested_checkpoint(sweep_board, outputs):
    groups = sweep_board.wait_for_sessions(4)
    metric_names = [m["name"]["tag"] for m in sweep_board.experiment()["metricInfos"]]
    assert metric_names == ["test/acc", "test/loss", "val/acc_best", "val/acc_tested"]
    tested_before_last = 0
    for group in groups:
        (session,) = group["sessions"]
        assert session["status"] == "STATUS_SUCCESS"
        job = outputs / "multirun" / "sweep" / session["name"].removesuffix("/hparams")
        record = read_json(job / "metrics.json")
        # the tested checkpoint: best.ckpt, the first epoch with the highest val/acc
        best = max(row["val/acc"] for row in record["history"])
        tested = next(row for row in record["history"] if row["val/acc"] == best)
        values = {m["name"]["tag"]: m for m in group["metricValues"]}
        for name in ("test/acc", "test/loss", "val/acc_best"):
            assert values[name]["value"] == pytest.approx(record["metrics"][name], rel=1e-6), name
        assert values["val/acc_tested"]["value"] == pytest.approx(tested["val/acc"], rel=1e-6)
        assert {m["trainingStep"] for m in values.values()} == {tested["step"]}
        # the job's own test scalars and figures sit at the same step, whatever its last step was
        run = session["name"].removesuffix("/hparams")
        for tag in ("test/acc", "test/loss", "test/acc_class_Shirt", "test/acc_class_T-shirt/top"):
            (point,) = sweep_board.get("/data/plugin/scalars/scalars", run=run, tag=tag)
            assert point[1] == tested["step"], tag
        assert (sweep_board.get("/data/plugin/scalars/scalars", run=run, tag="test/acc_class_Shirt")[0][2]
                == pytest.approx(record["per_class_test_acc"]["Shirt"], rel=1e-6))
        (figure,) = sweep_board.get("/data/plugin/images/images", run=run, tag="figures/test_confusion")
        assert figure["step"] == tested["step"]
        tested_before_last += tested["step"] < record["history"][-1]["step"]
    assert tested_before_last > 0  # some job's best epoch is not its last, so the steps above tell them apart


def test_epoch_best_and_initial_weights_reach_tensorboard(sweep_board, outputs):
    sweep_board.wait_for_sessions(4)
    record = read_json(outputs / "multirun" / "sweep" / "0" / "metrics.json")
    history = record["history"]
    epochs = sweep_board.get("/data/plugin/scalars/scalars", run="0", tag="epoch")
    assert [(step, value) for _, step, value in epochs] == [(row["step"], row["epoch"]) for row in history]
    best = sweep_board.get("/data/plugin/scalars/scalars", run="0", tag="val/acc_best")
    running_best = [max(row["val/acc"] for row in history[:i + 1]) for i in range(len(history))]
    assert [step for _, step, _ in best] == [row["step"] for row in history]
    assert [value for _, _, value in best] == pytest.approx(running_best, rel=1e-6)
    assert best[-1][2] == pytest.approx(record["metrics"]["val/acc_best"], rel=1e-6)
    weights = sweep_board.get("/data/plugin/histograms/histograms", run="0", tag="weights/model.layers.0.weight")
    assert [step for _, step, _ in weights] == [0, *(row["step"] for row in history)]


def test_one_experiment_over_a_folder_of_sweeps_and_runs(outputs, sweep_board):
    sweep_board.wait_for_sessions(4)  # the sweep alone is served too; its server is not needed here
    board = TensorBoard(outputs)
    try:
        groups = board.wait_for_sessions(5)
        columns = hparam_columns(board)
        test_scalars = board.get("/data/plugin/scalars/scalars", run="runs/single", tag="test/acc")
    finally:
        board.close()
    # the union of every session under the folder; what differs anywhere in it leads
    differing = ["activation", "data/steps_per_call", "optimizer/lr", "seed"]
    assert [c["name"] for c in columns if c.get("differs")] == differing
    assert [c["name"] for c in columns][:4] == differing
    rows = {g["sessions"][0]["name"]: g for g in groups}
    single = rows["runs/single/hparams"]
    assert single["hparams"]["optimizer/lr"] == 0.1 and single["hparams"]["activation"] == "relu"
    assert rows["multirun/sweep/2/hparams"]["hparams"]["activation/beta"] == 1.0
    assert {rows[f"multirun/sweep/{i}/hparams"]["hparams"]["optimizer/lr"] for i in range(4)} == {0.05}
    # the textbook path (data.steps_per_call=1) also describes the tested checkpoint at its step
    record = read_json(outputs / "runs" / "single" / "metrics.json")
    best = max(row["val/acc"] for row in record["history"])
    tested = next(row for row in record["history"] if row["val/acc"] == best)
    values = {m["name"]["tag"]: m for m in single["metricValues"]}
    assert values["test/acc"]["value"] == pytest.approx(record["metrics"]["test/acc"], rel=1e-6)
    assert values["val/acc_tested"]["value"] == pytest.approx(best, rel=1e-6)
    assert {m["trainingStep"] for m in values.values()} == {tested["step"]}
    assert [point[1] for point in test_scalars] == [tested["step"]]


def test_hparams_of_keeps_types_and_leaves_out_plumbing_paths_and_copies(data_root, tmp_path):
    cfg = compose_config(["activation=softplus"], tmp_path, data_root)  # gradient_clip_val: null
    params = hparams_of(cfg, {"activation": "softplus", "data": "mnist"})
    assert params["activation"] == "softplus" and params["activation/beta"] == 1.0
    assert params["seed"] == "0" and params["data/batch_size"] == "50"  # integers as text: "0", not "0.0000"
    assert params["data/normalize"] is True and params["model/output_activation"] is False
    assert params["optimizer/lr"] == 0.05 and params["model/hidden_sizes"] == "[200, 200]"
    assert "gradient_clip_val" not in params  # a null is an empty cell
    assert not [k for k in params if k.split("/")[-1].startswith("_")]
    assert not {"data/root", "output_dir", "data/shuffle_seed", "scheduler/T_max", "torch_threads"} & set(params)
    assert params["scheduler/eta_min"] == 0.0 and params["trainer/max_epochs"] == "1"
    assert not [k for k in params if k.startswith(("callbacks", "logger", "hydra"))]
