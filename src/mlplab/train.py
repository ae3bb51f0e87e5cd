"""run(cfg): check config -> seed -> data -> module -> logger -> trainer -> fit -> test -> record."""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
import warnings
from numbers import Real
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
import torch.multiprocessing as mp
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import setup_globals
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.fabric.plugins.environments.lightning import find_free_network_port
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard.summary import hparams

from mlplab.data import DataError, ImageClassificationData
from mlplab.module import Classifier, DivergenceError
from mlplab.record import (ConfigInCheckpoint, EpochHistory, environment, read_history, read_metrics,
                           writable_dir_error, write_metrics)

log = logging.getLogger(__name__)

# Lightning warns when an epoch has fewer batches than trainer.log_every_n_steps. Here each of its batches
# holds data.steps_per_call optimiser steps and Classifier counts log_every_n_steps in steps, so an epoch
# of 5 batches (275 steps) still logs train/loss_step 5 times: the warning does not apply.
warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging interval")

HISTORY_FILE = "history.json"
HPARAM_METRICS = ("val/acc", "test/acc", "test/loss")  # the HParams tab's metric columns


class ConfigError(ValueError):
    """A config value is out of range; the message names the key, the value and what is allowed."""


# Errors whose message already says what to do: printed as one line, without a traceback.
EXPECTED_ERRORS = (ConfigError, DataError, DivergenceError)


def started_externally() -> bool:
    """Whether one process per device was started before this one: by torchrun, SLURM or run_ranks.

    LOCAL_RANK is Lightning's own sign (LightningEnvironment.creates_processes_externally).
    """
    return TorchElasticEnvironment.detect() or SLURMEnvironment.detect() or "LOCAL_RANK" in os.environ


def ddp_strategy(**kwargs: Any) -> DDPStrategy:
    """DDP that is safe under Hydra, multiruns included.

    Lightning's default DDP launcher re-runs the script for each extra rank with the original
    command line, so under `-m` rank 1 re-runs the whole sweep in a new sweep dir
    (Lightning-AI/pytorch-lightning#11300, facebookresearch/hydra#2070). run() never lets
    Lightning start the ranks: it spawns them itself, once per job (see `run_ranks`), and in
    each rank, as under torchrun or SLURM, the processes are started already and Lightning's
    default ("popen") launcher starts nothing. "spawn" is for a Trainer built outside run():
    there Lightning spawns the ranks from inside the job (no re-run of the script, no Hydra in them).
    """
    return DDPStrategy(start_method="popen" if started_externally() else "spawn", **kwargs)


def ranks_to_start(cfg: DictConfig) -> int:
    """How many DDP processes run() must start itself: 0 unless Lightning would start them.

    Lightning would, with a DDP strategy (ddp_strategy, or "auto" on several devices) on one
    node when nothing has started the processes already. A throwaway Trainer answers, so that
    devices are counted as Lightning counts them (devices=-1: all visible GPUs).
    """
    if started_externally():
        return 0
    disabled = logging.root.manager.disable
    try:
        with warnings.catch_warnings():  # its device messages come again from the job's real Trainer
            warnings.simplefilter("ignore")
            logging.disable(logging.INFO)
            probe = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    except Exception:  # noqa: BLE001 - a broken trainer config is reported by run() like any other
        return 0
    finally:
        logging.disable(disabled)
    strategy = probe.strategy
    starts = isinstance(strategy, DDPStrategy) and not strategy.cluster_environment.creates_processes_externally
    return probe.num_devices if starts and probe.num_nodes == 1 else 0


