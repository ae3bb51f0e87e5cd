"""Shared fixtures: a small learnable dataset written as real IDX files, and ways to run the kit.

Integration tests run the real entry point (train.py) in a subprocess, or compose conf/train.yaml
in-process and call mlplab.train.run, always on the CPU with tiny limits, writing into tmp_path.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mlplab.data import DATASETS
from mlplab.idx import IDX_FILES

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TRAIN_PY = ROOT / "train.py"

# Tiny settings for any run: the CPU and conf/debug/tiny.yaml (one epoch of small batches, no progress bar).
TINY = ["trainer=cpu", "debug=tiny"]
# debug=tiny turns the test figures off; the tests that look at them put them back
TEST_FIGURES_ON = ["callbacks.test_figures={_target_:mlplab.figures.TestFigures,image_shape:[28,28]}"]


def write_idx_dataset(root: Path, folder: str, n_train: int = 1200, n_test: int = 400, seed: int = 0) -> None:
    """Writes a learnable 10-class dataset in torchvision's layout: root/folder/raw/<4 IDX files>.

    Each class is a fixed random 28x28 prototype; an image is its class's prototype plus noise,
    so a small MLP separates them within a few steps, and accuracies mean something.
    """
    rng = np.random.default_rng(seed)
    prototypes = rng.integers(0, 256, size=(10, 28, 28))
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, size=n)
        images = np.clip(0.6 * prototypes[labels] + rng.normal(0, 60, size=(n, 28, 28)), 0, 255).astype(np.uint8)
        files = IDX_FILES[split]
        (raw / files["images"]).write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / files["labels"]).write_bytes(struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MNIST/ and FashionMNIST/ folders of synthetic IDX files (1200 train, 400 test images each)."""
    root = tmp_path_factory.mktemp("data")
    for i, info in enumerate(DATASETS.values()):
        write_idx_dataset(root, info.folder, seed=i)
    return root


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """The real MNIST / Fashion-MNIST files from $DATA_DIR (CI sets it to ../shared/data)."""
    root = os.environ.get("DATA_DIR")
    if not root or not all((Path(root) / info.folder / "raw").is_dir() for info in DATASETS.values()):
        pytest.skip("DATA_DIR does not point at MNIST/raw and FashionMNIST/raw (set it to run real-data tests)")
    return Path(root)


def compose_config(overrides: list[str], output_dir: Path, data_root: Path) -> DictConfig:
    """conf/train.yaml composed as `python train.py <overrides>` would, writing into output_dir."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[*TINY, f"data.root={data_root}", f"output_dir={output_dir}", *overrides])


def cli_env(data_root: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default this process's) with DATA_DIR=data_root and HYDRA_FULL_ERROR=0 (the kit's one-line errors)."""
    return {**(os.environ if env is None else env), "DATA_DIR": str(data_root), "HYDRA_FULL_ERROR": "0"}


def start_script(script: Path, args: list[str], cwd: Path, env: dict[str, str],
                 start_new_session: bool = False) -> subprocess.Popen | PrewarmedProcess:
    """`python <script> <args>` started from cwd with env: forked from this test process's PrewarmedScripts
    (tests/prewarmed.py), or a fresh interpreter where MLPLAB_TEST_FRESH_PROCESSES=1. Either way a process
    of its own, to poll, signal, wait for and communicate with as a subprocess.Popen(..., text=True) with
    stdout and stderr piped."""
    if os.environ.get("MLPLAB_TEST_FRESH_PROCESSES") == "1":
        return subprocess.Popen([sys.executable, str(script), *map(str, args)], cwd=cwd, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=start_new_session, preexec_fn=default_sigint)
    return PrewarmedScripts.instance().start(script, args, cwd, env, start_new_session)


