"""From the composed config to objects: range checks first, then the data, module and Trainer it names.

`instantiate` is the one map from config to object; the functions here add what it cannot know: errors
reported against the config key, the sizes the model takes from the dataset, and which classifier
(textbook or fast path) `data.steps_per_call` picks.
"""

from __future__ import annotations

import math
import os
from numbers import Real
from typing import Any, Sequence

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, ListConfig, OmegaConf

from mlplab.atomic import AtomicCheckpointIO
from mlplab.data import ImageClassificationData
from mlplab.fast_path import FastPathClassifier, fast_path_refusals, train_step_limit
from mlplab.module import EPOCH_METRICS, Classifier
from mlplab.rundir import writable_dir_error
from mlplab.slurm import cores_of_task, in_step


SEED_MAX = 2**32 - 1  # numpy's seeds are uint32: Lightning's seed_everything refuses the rest with a traceback


class ConfigError(ValueError):
    """A config value is out of range; the message names the key, the value and what is allowed."""


def build(cfg: DictConfig, key: str, **kwargs: Any) -> Any:
    """instantiate(cfg[key]) with constructor errors reported against the config key."""
    try:
        return instantiate(OmegaConf.select(cfg, key, throw_on_missing=True), **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ if err.__cause__ is not None else err
        raise ConfigError(f"{key}.{cause}" if isinstance(cause, ValueError) else f"{key}: {cause}") from err


def build_model(cfg: DictConfig, datamodule: ImageClassificationData) -> torch.nn.Module:
    """The model of cfg.model, sized for the dataset, with the activation of cfg.activation."""
    return build(cfg, "model", in_features=datamodule.input_size, num_classes=datamodule.num_classes,
                 activation=build(cfg, "activation"))


def fast_path(cfg: DictConfig) -> bool:
    """Whether cfg runs the fast path (mlplab.fast_path): several optimiser steps per Lightning batch."""
    return cfg.data.steps_per_call > 1


def build_module(cfg: DictConfig, datamodule: ImageClassificationData) -> Classifier:
    """Classifier for data.steps_per_call=1; above it FastPathClassifier, which clips each step itself and
    stops each epoch at trainer.limit_train_batches steps."""
    parts = dict(model=build_model(cfg, datamodule), loss=build(cfg, "loss"), optimizer=build(cfg, "optimizer"),
                 num_classes=datamodule.num_classes,
                 scheduler=build(cfg, "scheduler") if cfg.scheduler is not None else None)
    if not fast_path(cfg):
        return Classifier(**parts)
    return FastPathClassifier(**parts, gradient_clip_val=cfg.trainer.gradient_clip_val,
                              gradient_clip_algorithm=cfg.trainer.gradient_clip_algorithm,
                              limit_train_batches=train_step_limit(cfg))


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The callbacks of cfg.callbacks, in their order (the first ModelCheckpoint is trainer.checkpoint_callback).
    An entry set to null is off (`callbacks.test_figures=null`), as in lightning-hydra-template."""
    # trainer.enable_progress_bar=false must not meet a progress-bar callback (Lightning refuses the pair)
    names = [n for n, c in (cfg.callbacks or {}).items()
             if c is not None and (n != "progress_bar" or cfg.trainer.enable_progress_bar)]
    return [build(cfg, f"callbacks.{name}") for name in names]


def build_logger(cfg: DictConfig) -> L.pytorch.loggers.Logger | bool:
    """The logger of cfg.logger, or False (no logger) for logger=none."""
    return build(cfg, "logger") if cfg.logger is not None else False


def build_trainer(cfg: DictConfig, callbacks: Sequence[L.Callback], logger: Any) -> L.Trainer:
    """The Trainer of cfg.trainer. On the fast path its clipping keys go to the module instead, and a
    limit_train_batches of N steps becomes the number of groups that hold them (see build_module)."""
    handed_over: dict[str, Any] = {}
    if fast_path(cfg):
        handed_over = {"gradient_clip_val": None, "gradient_clip_algorithm": None}
        if (limit := train_step_limit(cfg)) is not None:
            handed_over["limit_train_batches"] = math.ceil(limit / cfg.data.steps_per_call)
    # checkpoints written atomically in their own folder, whatever filesystem it is on (mlplab.atomic)
    plugins: list[Any] = [AtomicCheckpointIO()]
    if in_step():  # the kit stops and requeues on the time-limit signal (mlplab.launch), at an epoch's checkpoint;
        plugins.append(SLURMEnvironment(auto_requeue=False))  # Lightning's requeue saves mid-epoch (hpc_ckpt)
    return build(cfg, "trainer", logger=logger, callbacks=list(callbacks), default_root_dir=cfg.output_dir,
                 plugins=plugins, **handed_over)


def check_config(cfg: DictConfig) -> None:
    """Range checks for values that no constructor sees before training starts."""
    lr = cfg.optimizer.lr
    if isinstance(lr, bool) or not isinstance(lr, Real) or not lr > 0:
        raise ConfigError(f"optimizer.lr={lr!r} must be a number > 0")
    epochs = cfg.trainer.max_epochs
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"trainer.max_epochs={epochs!r} must be an integer >= 1")
    seed = cfg.seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"seed={seed!r} must be an integer in [0, {SEED_MAX}]")
    threads = cfg.torch_threads
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"torch_threads={threads!r} must be an integer >= 1, or null for torch's default")
    if cfg.monitor not in EPOCH_METRICS:  # else ModelCheckpoint fails only at the end of the first epoch
        raise ConfigError(f"monitor={cfg.monitor!r} is not a metric of each epoch: choose one of {list(EPOCH_METRICS)}")
    hidden = OmegaConf.select(cfg, "model.hidden_sizes")
    if not isinstance(hidden, ListConfig):  # else list(None) fails in MLP with a message that names no key
        raise ConfigError(f"model.hidden_sizes={hidden!r} must be a list of positive integers ([] for none)")
    for key in ("step_size", "T_max"):  # else StepLR divides by zero after the first epoch
        value = OmegaConf.select(cfg, f"scheduler.{key}")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"scheduler.{key}={value!r} must be a positive integer")
    clip = cfg.trainer.gradient_clip_val
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, Real) or not clip > 0):
        raise ConfigError(f"trainer.gradient_clip_val={clip!r} must be a number > 0, or null for no clipping")
    threshold = cfg.acc_threshold
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, Real)
                                  or not 0 < threshold <= 1):
        raise ConfigError(f"acc_threshold={threshold!r} must be a number in (0, 1], or null for the dataset's own")
    steps_per_call = cfg.data.steps_per_call
    if isinstance(steps_per_call, bool) or not isinstance(steps_per_call, int) or steps_per_call < 1:
        raise ConfigError(f"data.steps_per_call={steps_per_call!r} must be a positive integer")
    if fast_path(cfg) and (refusals := fast_path_refusals(cfg)):
        raise ConfigError("; ".join(refusals))
    if (error := writable_dir_error(cfg.output_dir)) is not None:
        raise ConfigError(error)


def threads_for_job(configured: int | None) -> int | None:
    """torch threads for this process: the configured number, else cores / processes run side by side.

    Side by side run hydra/launcher=joblib's n_jobs workers, each with its DDP ranks on this node
    (LOCAL_WORLD_SIZE, set by torchrun and by mlplab.launch). Under joblib each worker would otherwise
    start one thread per core, and jobs sharing cores that way were seen to run many times slower than
    one alone (issue #3). In a SLURM job the cores are the task's (mlplab.slurm.cores_of_task). None leaves
    torch's default (one thread per core) for a process that runs alone outside SLURM.
    """
    if configured is not None:
        return configured
    slurm_cores = cores_of_task()  # None outside a SLURM job
    cores = slurm_cores or os.cpu_count() or 1
    n_jobs = 1
    if HydraConfig.initialized():
        n_jobs = OmegaConf.select(HydraConfig.get(), "launcher.n_jobs", default=1)  # only joblib has n_jobs
        n_jobs = cores if n_jobs < 0 else n_jobs  # joblib: -1 means one job per core
    processes = n_jobs * int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cores // processes) if processes > 1 or slurm_cores is not None else None