def run_ranks(cfg: DictConfig, ranks: int) -> dict[str, Any]:
    """Runs the whole job (fit, test, record) in `ranks` spawned DDP processes; returns rank 0's record.

    Each process gets the variables torchrun would give it (LOCAL_RANK, RANK, WORLD_SIZE, ...), so
    Lightning there finds its rank and starts nothing, and runs all of run(cfg). Lightning's own
    spawn instead starts the processes again for each fit and test call and runs the rest of
    run() in this process. Here they start once per job, rank 0 holds the whole run (one
    TensorBoard writer per stage, as in a single process), and Ctrl-C / SIGTERM reach processes
    that stop as a single-process run does: interrupted.ckpt with the trained weights, metrics.json
    "interrupted". (Lightning's spawn saved this process's untrained weights on Ctrl-C, and on
    SIGTERM died without a metrics.json and left the ranks training.)

    Ctrl-C (SIGINT, to the whole process group from a terminal, or to this process) and SIGTERM
    are passed on to the ranks, where a `StopRequest` makes them stop together; a second Ctrl-C
    kills them (when one hangs, say). An exception in a rank is raised here (rank 0's, the one in
    metrics.json, else the first reported), so train.py handles it as in a single process.
    """
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(find_free_network_port()), "WORLD_SIZE": str(ranks),
           "LOCAL_WORLD_SIZE": str(ranks), "NODE_RANK": "0"}  # + RANK and LOCAL_RANK, set in each rank
    reports = mp.get_context("spawn").SimpleQueue()  # (rank, exception or None) as each rank's run() ends
    processes: list[Any] = []
    received: list[int] = []

    def pass_on(signum: int, frame: Any) -> None:
        received.append(signum)
        again = received.count(signal.SIGINT) > 1  # a second Ctrl-C: the ranks did not stop; kill them
        for process in processes:
            if process.is_alive() and again:
                process.kill()
            elif process.is_alive():  # SIGTERM as SIGUSR1: it must not reach Lightning's SIGTERM handler
                os.kill(process.pid, signal.SIGUSR1 if signum == signal.SIGTERM else signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():  # only the main thread may set signal handlers
        previous = {signum: signal.signal(signum, pass_on) for signum in (signal.SIGINT, signal.SIGTERM)}
    # A spawned process starts by setting the default start method of its parent, which in a
    # hydra/launcher=joblib worker is loky's, unknown there ("cannot find context for 'loky'").
    start_method = multiprocessing.get_start_method(allow_none=True)
    if start_method not in multiprocessing.get_all_start_methods():
        multiprocessing.set_start_method("spawn", force=True)
    failure: Exception | None = None
    try:
        # the Hydra config as plain containers: the classes of its structured nodes do not always pickle
        # (hydra/launcher=joblib's JobLibLauncherConf, loaded twice by Hydra's plugin discovery)
        hydra_cfg = OmegaConf.to_container(HydraConfig.get(), resolve=False) if HydraConfig.initialized() else None
        context = mp.start_processes(_rank_main, args=(cfg, hydra_cfg, env, reports), nprocs=ranks, join=False,
                                     start_method="spawn")
        processes.extend(context.processes)
        while not context.join(grace_period=30):  # after a rank fails, the others get 30 s to record it
            pass
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:  # the other ranks have been stopped
        failure = err
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        multiprocessing.set_start_method(start_method, force=True)
    outcomes: dict[int, BaseException | None] = {}
    while not reports.empty():
        rank, outcome = reports.get()
        outcomes.setdefault(rank, outcome)
    errors = [outcomes[0]] if outcomes.get(0) is not None else [e for e in outcomes.values() if e is not None]
    out = Path(cfg.output_dir)
    if errors:
        raise errors[0] from failure
    if failure is not None and received:  # a rank killed by the signal before its run() could handle it
        name = "SIGTERM" if signal.SIGTERM in received else "SIGINT (Ctrl-C)"
        raise SystemExit(interrupted_message(out, name)) from failure
    if failure is not None:
        raise failure
    if 0 not in outcomes:  # a Ctrl-C that came before run() started in rank 0
        raise SystemExit(interrupted_message(out, "SIGINT (Ctrl-C)"))
    return read_metrics(out)


def _rank_main(rank: int, cfg: DictConfig, hydra_cfg: dict[str, Any] | None, env: dict[str, str],
               reports: Any) -> None:
    """One spawned DDP rank: the Hydra job's config and torchrun's variables, then all of run(cfg)."""
    stop = StopRequest()  # first: from here on a signal waits for the next training step
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    rank_zero_only.rank = rank  # before the Trainer exists: only rank 0 prints its messages
    if hydra_cfg is not None:  # run() reads the job's choices, overrides and output dir from Hydra
        setup_globals()  # Hydra's resolvers (${hydra:...}, ${now:...})
        HydraConfig.instance().cfg = OmegaConf.create({"hydra": hydra_cfg})  # what set_config leaves, untyped
    try:
        run(cfg, extra_callbacks=[stop])
    except BaseException as err:
        try:
            pickle.loads(pickle.dumps(err))
        except Exception:  # noqa: BLE001 - an exception that cannot travel: its type and message can
            err = RuntimeError(f"{type(err).__name__}: {err}")
        reports.put((rank, err))
        if isinstance(err, Exception):
            raise  # the process fails, and the parent stops the other ranks
        sys.exit(1)  # interrupted: also non-zero, so that the parent stops a rank that does not follow
    reports.put((rank, None))


class StopRequest(L.Callback):
    """Stops every DDP rank at the same training step when any of them was asked to stop.

    In a rank started by run_ranks, Ctrl-C (SIGINT) and SIGTERM (passed on as SIGUSR1) only note the
    request; at the start of each training step the ranks agree on it (one all-reduce) and all raise
    together: KeyboardInterrupt or SIGTERMException, which Lightning and run() then handle as in one
    process. Raising where a signal lands, as Lightning does, lets one rank leave for its shutdown
    while another waits in a collective for it: with Lightning's SIGTERM handler, which broadcasts
    from inside the handler, two CPU ranks were seen to deadlock. A request that comes after the last
    training step is not acted on: the job finishes its test.
    """

    def __init__(self) -> None:
        self.requested = 0  # 0: none, 1: Ctrl-C, 2: SIGTERM
        signal.signal(signal.SIGINT, self.request)
        signal.signal(signal.SIGUSR1, self.request)

    def request(self, signum: int, frame: Any) -> None:
        self.requested = max(self.requested, 2 if signum == signal.SIGUSR1 else 1)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # Reading the answer waits for the device: on a GPU only about every log_every_n_steps optimiser
        # steps, and at least once per batch (each data.steps_per_call steps; 64 > 50 by default)
        steps_per_batch = getattr(trainer.datamodule, "steps_per_call", 1)
        check_every = (1 if trainer.strategy.root_device.type == "cpu"
                       else max(1, trainer.log_every_n_steps // steps_per_batch))
        if batch_idx % check_every:
            return
        asked = torch.tensor(self.requested, device=trainer.strategy.root_device)
        asked = int(trainer.strategy.reduce(asked, reduce_op="max"))
        if asked == 2:
            raise SIGTERMException
        if asked == 1:
            raise KeyboardInterrupt


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


def check_config(cfg: DictConfig) -> None:
    """Range checks for values that no constructor sees before training starts."""
    lr = cfg.optimizer.lr
    if isinstance(lr, bool) or not isinstance(lr, Real) or not lr > 0:
        raise ConfigError(f"optimizer.lr={lr!r} must be a number > 0")
    epochs = cfg.trainer.max_epochs
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"trainer.max_epochs={epochs!r} must be an integer >= 1")
    clip = cfg.gradient_clip_val
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, Real) or not clip > 0):
        raise ConfigError(f"gradient_clip_val={clip!r} must be a number > 0, or null for no clipping")
    # Lightning does these two only in automatic optimisation; the kit steps the optimiser itself
    # (data.steps_per_call steps per Lightning batch), and Lightning's own refusal suggests a switch it cannot make
    instead = {  # key: (its value that does nothing, the fix)
        "gradient_clip_val": (None, "set the root key instead: gradient_clip_val=<max norm> (clips every step)"),
        "accumulate_grad_batches": (1, "raise data.batch_size instead (k batches of B average like one of k x B)")}
    for key, (inactive, fix) in instead.items():
        if OmegaConf.select(cfg, f"trainer.{key}", default=inactive) != inactive:
            raise ConfigError(f"trainer.{key} is not used by this kit: {fix}")
    if (error := writable_dir_error(cfg.output_dir)) is not None:
        raise ConfigError(error)