def default_sigint() -> None:
    """SIGINT back to its default in a child about to exec: a background job of a non-interactive shell
    (`bash .ci/run &`) starts with it ignored, which every process started from it would inherit."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_script(script: Path, args: list[str], cwd: Path, env: dict[str, str],
               timeout: float = 240) -> subprocess.CompletedProcess:
    """`python <script> <args>` run to its end, as subprocess.run(..., capture_output=True, text=True) reports it."""
    proc = start_script(script, args, cwd, env)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def start_cli(args: list[str], data_root: Path, cwd: Path, env: dict[str, str] | None = None,
              start_new_session: bool = False) -> subprocess.Popen | PrewarmedProcess:
    """`python train.py <args>` started from cwd with cli_env(data_root, env) (see start_script)."""
    return start_script(TRAIN_PY, args, cwd, cli_env(data_root, env), start_new_session)


def run_cli(args: list[str], data_root: Path, cwd: Path, timeout: float = 240,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python train.py <args>` run to its end from cwd with cli_env(data_root, env) (see run_script)."""
    return run_script(TRAIN_PY, args, cwd, cli_env(data_root, env), timeout)


class PrewarmedProcess:
    """A child of tests/prewarmed.py, with the part of subprocess.Popen's interface the tests use."""

    def __init__(self, server: PrewarmedScripts, pid: int, args: list[str], stdout: Path, stderr: Path) -> None:
        self.server, self.pid, self.args = server, pid, args
        self.stdout_path, self.stderr_path = stdout, stderr
        self.returncode: int | None = None

    def poll(self) -> int | None:
        self.returncode = self.server.exit_codes.get(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        with self.server.changed:
            if not self.server.changed.wait_for(lambda: self.pid in self.server.exit_codes, timeout):
                raise subprocess.TimeoutExpired(self.args, timeout)
        return self.poll()

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return self.stdout_path.read_text(), self.stderr_path.read_text()

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class PrewarmedScripts:
    """This test process's tests/prewarmed.py: scripts run forked from a process that has imported the
    kit, each paying no imports (about 10 s of CPU otherwise). One per pytest process (xdist worker),
    started at its first use and ended with the session; a thread reads its answers."""

    _instance: PrewarmedScripts | None = None

    @classmethod
    def instance(cls) -> PrewarmedScripts:
        if cls._instance is None or cls._instance.server.poll() is not None:
            cls._instance = cls()
        return cls._instance

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="mlplab-prewarmed-"))
        self.log = self.folder / "server.log"  # what the imports printed (warnings), and a crash if any
        with open(self.log, "w") as log:
            self.server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "prewarmed.py")], cwd=ROOT,
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
        self.changed = threading.Condition()
        self.started: list[int] = []  # pids not yet handed out, in the order of the requests
        self.exit_codes: dict[int, int] = {}
        self.children = 0
        self.lock = threading.Lock()  # one request at a time, so that each gets its own "started" answer
        threading.Thread(target=self.read_answers, daemon=True).start()

    def read_answers(self) -> None:
        for line in self.server.stdout:
            kind, pid, *code = line.split()
            with self.changed:
                if kind == "started":
                    self.started.append(int(pid))
                else:
                    self.exit_codes[int(pid)] = int(code[0])
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def start(self, script: Path, args: list[str], cwd: Path, env: dict[str, str],
              start_new_session: bool = False) -> PrewarmedProcess:
        with self.lock:
            self.children += 1
            stdout, stderr = self.folder / f"{self.children}.out", self.folder / f"{self.children}.err"
            request = {"script": str(script), "argv": [str(a) for a in args], "cwd": str(cwd), "env": dict(env),
                       "stdout": str(stdout), "stderr": str(stderr), "start_new_session": start_new_session}
            self.server.stdin.write(json.dumps(request) + "\n")
            self.server.stdin.flush()
            with self.changed:
                if not self.changed.wait_for(lambda: self.started or self.server.poll() is not None, 300):
                    raise RuntimeError(f"tests/prewarmed.py did not answer; its log, {self.log}:\n{self.log.read_text()}")
                if not self.started:
                    raise RuntimeError(f"tests/prewarmed.py ended; its log, {self.log}:\n{self.log.read_text()}")
                pid = self.started.pop(0)
        return PrewarmedProcess(self, pid, [sys.executable, str(script), *map(str, args)], stdout, stderr)

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=30)
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _close_prewarmed_scripts():
    yield
    if PrewarmedScripts._instance is not None:
        PrewarmedScripts._instance.close()


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# The files that take longest, first: pytest-xdist (--dist loadfile, pyproject.toml) hands whole files to its
# workers in collection order, and the SLURM tests, mostly waiting on the cluster, would otherwise start last
# and run alone at the end.
LONGEST_FIRST = ("test_slurm.py", "test_distributed.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file's tests keep their order
