"""Issue #14, case 1: a write that fails (a full disk) leaves the previous file whole and ends in one line."""

from __future__ import annotations

import errno
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY, PrewarmedProcess, read_json, run_cli, start_cli
from mlplab.atomic import WriteError, write_atomically
from mlplab.record import write_json


def test_a_failed_write_leaves_the_previous_file_and_no_temporary_one(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"status": "ok"})

    def fill_then_fail(f) -> None:
        f.write(b"half of a new file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(WriteError, match=rf"^No space left on device while writing {target}$"):
        write_atomically(target, fill_then_fail)
    assert read_json(target) == {"status": "ok"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs mounted for the test: a disk that really fills up (root and CAP_SYS_ADMIN needed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here: the full-disk test needs a small tmpfs")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave_kb: int) -> Path:
    """Fills `disk` up to `leave_kb` KiB of free space; returns the filler file."""
    stat = os.statvfs(disk)
    filler = disk / "filler"
    size = stat.f_bavail * stat.f_frsize - leave_kb * 1024
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, size)
    return filler


def start_run(out: Path, data_root: Path, cwd: Path) -> subprocess.Popen | PrewarmedProcess:
    args = [*TINY, "trainer.max_epochs=6", "~callbacks.parameter_histograms"]
    return start_cli([*args, f"hydra.run.dir={out}"], data_root, cwd)


def wait_for(proc: subprocess.Popen, *paths: Path) -> None:
    deadline = time.time() + 180
    while not all(p.exists() for p in paths) and time.time() < deadline:
        assert proc.poll() is None, f"the run ended before the disk filled: {proc.communicate()[1]}"
        time.sleep(0.02)


def one_error_line(proc: subprocess.Popen, out: Path) -> str:
    """The run's last stderr line, after checking that it failed on the full disk without a traceback."""
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode != 0, "the run finished before the disk was full"
    assert "Traceback" not in stderr, stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: No space left on device while writing {out}/"), stderr
    assert not list(out.rglob(".*.tmp"))  # no temporary file left taking the space
    return line


def test_a_disk_full_before_the_first_checkpoint_leaves_no_broken_one(small_disk, data_root, tmp_path):
    out = small_disk / "run"
    proc = start_run(out, data_root, tmp_path)
    wait_for(proc, out / "resolved_config.yaml")  # written before the data is loaded: training has not begun
    fill(small_disk, leave_kb=48)  # room for the small JSON files, none for a 1.6 MB checkpoint
    line = one_error_line(proc, out)
    assert "Still good: " in line
    for path in (out / "checkpoints").glob("*.ckpt"):  # (there should be none) never a truncated one
        torch.load(path, weights_only=True)


def test_a_full_disk_keeps_the_last_good_checkpoints_and_ends_in_one_line(small_disk, data_root, tmp_path):
    out = small_disk / "run"
    proc = start_run(out, data_root, tmp_path)
    last, best = out / "checkpoints" / "last.ckpt", out / "checkpoints" / "best.ckpt"
    wait_for(proc, last, best)
    filler = fill(small_disk, leave_kb=48)
    line = one_error_line(proc, out)
    assert "Still good: checkpoints/best.ckpt (" in line and "checkpoints/last.ckpt (" in line
    for path in (best, last):  # the previous versions, whole
        checkpoint = torch.load(path, weights_only=True)
        assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())
    if (out / "metrics.json").exists():
        assert read_json(out / "metrics.json")["status"] == "failed"

    # once there is space again, the command in the message continues the run
    filler.unlink()
    argv = shlex.split(line.split("continue with: ", 1)[1])
    assert argv[:2] == ["python", "train.py"]
    result = run_cli(argv[2:], data_root, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert read_json(out / "metrics.json")["epochs"] == 6
