"""MNIST and Fashion-MNIST as device-resident tensors, served in shuffled slices.

Each split is parsed once (through torchvision's dataset classes) into one normalised
float tensor that lives on the training device. An epoch is a `torch.randperm` over
indices and a walk over slices of it: no per-sample PIL transform, no worker processes.
Lightning accepts any sized iterable as a dataloader, and calls `set_epoch` on an
iterable's `sampler` at the start of each epoch, as it does for `DistributedSampler`.
"""

from __future__ import annotations

import math
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import lightning as L
import torch
from torch import Tensor
from torchvision import datasets


@dataclass(frozen=True)
class DatasetInfo:
    """What the rest of the kit needs to know about a dataset."""

    torchvision_class: type[datasets.MNIST]
    mean: float  # of the 60k training pixels, scaled to [0, 1]
    std: float
    classes: tuple[str, ...]
    image_shape: tuple[int, int] = (28, 28)
    train_size: int = 60_000  # images in the official training split (train + val here)

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
        torchvision_class=datasets.MNIST,
        mean=0.1307,
        std=0.3081,
        classes=tuple(str(d) for d in range(10)),
    ),
    "fashion_mnist": DatasetInfo(
        torchvision_class=datasets.FashionMNIST,
        mean=0.2860,
        std=0.3530,
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    ),
}

# IDX file names in torchvision's raw/ folder, and the magic number each must start with.
IDX_FILES: dict[str, dict[str, str]] = {
    "train": {"images": "train-images-idx3-ubyte", "labels": "train-labels-idx1-ubyte"},
    "test": {"images": "t10k-images-idx3-ubyte", "labels": "t10k-labels-idx1-ubyte"},
}
IDX_MAGIC = {"images": 2051, "labels": 2049}  # 0x0803: uint8, 3 dims; 0x0801: uint8, 1 dim


class DataError(RuntimeError):
    """A dataset file is missing or unreadable; the message names the file and the fix."""


def check_idx_file(path: Path, kind: str) -> int:
    """Checks an IDX file's magic number and length against its header.

    torchvision's reader fails on a damaged file with a reshape error that names no file;
    this check runs first so that the message names the file and what is wrong with it.

    Args:
        path: the IDX file.
        kind: "images" or "labels".

    Returns:
        The number of items the file holds.
    """
    ndim = 3 if kind == "images" else 1
    header_bytes = 4 + 4 * ndim
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(header_bytes)
    if len(header) < header_bytes:
        raise DataError(f"{path} is truncated: {size} bytes, shorter than its {header_bytes}-byte header. "
                        "Replace it with a fresh copy of the file.")
    magic, *dims = struct.unpack(f">{1 + ndim}I", header)
    if magic != IDX_MAGIC[kind]:
        raise DataError(f"{path} has magic number {magic}, expected {IDX_MAGIC[kind]} for an IDX {kind} file "
                        "(is it still gzip-compressed, or a different file under this name?). "
                        "Replace it with the uncompressed original.")
    expected = header_bytes + math.prod(dims)
    if size != expected:
        raise DataError(f"{path} is {size} bytes but its header {tuple(dims)} needs {expected}: "
                        "the file is truncated or corrupt. Replace it with a fresh copy.")
    return dims[0]


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


def ensure_split_files(root: str | Path, dataset: str, split: str) -> None:
    """Makes sure one split's two IDX files are there and sound, downloading them if missing.

    Missing files are downloaded as torchvision does; when that fails, the error names the
    folder, the files looked for, and the two ways to fix it.
    """
    info = DATASETS[dataset]
    raw = Path(root) / info.folder / "raw"
    files = IDX_FILES[split]
    missing = [name for name in files.values() if not (raw / name).is_file()]
    if missing:
        if (error := unwritable(raw)) is not None:
            raise DataError(
                f"{dataset}: {', '.join(missing)} not found in {raw.resolve()}, and a download cannot write there "
                f"({error.strerror}). Fix: copy the four IDX files into {raw.resolve()} by other means, or point the "
                f"kit at a folder that has them (or a writable one to download into) with `DATA_DIR=/path/to/data` "
                f"or `data.root=/path/to/data` (the folder that contains {info.folder}/raw)."
            )
        try:
            info.torchvision_class(str(root), train=split == "train", download=True)
        except Exception as err:  # noqa: BLE001 - any download failure gets the same advice
            raise DataError(
                f"{dataset}: {', '.join(missing)} not found in {raw.resolve()} and the download failed "
                f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}). "
                f"Fix: put the four IDX files ({', '.join(n for s in IDX_FILES.values() for n in s.values())}) "
                f"in {raw.resolve()}, or point the kit at a folder that has them with "
                f"`DATA_DIR=/path/to/data` or `data.root=/path/to/data` (the folder that contains {info.folder}/raw)."
            ) from err
    counts = {kind: check_idx_file(raw / name, kind) for kind, name in files.items()}
    if counts["images"] != counts["labels"]:
        raise DataError(f"{raw / files['images']} holds {counts['images']} images but {raw / files['labels']} "
                        f"holds {counts['labels']} labels; the pair must match. Replace both with fresh copies.")


