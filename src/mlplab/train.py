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
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from mlplab.allocator import keep_freed_memory
from mlplab.atomic import WriteError
from mlplab.config import (ConfigError, build, build_callbacks, build_logger, build_module, build_trainer, check_config,
                           threads_for_job)
from mlplab.hparams import hparams_of, log_session
from mlplab.idx import DataError
from mlplab.module import DivergenceError
from mlplab.record import ConfigInCheckpoint, EpochHistory, environment, read_history, write_metrics
from mlplab.report import RANK_BY, epochs_to_reach
from mlplab.resume import ResumeError, RunFolder, check_resume, continue_command, record_is_worse, still_good
from mlplab.rundir import HISTORY_FILE, RESOLVED_CONFIG_FILE, launcher_rank
from mlplab.slurm import LaunchError, TimeLimitStop, check_launch, job_of_task, time_limit_signal

# Errors whose message already says what to do: printed as one line, without a traceback.
EXPECTED_ERRORS = (ConfigError, DataError, DivergenceError, ResumeError, WriteError, LaunchError)


def hydra_job_info() -> dict[str, Any]:
    """The group choices and overrides of this Hydra job (empty outside Hydra)."""
    if not HydraConfig.initialized():
        return {"choices": {}, "overrides": []}
    hc = HydraConfig.get()
    choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra/") and v is not None}
    return {"choices": choices, "overrides": list(hc.overrides.task)}


def interrupted_message(out: Path, signal_name: str) -> str:
    """What to do after an interruption: where the work is and the command that continues it."""
    last = out / "checkpoints" / "last.ckpt"
    if not last.exists():
        return f"interrupted by {signal_name} before the first epoch ended: no checkpoint to resume from"
    # Into the same dir: its ModelCheckpoint then restores the best score so far (in another dir Lightning
    # keeps only the best path, and the first resumed epoch would become "best" whatever its score).
    command = continue_command(hydra_job_info()["overrides"], last, out)
    return f"interrupted by {signal_name}; checkpoints and metrics.json are in {out}. Continue with:\n  {command}"


def epoch_metrics(trainer: L.Trainer) -> dict[str, float]:
    """trainer.callback_metrics as floats, epoch values only, named without Lightning's _epoch suffix
    (and without "step", the x of the logged values: FastPathClassifier.log_step, Classifier.tested_step)."""
    return {k.removesuffix("_epoch"): float(v) for k, v in trainer.callback_metrics.items()
            if not k.endswith("_step") and k != "step"}


def run(cfg: DictConfig, extra_callbacks: Sequence[L.Callback] = ()) -> dict[str, Any]:
    """Trains and tests one configuration in this process; returns the metrics.json record.

    Args:
        cfg: the composed conf/train.yaml.
        extra_callbacks: added to the Trainer's, after the configured ones (mlplab.launch: StopRequest).
    """
    folder = RunFolder.claim(cfg.output_dir, cfg.ckpt_path, rank=launcher_rank())  # refused: nothing written
    start = time.perf_counter()
    out = Path(cfg.output_dir)
    record: dict[str, Any] = {"status": "failed", "error": None, "metrics": {}, "per_class_test_acc": {},
                              "history": [], "epochs": 0, "wall_time_s": None, "best_checkpoint": None,
                              "last_checkpoint": None, "resumed_from": cfg.ckpt_path, "slurm": job_of_task(), "convergence": None,
                              **hydra_job_info(), "environment": environment()}
    threshold = None  # val/acc for "epochs to threshold": cfg.acc_threshold, else the dataset's
    history = EpochHistory(out / HISTORY_FILE)
    trainer: L.Trainer | None = None
    failed_write: WriteError | None = None
    try:
        # check
        check_config(cfg)
        check_launch(cfg.trainer)
        replan = check_resume(cfg) if cfg.ckpt_path is not None else None
        OmegaConf.save(cfg, out / RESOLVED_CONFIG_FILE, resolve=True)
        # seed
        threads = threads_for_job(cfg.torch_threads)
        if threads is not None:
            torch.set_num_threads(threads)
        record["environment"]["torch_threads"] = torch.get_num_threads()
        record["environment"]["keeps_freed_memory"] = keep_freed_memory()  # glibc: no page faults per step
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        # build
        datamodule = build(cfg, "data")
        threshold = cfg.acc_threshold if cfg.acc_threshold is not None else datamodule.info.acc_threshold
        module = build_module(cfg, datamodule)
        logger = build_logger(cfg)
        callbacks = [*build_callbacks(cfg), *extra_callbacks, history,
                     ConfigInCheckpoint(OmegaConf.to_container(cfg, resolve=True)), *([replan] if replan else [])]
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
        record["per_class_test_acc"] = {name: metrics[f"test/acc_class_{name}"] for name in datamodule.classes}
        record["status"] = "ok"
        if trainer.is_global_zero:
            log_session(trainer, hparams_of(cfg, record["choices"]), record["metrics"])
        return record
    except SIGTERMException as err:  # Lightning raises it at the next step after SIGTERM (mlplab.launch too)
        name = f"{time_limit_signal().name} (SLURM's time-limit warning)" if isinstance(err, TimeLimitStop) else "SIGTERM"
        record["status"], record["error"] = "interrupted", name
        raise SystemExit(interrupted_message(out, name) if launcher_rank() == 0 else 1) from err
    except (KeyboardInterrupt, SystemExit) as err:  # Lightning turns Ctrl-C into sys.exit(1) after shutting down
        record["status"], record["error"] = "interrupted", "SIGINT (Ctrl-C)"
        raise SystemExit(interrupted_message(out, "SIGINT (Ctrl-C)") if launcher_rank() == 0 else 1) from err
    except WriteError as err:  # a full disk, most often; the previous version of every file is whole
        record["error"] = f"WriteError: {err}"
        failed_write = err
        raise
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
        try:
            if ((trainer is None or trainer.is_global_zero) and out.is_dir() and os.access(out, os.W_OK)
                    and not record_is_worse(out, record)):  # a failed resume leaves the folder's record as it was
                write_metrics(out, record)
        except WriteError as err:
            failed_write = failed_write or err
        finally:
            folder.release()
        if failed_write is not None:  # replaces the error in flight with one that also says what is still good
            last = out / "checkpoints" / "last.ckpt"
            resume = f" Free some space, then continue with: {continue_command(record['overrides'], last, out)}"
            raise WriteError(f"{failed_write}. Still good: {still_good(out)}.{resume if last.is_file() else ''}",
                             failed_write.path, failed_write.errno) from failed_write
