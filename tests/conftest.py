"""Shared fixtures: a small learnable dataset written as real IDX files, and ways to run the kit.

Integration tests run the real entry point (train.py) in a subprocess, or compose conf/train.yaml
in-process and call mlplab.train.run, always on the CPU with tiny limits, writing into tmp_path.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
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


def run_cli(args: list[str], data_root: Path, cwd: Path, timeout: float = 240, **kwargs) -> subprocess.CompletedProcess:
    """`python train.py <args>` in a subprocess, with DATA_DIR=data_root, from cwd."""
    env = {**os.environ, "DATA_DIR": str(data_root), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(TRAIN_PY), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
