"""Starting the processes of a job: DDP ranks the kit spawns itself, the signals passed to them, their stop agreement.

train.py (the entry point) calls `launch(cfg)`: one process runs mlplab.train.run(cfg) directly; a DDP
job on one node that nothing else started (torchrun, SLURM) runs it in `ranks_to_start(cfg)` spawned
processes, each of which runs run(cfg) once, top to bottom, as a single process does.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.multiprocessing as mp
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import setup_globals
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.fabric.plugins.environments.lightning import find_free_network_port
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from mlplab.record import read_history, read_metrics
from mlplab.resume import checkpoint_to_resume
from mlplab.rundir import EARLY_SIGNALS, HISTORY_FILE, launcher_rank
from mlplab.slurm import SigtermTo, TimeLimitStop, in_step, requeue, restart_count, time_limit_signal
from mlplab.train import interrupted_message, run

log = logging.getLogger(__name__)


def launch(cfg: DictConfig) -> dict[str, Any]:
    """Runs the job of `cfg` (fit, test, record) and returns its metrics.json record.

    In this process, or, where Lightning would start DDP ranks itself, in ranks spawned here (run_ranks).
    In a job SLURM has requeued, the run continues from the checkpoint its earlier attempt left.
    """
    out = Path(cfg.output_dir)
    if (ckpt_path := checkpoint_to_resume(out, cfg.ckpt_path)) != cfg.ckpt_path:
        log.info("SLURM requeued this job (restart %d): continuing from %s", restart_count(), ckpt_path)
        cfg.ckpt_path = ckpt_path
    if (ranks := ranks_to_start(cfg)) > 0:
        return run_ranks(cfg, ranks)
    if not in_step():
        return run(cfg)
    # scancel signals every rank srun started: they stop together, as run_ranks' ranks do; so does the signal
    # SLURM sends before the job's time limit, after which the job is requeued (run_until_time_limit)
    limit = time_limit_signal()
    submitit_handler = signal.getsignal(limit) if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" else None
    stop = StopRequest({signal.SIGINT: StopRequest.INTERRUPT, signal.SIGTERM: StopRequest.TERMINATE,
                        limit: StopRequest.TIME_LIMIT})
    epochs_before = len(read_history(out / HISTORY_FILE))
    try:
        return run(cfg, extra_callbacks=[stop, SigtermTo(stop.request)])
    except SystemExit as err:
        if stop.agreed != StopRequest.TIME_LIMIT or launcher_rank() != 0:
            raise
        raise SystemExit(requeue_after_time_limit(cfg, str(err.code), limit, submitit_handler, epochs_before)) \
            from err


def requeue_after_time_limit(cfg: DictConfig, stopped: str, limit: signal.Signals, submitit_handler: Any,
                             epochs_before: int) -> str:
    """Requeues a job stopped by SLURM's time-limit signal, where this attempt finished an epoch; returns
    `stopped` (run()'s interruption message) and a line on what was done.

    A job whose attempt finished no epoch is not requeued: the next attempt would start from the same
    checkpoint and stop at the same point, for ever.
    """
    out = Path(cfg.output_dir)
    epochs = len(read_history(out / HISTORY_FILE))
    if epochs <= epochs_before:
        return (f"{stopped}\n{limit.name}: SLURM's time limit is near, and this attempt finished no epoch: the job "
                "is not requeued, as the next attempt would stop at the same point. Give the job more time (sbatch "
                "--time, hydra.launcher.timeout_min) and continue it with the command above")
    line = (f"{stopped}\n{limit.name}: SLURM's time limit is near; {epochs} epochs are saved. The requeued job "
            f"continues from {out / 'checkpoints' / 'last.ckpt'} into {out}")
    if submitit_handler is not None:  # submitit's handler requeues and exits (sys.exit): say it all first
        print(line, file=sys.stderr, flush=True)
    return f"{line}: {requeue(limit, submitit_handler)}"


def started_externally() -> bool:
    """Whether one process per device was started before this one: by torchrun, SLURM or run_ranks.

    LOCAL_RANK is Lightning's own sign (LightningEnvironment.creates_processes_externally).
    """
    return TorchElasticEnvironment.detect() or SLURMEnvironment.detect() or "LOCAL_RANK" in os.environ


def ddp_strategy(**kwargs: Any) -> DDPStrategy:
    """DDP that is safe under Hydra, multiruns included.

    Lightning's default DDP launcher re-runs the script for each extra rank with the original
    command line, so under `-m` rank 1 re-runs the whole sweep in a new sweep dir
    (Lightning-AI/pytorch-lightning#11300, facebookresearch/hydra#2070). The kit never lets
    Lightning start the ranks: launch() spawns them itself, once per job (see `run_ranks`), and in
    each rank, as under torchrun or SLURM, the processes are started already and Lightning's
    default ("popen") launcher starts nothing. "spawn" is for a Trainer built outside the kit's launch:
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
    # The ranks fork from multiprocessing's forkserver, a fresh interpreter that has imported the kit once (the
    # main module, train.py, and this module): a rank then starts without Python's imports, and a multirun's later
    # jobs reuse it. It was started with the environment of its first job, so each rank gets this one's whole.
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(find_free_network_port()),
           "WORLD_SIZE": str(ranks), "LOCAL_WORLD_SIZE": str(ranks), "NODE_RANK": "0"}  # + RANK, LOCAL_RANK in each
    forkserver = multiprocessing.get_context("forkserver")
    forkserver.set_forkserver_preload(["__main__", __name__])  # read when the server starts, the first time
    reports = forkserver.SimpleQueue()  # (rank, exception or None) as each rank's run() ends
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
                                     start_method="forkserver")
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
    # first: from here on a signal waits for the next training step
    stop = StopRequest({signal.SIGINT: StopRequest.INTERRUPT, signal.SIGUSR1: StopRequest.TERMINATE})
    os.environ.clear()  # the forkserver's, from when it started
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

    The signals given (in a rank started by run_ranks: Ctrl-C, and SIGTERM passed on as SIGUSR1; in a task
    srun started: Ctrl-C, SIGTERM, see mlplab.slurm.SigtermTo, and SLURM's time-limit signal) only note the
    request; at the start of each training step the ranks agree on it (one all-reduce of the strongest
    request) and all raise together: KeyboardInterrupt, SIGTERMException or TimeLimitStop, which Lightning
    and run() then handle as in one process. Raising where a signal lands, as Lightning does, lets one rank
    leave for its shutdown while another waits in a collective for it: with Lightning's SIGTERM handler,
    which broadcasts from inside the handler, two CPU ranks were seen to deadlock. A request that comes
    after the last training step is not acted on: the job finishes its test.

    Args:
        signals: {signal: what it asks for (TIME_LIMIT, INTERRUPT or TERMINATE)}; a handler is set for each.
    """

    TIME_LIMIT, INTERRUPT, TERMINATE = 1, 2, 3  # when several come, the strongest wins: scancel beats the rest

    def __init__(self, signals: dict[int, int]) -> None:
        self.levels = dict(signals)
        self.requested = 0  # 0: none
        self.agreed = 0  # what the ranks stopped for
        for signum in signals:
            signal.signal(signum, self.request)
        for signum in EARLY_SIGNALS:  # those that came before this existed (mlplab.rundir.hold_signals)
            if self.levels.get(signum) == self.TIME_LIMIT:  # stopping now would leave nothing to requeue
                log.warning("SLURM's time-limit warning (%s) came before training started: the job's --time is "
                            "shorter than the warning's lead (scripts/train.sbatch: 120 s). Training on; at the "
                            "limit SLURM's SIGTERM stops the run as scancel does, and it is not requeued",
                            signal.Signals(signum).name)
            elif signum in signals:
                self.request(signum, None)

    def request(self, signum: int, frame: Any) -> None:
        self.requested = max(self.requested, self.levels.get(signum, self.TERMINATE))

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
        self.agreed = int(trainer.strategy.reduce(asked, reduce_op="max"))
        if self.agreed == self.TERMINATE:
            raise SIGTERMException
        if self.agreed == self.INTERRUPT:
            raise KeyboardInterrupt
        if self.agreed == self.TIME_LIMIT:
            raise TimeLimitStop
