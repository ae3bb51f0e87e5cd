"""What a run leaves behind besides Lightning's own files: metrics.json and the means to repeat it.

metrics.json (written by global rank 0, at the end and on every failure) holds:
    status            "ok" | "failed" | "interrupted"
    error             one line naming what went wrong, or null
    metrics           final {"val/acc", "val/loss", "val/entropy_bits", "test/acc", "test/loss", ...}
    per_class_test_acc  {class name: accuracy}
    history           one row per finished epoch: {"epoch", "step" (optimiser steps done), "train/loss", "val/acc", ...}
                      (also in history.json, rewritten after every epoch while the run goes on)
    epochs            finished epochs
    wall_time_s       seconds from the start of run() to the end
    best_checkpoint, last_checkpoint  paths, or null
    resumed_from      the checkpoint the run continued from (ckpt_path, or last.ckpt in a requeued SLURM job), or null
    slurm             {"job_id", "restarts" (times SLURM requeued the job)} in a SLURM job, else null
    choices, overrides  the Hydra group choices and command-line overrides of this job
    environment       python and package versions, git commit (and whether the tree was dirty), host, torch
                      threads, and whether glibc keeps freed memory (mlplab.allocator)
The resolved config is saved beside it as resolved_config.yaml.
"""

from __future__ import annotations

import json
import math
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mlplab.atomic import write_atomically
from mlplab.rundir import METRICS_FILE, writable_dir_error

PACKAGES = ("mlplab", "torch", "torchvision", "lightning", "hydra-core", "omegaconf", "torchmetrics", "tensorboard",
            "numpy")


def environment() -> dict[str, Any]:
    """Python, package versions and the git commit of the code, for repeating a run."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    source = Path(__file__).resolve().parent
    git = {"commit": None, "dirty": None}
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode == 0:
            status = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10)
            git = {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.TimeoutExpired):
        pass  # no git here: the versions still say what ran
    return {"python": sys.version.split()[0], "platform": platform.platform(), "host": socket.gethostname(),
            "argv": sys.argv, "packages": versions, "git": git}


class OutputDirCheck(Callback):
    """A Hydra callback: stops before any job if the run or sweep folder cannot be written.

    Hydra creates the folder itself, and when it cannot, prints a traceback from its own code;
    this check runs first and says what to do instead.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if (error := writable_dir_error(config.hydra.run.dir)) is not None:
            raise SystemExit(f"error: {error}")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if (error := writable_dir_error(config.hydra.sweep.dir)) is not None:
            raise SystemExit(f"error: {error}")


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def read_metrics(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / METRICS_FILE).read_text())


def write_json(path: str | Path, data: Any) -> None:
    """Writes JSON atomically (mlplab.atomic): a killed job or a full disk never leaves half a file."""
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    write_atomically(path, lambda f: f.write(text.encode()))


def write_metrics(run_dir: str | Path, record: dict[str, Any]) -> None:
    write_json(Path(run_dir) / METRICS_FILE, record)


class EpochHistory(L.Callback):
    """Collects the epoch-level metrics after each training epoch (validation included).

    Rank 0 rewrites `path` (a JSON list, one row per epoch) after every epoch: the history
    survives a killed job.

    Args:
        path: where the rows are written, normally <run dir>/history.json.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, float | int | None]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        row: dict[str, float | int | None] = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        for name, value in trainer.callback_metrics.items():
            if not name.endswith("_step"):
                row[name.removesuffix("_epoch")] = _finite_or_none(float(value))
        self.rows.append(row)
        if trainer.is_global_zero:
            write_json(self.path, self.rows)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict["rows"])  # a resumed run keeps the epochs before the interruption


def read_history(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else []


class InterruptCheckpoint(L.Callback):
    """Saves `<dirpath>/interrupted.ckpt` (mid-epoch weights) on Ctrl-C or SIGTERM only.

    Not Lightning's OnExceptionCheckpoint: that one saves on any exception, which after a NaN
    loss writes diverged weights, and its presence makes every fit(ckpt_path=None) look for a
    checkpoint to resume. A resume that must match an uninterrupted run starts from last.ckpt
    (an epoch boundary); interrupted.ckpt keeps the partial epoch's weights for inspection.
    """

    def __init__(self, dirpath: str | Path, filename: str = "interrupted") -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)) and trainer.state.fn == TrainerFn.FITTING:
            trainer.save_checkpoint(self.path)


class ConfigInCheckpoint(L.Callback):
    """Stores the run's resolved config in every checkpoint (as plain containers, loadable with
    weights_only=True), so that a checkpoint alone is enough to rebuild and evaluate the model."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint["config"] = self.config
