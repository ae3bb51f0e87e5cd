"""run(cfg): one process, top to bottom: check -> seed -> build -> fit -> test -> record.

Every outcome, failures and interruptions included, ends in metrics.json (global rank 0 only). Which
processes run it is mlplab.launch's business; what each object is, mlplab.config's.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard.summary import hparams

from mlplab.config import (ConfigError, build, build_callbacks, build_logger, build_module, build_trainer, check_config,
                           threads_for_job)
from mlplab.idx import DataError
from mlplab.module import DivergenceError
from mlplab.record import ConfigInCheckpoint, EpochHistory, environment, read_history, write_metrics
from mlplab.report import RANK_BY, epochs_to_reach
from mlplab.rundir import HISTORY_FILE, RESOLVED_CONFIG_FILE

HPARAM_METRICS = ("val/acc", "test/acc", "test/loss")  # the HParams tab's metric columns

# Errors whose message already says what to do: printed as one line, without a traceback.
EXPECTED_ERRORS = (ConfigError, DataError, DivergenceError)


def hydra_job_info() -> dict[str, Any]:
    """The group choices and overrides of this Hydra job (empty outside Hydra)."""
    if not HydraConfig.initialized():
        return {"choices": {}, "overrides": []}
    hc = HydraConfig.get()
    choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra/") and v is not None}
    return {"choices": choices, "overrides": list(hc.overrides.task)}


def hparams_of(cfg: DictConfig, choices: dict[str, str]) -> dict[str, Any]:
    """The resolved config flattened to 'a/b' -> scalar, plus the group choices, for HParams."""
    flat: dict[str, Any] = {f"choice/{k}": v for k, v in choices.items()}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}/{k}" if prefix else str(k))
        elif isinstance(node, (bool, int, float, str)):
            flat[prefix] = node
        else:  # lists and nulls become readable strings
            flat[prefix] = str(node)

    resolved = OmegaConf.to_container(cfg, resolve=True)
    walk({k: v for k, v in resolved.items() if k not in ("output_dir", "callbacks", "logger")}, "")
    return flat


def log_hparams(logger: L.pytorch.loggers.TensorBoardLogger, params: dict[str, Any]) -> None:
    """Writes one HParams session whose metric columns read the scalars already logged.

    Lightning's `log_hyperparams(params, metrics)` would log the metric values again at step 0,
    which puts the final val/acc at the start of its curve; torch's `hparams()` summary names
    the metric tags only, and TensorBoard reads each one's last logged value.
    """
    experiment, session_start, session_end = hparams(params, {name: 0.0 for name in HPARAM_METRICS})
    writer = logger.experiment._get_file_writer()  # SummaryWriter has no public call for this summary
    for summary in (experiment, session_start, session_end):
        writer.add_summary(summary)
    logger.experiment.flush()


def interrupted_message(out: Path, signal_name: str) -> str:
    """What to do after an interruption: where the work is and the command that continues it."""
    last = out / "checkpoints" / "last.ckpt"
    if not last.exists():
        return f"interrupted by {signal_name} before the first epoch ended: no checkpoint to resume from"
    # Into the same dir: its ModelCheckpoint then restores the best score so far (in another dir Lightning
    # keeps only the best path, and the first resumed epoch would become "best" whatever its score).
    command = " ".join(["python train.py", *hydra_job_info()["overrides"], f"ckpt_path={last}", f"hydra.run.dir={out}"])
    return f"interrupted by {signal_name}; checkpoints and metrics.json are in {out}. Continue with:\n  {command}"


def epoch_metrics(trainer: L.Trainer) -> dict[str, float]:
    """trainer.callback_metrics as floats, epoch values only, named without Lightning's _epoch suffix
    (and without "step", the x of the logged values, see FastPathClassifier.log_step)."""
    return {k.removesuffix("_epoch"): float(v) for k, v in trainer.callback_metrics.items()
            if not k.endswith("_step") and k != "step"}


def run(cfg: DictConfig, extra_callbacks: Sequence[L.Callback] = ()) -> dict[str, Any]:
    """Trains and tests one configuration in this process; returns the metrics.json record.

    Args:
        cfg: the composed conf/train.yaml.
        extra_callbacks: added to the Trainer's, after the configured ones (mlplab.launch: StopRequest).
    """
    start = time.perf_counter()
    out = Path(cfg.output_dir)
    record: dict[str, Any] = {"status": "failed", "error": None, "metrics": {}, "per_class_test_acc": {},
                              "history": [], "epochs": 0, "wall_time_s": None, "best_checkpoint": None,
                              "last_checkpoint": None, "resumed_from": cfg.ckpt_path, "convergence": None,
                              **hydra_job_info(), "environment": environment()}
    threshold = None  # val/acc for "epochs to threshold": cfg.acc_threshold, else the dataset's
    history = EpochHistory(out / HISTORY_FILE)
    trainer: L.Trainer | None = None
    try:
        # check
        check_config(cfg)
        OmegaConf.save(cfg, out / RESOLVED_CONFIG_FILE, resolve=True)
        # seed
        threads = threads_for_job(cfg.torch_threads)
        if threads is not None:
            torch.set_num_threads(threads)
        record["environment"]["torch_threads"] = torch.get_num_threads()
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        # build
        datamodule = build(cfg, "data")
        threshold = cfg.acc_threshold if cfg.acc_threshold is not None else datamodule.info.acc_threshold
        module = build_module(cfg, datamodule)
        logger = build_logger(cfg)
        callbacks = [*build_callbacks(cfg), *extra_callbacks, history,
                     ConfigInCheckpoint(OmegaConf.to_container(cfg, resolve=True))]
        trainer = build_trainer(cfg, callbacks, logger)
        # fit
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        history_rows = read_history(out / HISTORY_FILE)  # written by rank 0, spawned or not
        checkpoint = trainer.checkpoint_callback
        best = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
        record["metrics"] = epoch_metrics(trainer)
        monitored = [row[cfg.monitor] for row in history_rows if row.get(cfg.monitor) is not None]
        if monitored:  # from the history, which holds the epochs before a resume too
            record["metrics"][f"{cfg.monitor}_best"] = max(monitored)
        # test, on the best checkpoint
        trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False)
        metrics = epoch_metrics(trainer)
        record["metrics"].update({k: v for k, v in metrics.items() if not k.startswith("test/acc_class_")})
        record["per_class_test_acc"] = {name: metrics[f"test/acc_class_{i}"]
                                        for i, name in enumerate(datamodule.classes)}
        record["status"] = "ok"
        if trainer.is_global_zero and isinstance(logger, TensorBoardLogger):
            log_hparams(logger, hparams_of(cfg, record["choices"]))
        return record
    except SIGTERMException as err:  # Lightning raises it at the next step after SIGTERM
        record["status"], record["error"] = "interrupted", "SIGTERM"
        raise SystemExit(interrupted_message(out, "SIGTERM")) from err
    except (KeyboardInterrupt, SystemExit) as err:  # Lightning turns Ctrl-C into sys.exit(1) after shutting down
        record["status"], record["error"] = "interrupted", "SIGINT (Ctrl-C)"
        raise SystemExit(interrupted_message(out, "SIGINT (Ctrl-C)")) from err
    except Exception as err:
        record["error"] = f"{type(err).__name__}: {err}"
        raise
    finally:
        # record
        record["wall_time_s"] = round(time.perf_counter() - start, 3)
        record["history"] = read_history(out / HISTORY_FILE)
        record["epochs"] = len(record["history"])
        if threshold is not None:
            record["convergence"] = {"metric": RANK_BY, "threshold": threshold,
                                     "epochs": epochs_to_reach(record["history"], threshold)}
        checkpoints = out / "checkpoints"
        if trainer is not None and trainer.checkpoint_callback is not None:
            record["best_checkpoint"] = trainer.checkpoint_callback.best_model_path or None
        record["last_checkpoint"] = str(checkpoints / "last.ckpt") if (checkpoints / "last.ckpt").exists() else None
        record["metrics"] = {k: v for k, v in record["metrics"].items() if math.isfinite(v)}
        if (trainer is None or trainer.is_global_zero) and out.is_dir() and os.access(out, os.W_OK):
            write_metrics(out, record)
