"""The run folder's file names, whether a folder can be written, and which process writes it.

Nothing here imports Lightning or torch: the entry point, the sweep report and the records read
these before (or without) the heavy libraries loading.
"""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

METRICS_FILE = "metrics.json"  # the run's outcome, written by global rank 0 at the end and on every failure
HISTORY_FILE = "history.json"  # one row per finished epoch, rewritten after each
RESOLVED_CONFIG_FILE = "resolved_config.yaml"  # the config as it ran, interpolations resolved


def unwritable(folder: Path) -> OSError | None:
    """The error that stops files being written into `folder` (created if need be), or None.

    Tried for real rather than with os.access, which says yes to root on a read-only mount, and with
    a file of its own, gone when closed: DDP ranks probe the same folder at the same moment, and a
    shared name let one rank delete the other's probe first (ENOENT, reported as "not writable").
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        return err
    return None


def writable_dir_error(path: str | Path) -> str | None:
    """Why `path` cannot be made into a writable folder, or None if it can (it is then created)."""
    if (err := unwritable(Path(path))) is not None:
        return (f"output folder {str(path)!r} is not writable ({err.strerror}). Run from a folder you can write "
                "to, or choose another with hydra.run.dir=/writable/path (hydra.sweep.dir=... with -m).")
    return None


def launcher_rank() -> int:
    """This process's global rank as torchrun (RANK) or srun (SLURM_PROCID) set it; 0 when started alone."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


EARLY_SIGNALS: list[int] = []  # signals that came while hold_signals held them, oldest first


def hold_signals(*signums: int) -> None:
    """Notes each of `signums` in EARLY_SIGNALS, instead of its default action (ending the process), until
    mlplab.launch.StopRequest takes them over and acts on those noted at the first training step.

    SLURM's time-limit warning (scripts/train.sbatch: SIGUSR1 120 s before --time) can reach a job with a
    shorter --time while train.py is still loading its libraries.
    """
    for signum in signums:
        signal.signal(signum, lambda received, frame: EARLY_SIGNALS.append(received))
