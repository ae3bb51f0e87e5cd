"""MNIST and Fashion-MNIST: their constants, and the DataModule that holds them as device-resident tensors.

Each split is parsed once (mlplab.idx) into one normalised float tensor that lives on the training
device, and served in shuffled slices (mlplab.batching).
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
from torch import Tensor
from torchvision import datasets

from mlplab.batching import EpochShard, TensorBatches
from mlplab.idx import IDX_FILES, DataError, ensure_split_files, load_split


@dataclass(frozen=True)
class DatasetInfo:
    """What the rest of the kit needs to know about a dataset."""

    name: str  # its key in DATASETS, as data.dataset names it
    torchvision_class: type[datasets.MNIST]
    mean: float  # of the 60k training pixels, scaled to [0, 1]
    std: float
    classes: tuple[str, ...]
    image_shape: tuple[int, int] = (28, 28)
    train_size: int = 60_000  # images in the official training split (train + val here)
    acc_threshold: float = 0.97  # val/acc that counts as learnt, for "epochs to threshold" (root key acc_threshold)

    @property
    def input_size(self) -> int:
        return self.image_shape[0] * self.image_shape[1]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def folder(self) -> str:
        return self.torchvision_class.__name__  # torchvision's layout: <root>/<folder>/raw/


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        name="mnist",
        torchvision_class=datasets.MNIST,
        mean=0.1307,
        std=0.3081,
        classes=tuple(str(d) for d in range(10)),
    ),
    "fashion_mnist": DatasetInfo(
        name="fashion_mnist",
        torchvision_class=datasets.FashionMNIST,
        mean=0.2860,
        std=0.3530,
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        acc_threshold=0.87,  # the default MLP reaches ~89% in 10 epochs, 97% is out of an MLP's reach
    ),
}


# The splits each Lightning stage reads (setup's `stage`)
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


class ImageClassificationData(L.LightningDataModule):
    """MNIST or Fashion-MNIST, split into train/val/test, held as tensors on the training device.

    Args:
        dataset: "mnist" or "fashion_mnist".
        root: folder holding `<MNIST|FashionMNIST>/raw/` (torchvision's layout).
        batch_size: samples per step on each device (per-device, not global: with N devices
            an optimiser step sees N * batch_size samples).
        val_size: images held out of the 60k training split for validation.
        split_seed: seeds the train/val split (keep it fixed so that runs share one val set).
        shuffle_seed: seeds the per-epoch training order (epoch e uses shuffle_seed + e).
        normalize: standardise pixels with the dataset's mean/std; if false, pixels stay in [0, 1].
        eval_batch_size: samples per validation/test batch (memory only; metrics don't depend on it).
        steps_per_call: optimiser steps per Lightning batch. 1 serves plain (x, y) batches, one per
            training_step, for mlplab.module.Classifier; k > 1 serves groups (StepBatches) of k for
            the fast path (mlplab.fast_path), which steps once per batch of the group.
    """

    def __init__(
        self,
        dataset: str = "mnist",
        root: str = "data",
        batch_size: int = 200,
        val_size: int = 5000,
        split_seed: int = 0,
        shuffle_seed: int = 0,
        normalize: bool = True,
        eval_batch_size: int = 10_000,
        steps_per_call: int = 1,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"dataset={dataset!r} is not one of {sorted(DATASETS)}")
        self.info = DATASETS[dataset]
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size),
                            ("steps_per_call", steps_per_call)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if isinstance(val_size, bool) or not isinstance(val_size, int) or not 0 < val_size < self.info.train_size:
            raise ValueError(f"val_size={val_size!r} must be an integer in [1, {self.info.train_size - 1}] "
                             f"(the training split has {self.info.train_size} images)")
        if batch_size > self.info.train_size - val_size:
            raise ValueError(f"batch_size={batch_size} is larger than the {self.info.train_size - val_size} "
                             f"training images left after val_size={val_size}")
        self.dataset, self.root = dataset, root
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.steps_per_call = steps_per_call
        self.val_size, self.normalize = val_size, normalize
        self.split_seed, self.shuffle_seed = split_seed, shuffle_seed
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}

    @property
    def input_size(self) -> int:
        return self.info.input_size

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def classes(self) -> tuple[str, ...]:
        return self.info.classes

    def to_inputs(self, images: Tensor) -> Tensor:
        """(N, 28, 28) uint8 -> (N, 784) float32, scaled to [0, 1] and optionally standardised."""
        x = images.reshape(len(images), -1).float().div_(255)
        if self.normalize:
            x.sub_(self.info.mean).div_(self.info.std)
        return x

    def prepare_data(self) -> None:
        # Runs once per node before the processes load: checks and, if possible, downloads.
        for split in IDX_FILES:
            ensure_split_files(self.root, self.info, split)

    def setup(self, stage: str | None = None) -> None:
        """Loads the splits that `stage` reads (fit: train and val; validate: val; test and predict: test;
        None: all three) and has not loaded yet."""
        wanted = STAGE_SPLITS.get(stage, ("train", "val", "test"))
        missing = [split for split in wanted if split not in self.splits]
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

        def on_device(images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
            # uint8 moved, then made float on the device: a quarter of the bytes to gather and copy,
            # and no float copy of the whole training file beside its splits
            return self.to_inputs(images.to(device)), labels.long().to(device)

        if "train" in missing or "val" in missing:  # both cut from the training file
            images, labels = load_split(self.root, self.info, "train")
            if len(images) <= self.val_size:
                raise DataError(f"val_size={self.val_size} leaves no training images: {self.root} holds only "
                                f"{len(images)} {self.dataset} training images. Lower data.val_size.")
            perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.split_seed))
            for split, idx in (("train", perm[:-self.val_size]), ("val", perm[-self.val_size:])):
                if split in missing:
                    self.splits[split] = on_device(images[idx], labels[idx])
        if "test" in missing:
            self.splits["test"] = on_device(*load_split(self.root, self.info, "test"))

    def teardown(self, stage: str) -> None:
        # Lightning calls this when fitting ends, before a test: the training split (55k x 784 float32 for
        # MNIST) is freed, so that the test pass and its figures stay within the memory the fit peaked at
        if stage == "fit":
            self.splits.pop("train", None)

    def _batches(self, split: str, shuffle: bool, batch_size: int, steps_per_call: int | None = None) -> TensorBatches:
        x, y = self.splits[split]
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        sampler = EpochShard(len(x), shuffle=shuffle, seed=self.shuffle_seed, rank=rank, world_size=world)
        return TensorBatches(x, y, batch_size, sampler, steps_per_call)

    def train_dataloader(self) -> TensorBatches:
        """(x (B, D), y (B,)) batches, B = batch_size; with steps_per_call > 1, StepBatches of up to that many."""
        grouped = self.steps_per_call if self.steps_per_call > 1 else None
        return self._batches("train", shuffle=True, batch_size=self.batch_size, steps_per_call=grouped)

    def val_dataloader(self) -> TensorBatches:
        return self._batches("val", shuffle=False, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> TensorBatches:
        return self._batches("test", shuffle=False, batch_size=self.eval_batch_size)


