"""One run per folder, and a resume that checks what it resumes before anything trains.

- `RunFolder.claim`: a fresh run refuses a folder that holds a run already (and any run refuses a
  folder another process is running in); a resume continues the run of its folder.
- `check_resume`: ckpt_path is a readable checkpoint written by this kit, of the same experiment
  (data, model, activation, loss, optimizer, scheduler, seed, ...), with epochs left to train.
  A trainer.max_epochs changed on resume re-plans the LR schedules that follow it (`ScheduleReplan`).
- `record_is_worse`: a run that fails never overwrites a better metrics.json of its folder.
- `continue_command`: the command that continues a run, quoted for Hydra and for the shell.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shlex
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mlplab.rundir import launcher_rank
from mlplab.slurm import restart_count

log = logging.getLogger(__name__)

# The keys that make two runs the same experiment: a resume must agree with its checkpoint on all of them.
# (Lightning restores the optimiser's and the scheduler's state from the checkpoint, so a changed
# optimizer.lr or scheduler.gamma would otherwise be silently ignored.)
EXPERIMENT_KEYS = ("data", "model", "activation", "loss", "optimizer", "scheduler", "seed", "monitor",
                   "trainer.gradient_clip_val", "trainer.gradient_clip_algorithm", "trainer.precision",
                   "trainer.accumulate_grad_batches")
# ... except these, which change where the data comes from or how fast it goes, not what is learnt
FREE_KEYS = ("data.root", "data.eval_batch_size", "data.steps_per_call")
MAX_EPOCHS = "trainer.max_epochs"
LOCK_FILE = ".run.lock"  # held (flock) by the run working in the folder; stays behind, empty, after it


class ResumeError(ValueError):
    """A resume or a run folder that cannot be used as asked; the message names the file or key and the fix."""


def read_checkpoint(path: str | Path, key: str | None = "ckpt_path") -> dict[str, Any]:
    """Loads a checkpoint written by this kit (on the CPU, weights_only), or says plainly why it is not one.

    Args:
        path: the .ckpt file.
        key: the config key the user gave the path with, for the message; None for a script's positional
            argument (the message then names the path alone).

    Raises:
        ResumeError: missing, a folder, unreadable (truncated, not a checkpoint) or not written by this kit.
    """
    path = Path(path)
    given = (lambda p: f"{key}={p}") if key else str  # how the user writes it: ckpt_path=<path>, or the path
    if not path.exists():
        raise ResumeError(f"{given(path)} does not exist. Give the path of a checkpoint a run wrote, "
                          "e.g. <run dir>/checkpoints/last.ckpt")
    if path.is_dir():
        hint = next((str(p) for p in (path / "checkpoints" / "last.ckpt", path / "last.ckpt") if p.is_file()),
                    f"{path}/checkpoints/last.ckpt")
        raise ResumeError(f"{given(path)} is a folder, not a checkpoint file. Give the file, e.g. {given(hint)}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError...: all mean the same here
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ResumeError(f"{given(path)} is not a readable checkpoint ({type(err).__name__}: {reason[:120]}); it is "
                          "truncated or not a checkpoint. Give another one, e.g. the run's checkpoints/best.ckpt or "
                          "checkpoints/last.ckpt") from err
    if not isinstance(checkpoint, dict) or "config" not in checkpoint or "state_dict" not in checkpoint:
        raise ResumeError(f"{given(path)} was not written by an mlplab run (it has no 'config' entry). Give a "
                          "checkpoint from a run's checkpoints/ folder")
    return checkpoint


def finished_epochs(checkpoint: dict[str, Any]) -> int:
    """Epochs the checkpoint's run had finished (trained and validated) when it was saved."""
    return int(checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for k, v in node.items():
            flat.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return flat or {prefix: {}}
    return {prefix: node}


def _under(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _added_since(key: str, saved: dict[str, Any]) -> bool:
    """Whether `key` is missing from a checkpoint whose config has its parent: a key of a later version of
    the kit (trainer.precision, say), which a checkpoint written before it does not record."""
    parent = key.rpartition(".")[0]
    return key not in saved and bool(parent) and any(k.startswith(parent + ".") for k in saved)


def follows_max_epochs(cfg: DictConfig) -> list[str]:
    """The scheduler keys whose value is `${trainer.max_epochs}` (cosine's T_max): re-planned on resume."""
    if OmegaConf.select(cfg, "scheduler") is None:
        return []
    raw = OmegaConf.to_container(cfg.scheduler, resolve=False)
    return [f"scheduler.{k}" for k, v in raw.items() if isinstance(v, str) and v.replace(" ", "") == "${trainer.max_epochs}"]


def check_resume(cfg: DictConfig) -> ScheduleReplan | None:
    """Checks cfg.ckpt_path against the run about to start; returns the callback that re-plans its schedule, if any.

    Raises:
        ResumeError: the checkpoint is unusable, of another experiment (the message lists each differing key
            with both values), or has no epoch left to train under trainer.max_epochs.
    """
    checkpoint = read_checkpoint(cfg.ckpt_path)
    saved = _flatten(checkpoint["config"])
    here = _flatten(OmegaConf.to_container(cfg, resolve=True))
    replanned = follows_max_epochs(cfg)
    differing = sorted(k for k in set(saved) | set(here)
                       if _under(k, EXPERIMENT_KEYS) and not _under(k, FREE_KEYS) and k not in replanned
                       and saved.get(k) != here.get(k) and not _added_since(k, saved))
    if differing:
        pairs = "; ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {here.get(k)!r} here" for k in differing)
        fix = " ".join(_override(k, saved[k]) for k in differing if k in saved)
        raise ResumeError(f"ckpt_path={cfg.ckpt_path} is from another experiment: {pairs}. A resume continues the "
                          f"same experiment: add {fix} (or drop ckpt_path to start a new run)")
    done, planned = finished_epochs(checkpoint), cfg.trainer.max_epochs
    if done >= planned:
        raise ResumeError(f"ckpt_path={cfg.ckpt_path} has finished {_epochs(done)}, and trainer.max_epochs={planned}: "
                          f"nothing is left to train. To train on, raise it (trainer.max_epochs={done + 1} or more); "
                          f"to test the checkpoint again: python scripts/evaluate.py {shlex.quote(str(cfg.ckpt_path))}")
    before = saved.get(MAX_EPOCHS)
    if replanned and before != planned:
        log.warning("resuming with %s=%s (the checkpoint's run planned %s): %s re-planned to follow it; the LR "
                    "from epoch %d on is that of a %s-epoch run", MAX_EPOCHS, planned, before,
                    ", ".join(replanned), done, planned)
        return ScheduleReplan(cfg.scheduler)
    return None


def _override(key: str, value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)
    return shlex.quote(f"{key}={'null' if value is None else text}")


class ScheduleReplan(L.Callback):
    """After a resume with another trainer.max_epochs: each LR scheduler continues on the new plan.

    Lightning restores the scheduler's state (T_max included) from the checkpoint, so an extended
    cosine schedule would stay the old one: at its end, LR 0 for every epoch added. Here a fresh
    scheduler of the resumed run's config is stepped as far as the restored one had been, on a
    stand-in optimiser with the same starting LRs, and its state and LRs replace the restored ones:
    from here on the LR is what a run planned with the new max_epochs from the start would use.

    Args:
        scheduler: the resumed run's scheduler config (a partial, completed with an optimiser).
    """

    def __init__(self, scheduler: DictConfig) -> None:
        self.scheduler = scheduler

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for config in trainer.lr_scheduler_configs:
            restored = config.scheduler
            stand_in = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": lr}
                                        for lr in restored.base_lrs])
            fresh = instantiate(self.scheduler)(stand_in)
            for _ in range(restored.last_epoch):
                stand_in.step()  # (no gradients: nothing moves; keeps torch's step-order warning quiet)
                fresh.step()
            restored.load_state_dict(fresh.state_dict())
            for group, planned in zip(restored.optimizer.param_groups, stand_in.param_groups):
                group["lr"] = planned["lr"]