def threads_for_job(configured: int | None) -> int | None:
    """torch threads for this process: the configured number, else cores / processes run side by side.

    Side by side run hydra/launcher=joblib's n_jobs workers, each with its DDP ranks on this node
    (LOCAL_WORLD_SIZE, set by torchrun and by run_ranks). Under joblib each worker would otherwise
    start one thread per core; on a 2-core machine two such jobs were seen to run 8x to 70x slower
    than one, not 2x (issue #3). None leaves torch's default (one thread per core) for a process
    that runs alone.
    """
    if configured is not None:
        return configured
    cores = os.cpu_count() or 1
    n_jobs = 1
    if HydraConfig.initialized():
        n_jobs = OmegaConf.select(HydraConfig.get(), "launcher.n_jobs", default=1)  # only joblib has n_jobs
        n_jobs = cores if n_jobs < 0 else n_jobs  # joblib: -1 means one job per core
    processes = n_jobs * int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cores // processes) if processes > 1 else None


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
    (and without "step", the x of the logged values, see Classifier.log_step)."""
    return {k.removesuffix("_epoch"): float(v) for k, v in trainer.callback_metrics.items()
            if not k.endswith("_step") and k != "step"}


def run(cfg: DictConfig, extra_callbacks: Sequence[L.Callback] = ()) -> dict[str, Any]:
    """Trains and tests one configuration; returns the metrics.json record.

    Every outcome, failures and interruptions included, ends in metrics.json (rank 0 only).

    Args:
        cfg: the composed conf/train.yaml.
        extra_callbacks: added to the Trainer's, after the configured ones (run_ranks: StopRequest).
    """
    if (ranks := ranks_to_start(cfg)) > 0:
        return run_ranks(cfg, ranks)  # each rank runs this function again and finds its rank started
    start = time.perf_counter()
    out = Path(cfg.output_dir)
    record: dict[str, Any] = {"status": "failed", "error": None, "metrics": {}, "per_class_test_acc": {},
                              "history": [], "epochs": 0, "wall_time_s": None, "best_checkpoint": None,
                              "last_checkpoint": None, "resumed_from": cfg.ckpt_path, **hydra_job_info(),
                              "environment": environment()}
    history = EpochHistory(out / HISTORY_FILE)
    trainer: L.Trainer | None = None
    try:
        check_config(cfg)
        OmegaConf.save(cfg, out / "resolved_config.yaml", resolve=True)
        threads = threads_for_job(cfg.torch_threads)
        if threads is not None:
            torch.set_num_threads(threads)
        record["environment"]["torch_threads"] = torch.get_num_threads()
        L.seed_everything(cfg.seed, workers=True, verbose=False)

        datamodule = build(cfg, "data")
        module = Classifier(model=build_model(cfg, datamodule), loss=build(cfg, "loss"), optimizer=build(cfg, "optimizer"),
                            num_classes=datamodule.num_classes,
                            scheduler=build(cfg, "scheduler") if cfg.scheduler is not None else None,
                            gradient_clip_val=cfg.gradient_clip_val)
        logger = build(cfg, "logger")
        # trainer.enable_progress_bar=false must not meet a progress-bar callback (Lightning refuses the pair)
        names = [n for n in cfg.callbacks if n != "progress_bar" or cfg.trainer.enable_progress_bar]
        callbacks = [*(build(cfg, f"callbacks.{name}") for name in names), *extra_callbacks, history,
                     ConfigInCheckpoint(OmegaConf.to_container(cfg, resolve=True))]
        trainer = build(cfg, "trainer", logger=logger, callbacks=callbacks, default_root_dir=str(out))

        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        history_rows = read_history(out / HISTORY_FILE)  # written by rank 0, spawned or not
        checkpoint = trainer.checkpoint_callback
        best = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
        record["metrics"] = epoch_metrics(trainer)
        monitored = [row[cfg.monitor] for row in history_rows if row.get(cfg.monitor) is not None]
        if monitored:  # from the history, which holds the epochs before a resume too
            record["metrics"][f"{cfg.monitor}_best"] = max(monitored)
        trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False)
        metrics = epoch_metrics(trainer)
        record["metrics"].update({k: v for k, v in metrics.items() if not k.startswith("test/acc_class_")})
        record["per_class_test_acc"] = {name: metrics[f"test/acc_class_{i}"]
                                        for i, name in enumerate(datamodule.classes)}
        record["status"] = "ok"
        if trainer.is_global_zero:
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
        record["wall_time_s"] = round(time.perf_counter() - start, 3)
        record["history"] = read_history(out / HISTORY_FILE)
        record["epochs"] = len(record["history"])
        checkpoints = out / "checkpoints"
        if trainer is not None and trainer.checkpoint_callback is not None:
            record["best_checkpoint"] = trainer.checkpoint_callback.best_model_path or None
        record["last_checkpoint"] = str(checkpoints / "last.ckpt") if (checkpoints / "last.ckpt").exists() else None
        record["metrics"] = {k: v for k, v in record["metrics"].items() if math.isfinite(v)}
        if (trainer is None or trainer.is_global_zero) and out.is_dir() and os.access(out, os.W_OK):
            write_metrics(out, record)
