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

from mlplab.record import read_metrics
from mlplab.slurm import SigtermTo, in_step
from mlplab.train import interrupted_message, run


def launch(cfg: DictConfig) -> dict[str, Any]:
    """Runs the job of `cfg` (fit, test, record) and returns its metrics.json record.

    In this process, or, where Lightning would start DDP ranks itself, in ranks spawned here (run_ranks).
    """
    if (ranks := ranks_to_start(cfg)) > 0:
        return run_ranks(cfg, ranks)
    if in_step():  # scancel signals every rank srun started: they stop together, as run_ranks' ranks do
        stop = StopRequest()
        return run(cfg, extra_callbacks=[stop, SigtermTo(stop.request)])
    return run(cfg)


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

    In a rank started by run_ranks, Ctrl-C (SIGINT) and SIGTERM (passed on as SIGUSR1), and in a task
    srun started, SIGTERM itself (see mlplab.slurm.SigtermTo), only note the request; at the start of
    each training step the ranks agree on it (one all-reduce) and all raise together: KeyboardInterrupt
    or SIGTERMException, which Lightning and run() then handle as in one process. Raising where a
    signal lands, as Lightning does, lets one rank leave for its shutdown while another waits in a
    collective for it: with Lightning's SIGTERM handler, which broadcasts from inside the handler, two
    CPU ranks were seen to deadlock. A request that comes after the last training step is not acted
    on: the job finishes its test.
    """

    def __init__(self) -> None:
        self.requested = 0  # 0: none, 1: Ctrl-C, 2: SIGTERM
        signal.signal(signal.SIGINT, self.request)
        signal.signal(signal.SIGUSR1, self.request)

    def request(self, signum: int, frame: Any) -> None:
        self.requested = max(self.requested, 2 if signum in (signal.SIGUSR1, signal.SIGTERM) else 1)

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