class RunFolder:
    """The claim of one run on its folder, held (flock) from the checks to the end of the run.

    A folder holds one run: a fresh run is refused where another one has trained (its checkpoints or
    history are there) or is running now; a resume is refused only where another process is running,
    or where the folder holds a run and the checkpoint comes from another folder.

    Args:
        fd: the open lock file, or None where nothing is claimed (ranks other than 0; an unwritable
            folder, which the config check then reports).
    """

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    @classmethod
    def claim(cls, out: str | Path, ckpt_path: str | None, rank: int = 0) -> RunFolder:
        """Claims `out` for this run, or raises ResumeError saying why not and what to do.

        Args:
            out: the run folder.
            ckpt_path: the checkpoint resumed (cfg.ckpt_path), None for a fresh run.
            rank: this process's global rank: only rank 0 claims (the ranks of one run share the folder).
        """
        out = Path(out)
        if rank != 0:
            return cls(None)
        try:
            out.mkdir(parents=True, exist_ok=True)
            fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return cls(None)  # unwritable: check_config says so, with the fix
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ResumeError(f"{out} is in use by another run (process {holder}). A folder holds one run: "
                              "choose another with hydra.run.dir=<new folder>, or leave it out for a new dated one")
        try:
            refusal = refusal_of(out, ckpt_path)
            if refusal is not None:
                raise ResumeError(refusal)
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the file releases the flock
            self.fd = None


def refusal_of(out: Path, ckpt_path: str | None) -> str | None:
    """Why a run (fresh, or resuming ckpt_path) may not use the folder `out`; None if it may."""
    held = holds_run(out)
    if held is None:
        return None
    if ckpt_path is None:
        last = out / "checkpoints" / "last.ckpt"
        resume = (f"; or continue that run with: {continue_command(recorded_overrides(out), last, out)}"
                  if last.is_file() else "")
        return (f"{out} already holds a run ({held}). A folder holds one run: start this one in another folder "
                f"(hydra.run.dir=<new folder>, or leave it out for a new dated one){resume}")
    checkpoint = Path(ckpt_path)
    if checkpoint.is_file() and out.resolve() not in checkpoint.resolve().parents:  # (an unusable one: check_resume)
        return (f"{out} already holds a run ({held}), and ckpt_path={ckpt_path} comes from another folder. Resume "
                f"a run in its own folder (hydra.run.dir={_hydra_quote(str(checkpoint.parent.parent))}), or "
                "into a new one")
    return None