def load_split(root: str | Path, dataset: str, split: str) -> tuple[Tensor, Tensor]:
    """Reads one split as uint8 images (N, 28, 28) and int64 labels (N,), after checking the files.

    All four files are checked, not just this split's: torchvision's class refuses to load either
    split unless all four are there, with an error that names none of them.
    """
    for each_split in IDX_FILES:
        ensure_split_files(root, dataset, each_split)
    info = DATASETS[dataset]
    ds = info.torchvision_class(str(root), train=split == "train", download=False)
    return ds.data, ds.targets


class EpochShard:
    """The indices one rank visits in one epoch: a `DistributedSampler` for tensors.

    Training (`shuffle=True`): every rank draws the same `randperm(n)` (seeded by seed + epoch)
    and takes its own contiguous block of `n // world_size` indices, so over an epoch the ranks
    see disjoint samples and each sample at most once; the `n % world_size` left over (a
    different few each epoch) are dropped so that all ranks take the same number of steps.
    Evaluation (`shuffle=False`): rank r takes the r-th of `world_size` contiguous, nearly equal
    blocks, in order, with nothing dropped or repeated, so metrics reduced over ranks equal the
    single-process ones.
    """

    def __init__(self, n: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> Tensor:
        """(n_local,) int64 indices, on the CPU."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            per_rank = self.n // self.world_size
            return torch.randperm(self.n, generator=g)[self.rank * per_rank:(self.rank + 1) * per_rank]
        return torch.tensor_split(torch.arange(self.n), self.world_size)[self.rank]

    def __len__(self) -> int:
        return self.n // self.world_size if self.shuffle else len(self.indices())


def gather(x: Tensor, y: Tensor, rows: Tensor | slice) -> tuple[Tensor, Tensor]:
    """(x[rows] (B, D), y[rows] (B,)): views for a slice, else one index_select each.

    index_select, not x[rows]: with advanced indexing, a plain-PyTorch epoch of the 784-200-200-10
    MLP at batch 200 took 404 ms against 381 ms (2-core CPU). scripts/bench.py's floor gathers the
    same way.
    """
    if isinstance(rows, slice):
        return x[rows], y[rows]
    return x.index_select(0, rows), y.index_select(0, rows)


class StepBatches:
    """The (x (B, D), y (B,)) batches of one training_step call, each gathered as iteration reaches it.

    Gathered one at a time, a batch is still in cache when its step reads it, and only one is held:
    64 batches of 200 images gathered up front are 40 MB, and a plain-PyTorch epoch that gathered
    them so took 423 ms against 381 ms (2-core CPU). Lightning hands the object to training_step
    as it is: it has no `.to()` and is not a sequence, mapping or dataclass, so batch_to_device
    neither moves nor walks it (the tensors are already on the training device). Its length is a
    count of steps, not samples: a `self.log(tensor, on_epoch=True)` added to training_step should
    pass `batch_size=`, or Lightning infers one by iterating the group (gathering it again).

    Args:
        x: (N, D) inputs of the whole split, on the training device.
        y: (N,) labels, on the same device.
        rows: one index tensor (on that device) or slice per batch.
    """

    def __init__(self, x: Tensor, y: Tensor, rows: Sequence[Tensor | slice]) -> None:
        self.x, self.y, self.rows = x, y, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for rows in self.rows:
            yield gather(self.x, self.y, rows)


class TensorBatches:
    """Serves (x, y) batches of device-resident tensors in the order an `EpochShard` gives.

    With `steps_per_call=k` it serves `StepBatches` of up to k consecutive batches instead, one per
    Lightning batch: the training module takes one optimiser step per batch, so that Lightning's
    per-batch work (fetching, hooks, progress, logging: ~1 ms on a 2-core CPU, a plain step at batch
    64) is paid once per k steps, as Keras's `steps_per_execution` does. Only the last group of an
    epoch is shorter, and only its last batch may be smaller.

    Args:
        x: (N, D) float inputs, already normalised and on the training device.
        y: (N,) int64 labels, on the same device.
        batch_size: samples per batch (per optimiser step) on this rank.
        sampler: which indices this rank visits; its `set_epoch` is called by Lightning.
        steps_per_call: None serves each batch as (x, y); k >= 1 serves groups of up to k of them.
    """

    batch_sampler = None  # Lightning reads DataLoader's two sampler attributes; batching is done here

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, sampler: EpochShard,
                 steps_per_call: int | None = None) -> None:
        self.x, self.y, self.batch_size, self.sampler = x, y, batch_size, sampler
        self.steps_per_call = steps_per_call

    def __len__(self) -> int:
        batches = math.ceil(len(self.sampler) / self.batch_size)
        return batches if self.steps_per_call is None else math.ceil(batches / self.steps_per_call)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor] | StepBatches]:
        idx = self.sampler.indices()
        if self.sampler.shuffle:
            # views of one (n,) tensor; split() would give an empty one for an empty shard
            rows = idx.to(self.x.device).split(self.batch_size) if len(idx) else ()
        else:  # a contiguous block: slices, served as views
            lo, hi = (int(idx[0]), int(idx[-1]) + 1) if len(idx) else (0, 0)
            rows = [slice(i, min(i + self.batch_size, hi)) for i in range(lo, hi, self.batch_size)]
        if self.steps_per_call is None:
            for batch_rows in rows:
                yield gather(self.x, self.y, batch_rows)
        else:
            for i in range(0, len(rows), self.steps_per_call):
                yield StepBatches(self.x, self.y, rows[i:i + self.steps_per_call])


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
        steps_per_call: training batches per Lightning batch (per training_step call): the loader
            serves groups (StepBatches) of this many (x, y) batches, and the module steps once per batch.
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
            ensure_split_files(self.root, self.dataset, split)

    def setup(self, stage: str | None = None) -> None:
        """Loads the splits that `stage` reads (fit: train and val; validate: val; test and predict: test;
        None: all three) and has not loaded yet."""
        wanted = STAGE_SPLITS.get(stage, ("train", "val", "test"))
        missing = [split for split in wanted if split not in self.splits]
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

        def on_device(images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
            # uint8 moved, then made float on the device: a quarter of the bytes to gather and copy,
            # and no float copy of the whole training file (188 MB for MNIST) beside its splits
            return self.to_inputs(images.to(device)), labels.long().to(device)

        if "train" in missing or "val" in missing:  # both cut from the training file
            images, labels = load_split(self.root, self.dataset, "train")
            if len(images) <= self.val_size:
                raise DataError(f"val_size={self.val_size} leaves no training images: {self.root} holds only "
                                f"{len(images)} {self.dataset} training images. Lower data.val_size.")
            perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.split_seed))
            for split, idx in (("train", perm[:-self.val_size]), ("val", perm[-self.val_size:])):
                if split in missing:
                    self.splits[split] = on_device(images[idx], labels[idx])
        if "test" in missing:
            self.splits["test"] = on_device(*load_split(self.root, self.dataset, "test"))

    def teardown(self, stage: str) -> None:
        # Lightning calls this when fitting ends, before a test: the training split, 172 MB of float32 for
        # MNIST, is freed, so that the test pass and its figures stay within the memory the fit peaked at
        if stage == "fit":
            self.splits.pop("train", None)

    def _batches(self, split: str, shuffle: bool, batch_size: int, steps_per_call: int | None = None) -> TensorBatches:
        x, y = self.splits[split]
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        sampler = EpochShard(len(x), shuffle=shuffle, seed=self.shuffle_seed, rank=rank, world_size=world)
        return TensorBatches(x, y, batch_size, sampler, steps_per_call)

    def train_dataloader(self) -> TensorBatches:
        """StepBatches of up to steps_per_call (x (B, D), y (B,)) batches, B = batch_size."""
        return self._batches("train", shuffle=True, batch_size=self.batch_size, steps_per_call=self.steps_per_call)

    def val_dataloader(self) -> TensorBatches:
        return self._batches("val", shuffle=False, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> TensorBatches:
        return self._batches("test", shuffle=False, batch_size=self.eval_batch_size)

