"""Train and test one configuration, or a sweep of them with -m.

    python train.py                              # MLP on MNIST, the defaults in conf/train.yaml
    python train.py -m activation=relu,selu      # one job per value, under outputs/multirun/
"""

import atexit
import gc

# The imports below create hundreds of thousands of long-lived objects (torch, Lightning, Hydra), and each
# full collection while they load walks all those made so far, a visible share of start-up (README,
# Performance). Collection waits until they are loaded; then they are frozen, out of later collections' way.
gc.disable()

import os
import signal

from mlplab.rundir import hold_signals

if "SLURM_STEP_ID" in os.environ:  # an srun task: SLURM's time-limit warning may come while the libraries load
    hold_signals(signal.SIGUSR1)

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from mlplab.launch import launch
from mlplab.report import report_sweep
from mlplab.rundir import launcher_rank
from mlplab.train import EXPECTED_ERRORS

gc.freeze()
gc.enable()
atexit.register(gc.unfreeze)  # the exit's last collection frees them (nanobind, in triton, reports leaks otherwise)

log = logging.getLogger("mlplab")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        record = launch(cfg)
    except SystemExit:  # interrupted (Ctrl-C, SIGTERM): a sweep stops here, reporting the jobs that ran
        if multirun and launcher_rank() == 0:
            report_sweep(Path(str(HydraConfig.get().sweep.dir)), cfg.acc_threshold)
        raise
    except Exception as err:
        # run() has recorded the failure in the job's metrics.json. A sweep goes on with its
        # other jobs (the sweep report exits non-zero at the end); a single run stops here.
        if multirun:
            log.error("job failed: %s: %s (recorded in %s/metrics.json)", type(err).__name__, err, cfg.output_dir)
            return None
        if isinstance(err, EXPECTED_ERRORS):
            sys.exit(f"error: {err}" if launcher_rank() == 0 else 1)  # under srun or torchrun: one line, rank 0's
        raise
    metrics = record["metrics"]
    if launcher_rank() == 0:  # under torchrun or srun every rank runs this script: rank 0 reports
        tested = "".join(f"{name} {metrics[name]:.4f}  " for name in ("test/acc", "test/loss") if name in metrics)
        print(f"{tested}{record['epochs']} epochs  {record['wall_time_s']:.1f} s  {cfg.output_dir}")
    return metrics.get("val/acc")  # what an Optuna sweep maximises; None where no val pass ran


if __name__ == "__main__":
    main()