class RunFolderCheck(Callback):
    """A Hydra callback: refuses a run's folder before Hydra writes its .hydra/ files into it (see refusal_of).

    RunFolder.claim checks again in run(), under the folder's lock, where two runs start at once.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        out = Path(str(config.hydra.run.dir))
        if launcher_rank() == 0 and (refusal := refusal_of(out, checkpoint_to_resume(out, config.ckpt_path))):
            raise SystemExit(f"error: {refusal}")


def checkpoint_to_resume(out: Path, ckpt_path: str | None) -> str | None:
    """ckpt_path; or, in a job SLURM has requeued (time limit, preemption, node failure) and given no
    ckpt_path, the last.ckpt its earlier attempt left in `out`, from which the run continues."""
    last = Path(out) / "checkpoints" / "last.ckpt"
    if ckpt_path is None and restart_count() > 0 and last.is_file():
        return str(last)
    return ckpt_path


def still_good(out: Path) -> str:
    """The run files of `out` that are whole, e.g. "checkpoints/last.ckpt (2 epochs), history.json (2 epochs)"."""
    parts = []
    for path in sorted((out / "checkpoints").glob("*.ckpt")):
        try:
            parts.append(f"checkpoints/{path.name} ({_epochs(finished_epochs(read_checkpoint(path)))})")
        except (ResumeError, KeyError):
            pass  # not whole: not listed
    try:
        parts.append(f"history.json ({_epochs(len(json.loads((out / 'history.json').read_text())))})")
    except (OSError, ValueError, TypeError):
        pass
    if (record := _read_record(out)) is not None:
        parts.append(f"metrics.json ({record.get('status')}, {_epochs(record.get('epochs'))})")
    return ", ".join(parts) or "nothing yet"


def _epochs(n: Any) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def holds_run(out: Path) -> str | None:
    """What in `out` shows that a run trained there ("2 checkpoints, 3 epochs in history.json"), or None.

    A run that failed its config check left only a metrics.json with no epoch: that folder is free.
    """
    signs = []
    if checkpoints := sorted((out / "checkpoints").glob("*.ckpt")):
        signs.append(f"checkpoints {', '.join(p.name for p in checkpoints)}")
    record = _read_record(out)
    if record is not None and (record.get("epochs") or record.get("status") == "ok"):
        signs.append(f"metrics.json: {record.get('status')}, {_epochs(record.get('epochs'))}")
    elif (out / "history.json").is_file():
        signs.append("history.json")
    return "; ".join(signs) or None


def _read_record(out: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def recorded_overrides(out: Path) -> list[str]:
    """The overrides the run of `out` was started with, from its metrics.json (empty if unreadable)."""
    record = _read_record(out) or {}
    overrides = record.get("overrides")
    return [str(o) for o in overrides] if isinstance(overrides, list) else []


STATUS_RANK = {"failed": 0, "interrupted": 1, "ok": 2}  # what a record is worth, at equal epochs


def record_is_worse(out: str | Path, record: dict[str, Any]) -> bool:
    """Whether `record` would replace a better metrics.json in `out`: fewer epochs, or as many and a worse status.

    A resume that fails before it trains (a bad value, a wrong checkpoint) then leaves the folder's record as
    it was; its error is still printed.
    """
    old = _read_record(Path(out))
    if old is None:
        return False
    old_epochs, new_epochs = old.get("epochs") or 0, record.get("epochs") or 0
    if new_epochs != old_epochs:
        return new_epochs < old_epochs
    return STATUS_RANK.get(record.get("status"), 0) < STATUS_RANK.get(old.get("status"), 0)


# Hydra reads an unquoted value made of these characters as the string itself; any other value is quoted
# (job dirs hold '=' and ',', which Hydra's grammar reads as a key and a sweep: "mismatched input '='").
_HYDRA_PLAIN = re.compile(r"[A-Za-z0-9_/.\-+]+")


def _hydra_quote(value: str) -> str:
    if _HYDRA_PLAIN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def continue_command(overrides: Sequence[str], last: str | Path, out: str | Path) -> str:
    """`python train.py <the run's overrides> ckpt_path=<last> hydra.run.dir=<out>`, ready to paste into a shell.

    Args:
        overrides: the run's command-line overrides as Hydra recorded them (an earlier ckpt_path is dropped).
        last: the checkpoint to continue from.
        out: the run folder, which the resumed run continues to fill.
    """
    kept = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] != "ckpt_path"]
    args = [*kept, f"ckpt_path={_hydra_quote(str(last))}", f"hydra.run.dir={_hydra_quote(str(out))}"]
    return " ".join(["python train.py", *(shlex.quote(a) for a in args)])
