"""mlplab.data on small real IDX files written here: loading, normalisation, the train/val split,
per-epoch shuffling, sharding over ranks, batching, and the errors for damaged or missing files."""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import socket
import struct
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from mlplab.batching import EpochShard, StepBatches, TensorBatches
from mlplab.data import DATASETS, ImageClassificationData
from mlplab.idx import IDX_FILES, DataError, load_split

N_TRAIN, N_TEST = 300, 100
TRAIN_IMAGES, TRAIN_LABELS = IDX_FILES["train"]["images"], IDX_FILES["train"]["labels"]
TEST_IMAGES, TEST_LABELS = IDX_FILES["test"]["images"], IDX_FILES["test"]["labels"]
ALL_FILES = [TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS]


# ---------------------------------------------------------------- IDX files written by hand


def make_images(n: int, offset: int) -> np.ndarray:
    """(n, 28, 28) uint8. Pixel k of image i is (3k + i + offset) % 256, except that pixels 0 and 1
    hold i % 256 and i // 256, so each image says which one it is."""
    i = np.arange(n)[:, None]
    flat = (3 * np.arange(784)[None, :] + i + offset) % 256
    flat[:, 0], flat[:, 1] = i[:, 0] % 256, i[:, 0] // 256
    return flat.reshape(n, 28, 28).astype(np.uint8)


def make_labels(n: int, step: int) -> np.ndarray:
    return (np.arange(n) * step % 10).astype(np.uint8)


TRAIN_X, TRAIN_Y = make_images(N_TRAIN, 0), make_labels(N_TRAIN, 7)
TEST_X, TEST_Y = make_images(N_TEST, 100), make_labels(N_TEST, 3)


def images_bytes(images: np.ndarray, magic: int = 2051, count: int | None = None) -> bytes:
    n = len(images) if count is None else count
    return struct.pack(">IIII", magic, n, 28, 28) + images.astype(np.uint8).tobytes()


def labels_bytes(labels: np.ndarray, magic: int = 2049, count: int | None = None) -> bytes:
    n = len(labels) if count is None else count
    return struct.pack(">II", magic, n) + labels.astype(np.uint8).tobytes()


def write_dataset(root: Path, folder: str = "MNIST") -> Path:
    """Writes the four IDX files under root/folder/raw/ and returns that raw folder."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    (raw / TRAIN_IMAGES).write_bytes(images_bytes(TRAIN_X))
    (raw / TRAIN_LABELS).write_bytes(labels_bytes(TRAIN_Y))
    (raw / TEST_IMAGES).write_bytes(images_bytes(TEST_X))
    (raw / TEST_LABELS).write_bytes(labels_bytes(TEST_Y))
    return raw


@pytest.fixture
def root(tmp_path: Path) -> Path:
    write_dataset(tmp_path)
    return tmp_path


@pytest.fixture
def raw(root: Path) -> Path:
    return root / "MNIST" / "raw"


@pytest.fixture
def no_download(monkeypatch):
    """Points torchvision's download mirrors at a closed local port, so the download attempt fails at
    once whether or not this machine is online (online, it would fetch the real MNIST over our files)."""
    for info in DATASETS.values():
        monkeypatch.setattr(info.torchvision_class, "mirrors", ["http://127.0.0.1:1/"])


def make_dm(root: Path, **kwargs) -> ImageClassificationData:
    args = dict(dataset="mnist", root=str(root), batch_size=32, val_size=50, eval_batch_size=30)
    return ImageClassificationData(**(args | kwargs))


def image_ids(x: torch.Tensor, dataset: str = "mnist", normalized: bool = True) -> list[int]:
    """The original index of each (B, 784) row, read back from its pixels 0 and 1."""
    info = DATASETS[dataset]
    p = x[:, :2].double()
    if normalized:
        p = p * info.std + info.mean
    p = torch.round(p * 255).long()
    return (p[:, 0] + 256 * p[:, 1]).tolist()


def steps(loader: TensorBatches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (x, y) batches a loader serves, in order; a training loader's groups of them flattened."""
    return [batch for item in loader for batch in (item if isinstance(item, StepBatches) else [item])]


def epoch_ids(loader: TensorBatches) -> list[int]:
    return [i for x, _ in steps(loader) for i in image_ids(x)]


# ---------------------------------------------------------------- loading and normalisation


def test_load_split_reads_the_files(root):
    for split, (images, labels) in {"train": (TRAIN_X, TRAIN_Y), "test": (TEST_X, TEST_Y)}.items():
        x, y = load_split(root, DATASETS["mnist"], split)
        assert x.dtype == torch.uint8 and x.shape == (len(images), 28, 28)
        assert y.dtype == torch.int64 and y.shape == (len(images),)
        assert torch.equal(x, torch.from_numpy(images))
        assert torch.equal(y, torch.from_numpy(labels).long())


def test_setup_loads_normalised_tensors_on_cpu(root):
    dm = make_dm(root)
    dm.setup()
    x, y = dm.splits["train"]
    assert x.shape == (250, 784) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert y.shape == (250,) and y.dtype == torch.int64
    ids = image_ids(x)
    # every pixel of every row is (p / 255 - mean) / std of its image, and the label follows the image
    expected = (TRAIN_X[ids].reshape(-1, 784) / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(x.double(), torch.from_numpy(expected), rtol=0, atol=1e-5)
    assert y.tolist() == TRAIN_Y[ids].tolist()
    # one pixel by hand: pixel (5, 7) = 3 * 147 + i, mod 256
    i = ids[0]
    assert x[0, 5 * 28 + 7].item() == pytest.approx(((3 * 147 + i) % 256 / 255 - 0.1307) / 0.3081, abs=1e-5)


def test_each_stage_loads_its_splits_and_fit_teardown_frees_train(root):
    dm = make_dm(root)
    dm.setup("fit")
    assert set(dm.splits) == {"train", "val"}
    train, val = dm.splits["train"], dm.splits["val"]
    dm.teardown("fit")  # Lightning, when fitting ends: the test that follows does not read train
    assert set(dm.splits) == {"val"}
    dm.setup("test")
    assert set(dm.splits) == {"val", "test"} and dm.splits["val"] is val  # loaded once
    dm.setup("fit")  # fitting again loads train again, the same split
    assert all(torch.equal(a, b) for a, b in zip(dm.splits["train"], train))
    dm.teardown("test")
    assert set(dm.splits) == {"train", "val", "test"}


def test_test_split_is_whole_and_in_file_order(root):
    dm = make_dm(root)
    dm.setup()
    x, y = dm.splits["test"]
    assert x.shape == (N_TEST, 784)
    expected = (TEST_X.reshape(-1, 784) / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(x.double(), torch.from_numpy(expected), rtol=0, atol=1e-5)
    assert y.tolist() == TEST_Y.tolist()


def test_normalize_false_keeps_pixels_in_unit_interval(root):
    dm = make_dm(root, normalize=False)
    dm.setup()
    x, _ = dm.splits["train"]
    ids = image_ids(x, normalized=False)
    torch.testing.assert_close(x.double(), torch.from_numpy(TRAIN_X[ids].reshape(-1, 784) / 255), rtol=0, atol=1e-7)
    assert x.min().item() == 0.0 and x.max().item() == 1.0


def test_fashion_mnist_uses_its_own_folder_and_constants(tmp_path):
    write_dataset(tmp_path, folder="FashionMNIST")
    dm = make_dm(tmp_path, dataset="fashion_mnist")
    dm.setup()
    x, _ = dm.splits["test"]
    expected = (TEST_X.reshape(-1, 784) / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(x.double(), torch.from_numpy(expected), rtol=0, atol=1e-5)
    assert (dm.input_size, dm.num_classes, len(dm.classes)) == (784, 10, 10)


# ---------------------------------------------------------------- train/val split


def split_ids(dm: ImageClassificationData) -> tuple[list[int], list[int]]:
    dm.setup()
    return image_ids(dm.splits["train"][0]), image_ids(dm.splits["val"][0])


def test_split_is_disjoint_and_covers_the_training_file(root):
    train, val = split_ids(make_dm(root, val_size=50))
    assert (len(train), len(val)) == (250, 50)
    assert set(train).isdisjoint(val)
    assert sorted(train + val) == list(range(N_TRAIN))


def test_split_is_reproducible_and_depends_on_split_seed(root):
    a_train, a_val = split_ids(make_dm(root, split_seed=0))
    b_train, b_val = split_ids(make_dm(root, split_seed=0))
    c_train, c_val = split_ids(make_dm(root, split_seed=1))
    assert (a_train, a_val) == (b_train, b_val)
    assert set(c_val) != set(a_val)
    # the split does not depend on the shuffle seed
    assert split_ids(make_dm(root, split_seed=0, shuffle_seed=5)) == (a_train, a_val)


def test_val_size_leaving_no_training_images_raises(root):
    dm = make_dm(root, val_size=N_TRAIN)
    with pytest.raises(DataError, match="val_size=300"):
        dm.setup()


# ---------------------------------------------------------------- epochs and batches


def test_one_training_epoch_visits_every_training_image_once(root):
    dm = make_dm(root)
    dm.setup()
    loader = dm.train_dataloader()
    assert isinstance(loader, TensorBatches)
    seen = epoch_ids(loader)
    assert len(seen) == 250
    assert sorted(seen) == sorted(image_ids(dm.splits["train"][0]))
    assert seen != image_ids(dm.splits["train"][0])  # shuffled, not in storage order


def test_labels_travel_with_their_images(root):
    dm = make_dm(root)
    dm.setup()
    loaders = [(dm.train_dataloader(), TRAIN_Y), (dm.val_dataloader(), TRAIN_Y), (dm.test_dataloader(), TEST_Y)]
    for loader, labels in loaders:
        for x, y in steps(loader):
            assert y.tolist() == labels[image_ids(x)].tolist()


def test_epochs_reshuffle_reproducibly(root):
    dm = make_dm(root)
    dm.setup()
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(0)
    epoch0 = epoch_ids(loader)
    loader.sampler.set_epoch(1)
    epoch1 = epoch_ids(loader)
    assert epoch0 != epoch1 and sorted(epoch0) == sorted(epoch1)
    again = dm.train_dataloader()
    again.sampler.set_epoch(1)
    assert epoch_ids(again) == epoch1
    again.sampler.set_epoch(0)
    assert epoch_ids(again) == epoch0
    other = make_dm(root, shuffle_seed=10)
    other.setup()
    assert epoch_ids(other.train_dataloader()) != epoch0


def test_batch_shapes_and_the_last_partial_batch(root):
    dm = make_dm(root, batch_size=32, eval_batch_size=30)
    dm.setup()
    train = list(dm.train_dataloader())
    assert all(isinstance(batch, tuple) for batch in train)  # steps_per_call=1: plain (x, y) batches
    train = steps(dm.train_dataloader())
    assert [len(x) for x, _ in train] == [32] * 7 + [26]  # 250 = 7 * 32 + 26
    assert all(x.shape[1:] == (784,) and y.shape == (len(x),) for x, y in train)
    assert [len(x) for x, _ in dm.val_dataloader()] == [30, 20]
    assert [len(x) for x, _ in dm.test_dataloader()] == [30, 30, 30, 10]
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        assert len(loader) == len(list(loader))


@pytest.mark.parametrize("steps_per_call", [2, 3, 8, 9])
def test_steps_per_call_groups_the_same_batches(root, steps_per_call):
    """Grouping changes how batches are handed over, never which samples they hold or their order."""
    one = make_dm(root, batch_size=32, steps_per_call=1)
    grouped = make_dm(root, batch_size=32, steps_per_call=steps_per_call)
    one.setup(), grouped.setup()
    loader = grouped.train_dataloader()
    groups = list(loader)
    assert len(loader) == len(groups) == -(-8 // steps_per_call)  # 8 batches of 32 (the last 26)
    assert all(len(g) == steps_per_call for g in groups[:-1]) and 1 <= len(groups[-1]) <= steps_per_call
    for (xa, ya), (xb, yb) in zip(steps(one.train_dataloader()), steps(loader), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_a_group_is_gathered_anew_each_time_and_passes_lightnings_batch_transfer_as_it_is(root):
    """A callback may read a group before training_step does; Lightning must not copy it into a list."""
    dm = make_dm(root, batch_size=32, steps_per_call=3)
    dm.setup()
    group = next(iter(dm.train_dataloader()))
    assert isinstance(group, StepBatches) and len(group) == 3
    first, again = list(group), list(group)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    x, y = dm.splits["train"]
    rows = group.rows[1]
    assert torch.equal(first[1][0], x[rows]) and torch.equal(first[1][1], y[rows])
    assert move_data_to_device(group, torch.device("cpu")) is group


@pytest.mark.parametrize(("n", "batch_size"), [(10, 3), (10, 5), (10, 10), (10, 11), (1, 4)])
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("steps_per_call", [None, 2])
def test_len_matches_the_batches_yielded(n, batch_size, shuffle, world_size, steps_per_call):
    x, y = torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.arange(n)
    for rank in range(world_size):
        batches = TensorBatches(x, y, batch_size, EpochShard(n, shuffle, seed=0, rank=rank, world_size=world_size),
                                steps_per_call)
        assert len(batches) == len(list(batches))
        got = steps(batches)
        assert all(0 < len(xb) <= batch_size for xb, _ in got)
        assert sum(len(xb) for xb, _ in got) == len(batches.sampler)


# ---------------------------------------------------------------- sharding over ranks


@pytest.mark.parametrize(("n", "world_size"), [(101, 2), (100, 2), (10, 3), (7, 4)])
@pytest.mark.parametrize("epoch", [0, 1, 5])
def test_training_shards_are_disjoint_equal_and_drop_only_the_remainder(n, world_size, epoch):
    shards = [EpochShard(n, shuffle=True, seed=3, rank=r, world_size=world_size) for r in range(world_size)]
    for s in shards:
        s.set_epoch(epoch)
    parts = [s.indices().tolist() for s in shards]
    assert [len(p) for p in parts] == [n // world_size] * world_size
    assert [len(s) for s in shards] == [n // world_size] * world_size
    union = [i for p in parts for i in p]
    assert len(set(union)) == len(union) == n - n % world_size
    assert set(union) <= set(range(n))


def test_training_shards_drop_a_different_index_each_epoch():
    dropped = set()
    for epoch in range(10):
        shards = [EpochShard(101, shuffle=True, seed=0, rank=r, world_size=2) for r in range(2)]
        for s in shards:
            s.set_epoch(epoch)
        (left,) = set(range(101)) - {i for s in shards for i in s.indices().tolist()}
        dropped.add(left)
    assert len(dropped) > 1


@pytest.mark.parametrize(("n", "world_size"), [(101, 2), (100, 2), (10, 3), (7, 4), (1, 2)])
def test_evaluation_shards_cover_everything_once_in_order(n, world_size):
    parts = [EpochShard(n, shuffle=False, rank=r, world_size=world_size).indices().tolist() for r in range(world_size)]
    assert [i for p in parts for i in p] == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def as_rank(dm: ImageClassificationData, rank: int, world_size: int) -> ImageClassificationData:
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world_size)  # what _batches reads
    return dm


def test_datamodule_shards_training_over_two_ranks(root):
    dm = make_dm(root, val_size=51)  # 249 training images: one is left over each epoch
    dm.setup()
    per_rank = [epoch_ids(as_rank(dm, r, 2).train_dataloader()) for r in range(2)]
    assert [len(p) for p in per_rank] == [124, 124]
    union = per_rank[0] + per_rank[1]
    assert len(set(union)) == 248
    assert set(union) < set(image_ids(dm.splits["train"][0]))
    assert [len(as_rank(dm, r, 2).train_dataloader()) for r in range(2)] == [4, 4]  # ceil(124 / 32)


@pytest.mark.parametrize("split", ["val", "test"])
def test_datamodule_shards_evaluation_over_two_ranks_without_loss(root, split):
    dm = make_dm(root, val_size=51)
    dm.setup()
    per_rank = []
    for r in range(2):
        loader = getattr(as_rank(dm, r, 2), f"{split}_dataloader")()
        per_rank.append(epoch_ids(loader))
        assert len(loader) == len(list(loader))
    assert per_rank[0] + per_rank[1] == image_ids(dm.splits[split][0])  # everything, once, in order
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= 1


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": "abc"}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"eval_batch_size": 0}, "eval_batch_size"),
        ({"val_size": 0}, "val_size"),
        ({"val_size": 60000}, "val_size"),
        ({"val_size": 1.5}, "val_size"),
        ({"val_size": 1000, "batch_size": 59001}, "batch_size"),
        ({"dataset": "foo"}, "dataset"),
    ],
)
def test_constructor_rejects_bad_arguments(tmp_path, kwargs, argument):
    with pytest.raises(ValueError, match=rf"^{argument}="):
        make_dm(tmp_path, **kwargs)


def test_largest_batch_size_is_accepted(tmp_path):
    make_dm(tmp_path, val_size=1000, batch_size=59000)


def test_missing_root_folder_names_the_folder_and_data_dir(tmp_path, no_download):
    missing = tmp_path / "no_such_folder"
    dm = make_dm(missing)
    start = time.perf_counter()
    with pytest.raises(DataError, match=re.escape(str((missing / "MNIST" / "raw").resolve()))) as err:
        dm.setup()
    assert time.perf_counter() - start < 5
    assert "DATA_DIR" in str(err.value)
    # the reason is torchvision's whole message (mirror tried, what it got), not only its first line
    assert re.search(r"download failed \(RuntimeError: Error downloading \S+: Tried http://127\.0\.0\.1:1/, got: .+\)",
                     str(err.value)), str(err.value)


def test_missing_root_folder_unpatched_download_fails_fast(tmp_path):
    """The real download attempt, mirrors untouched: offline it must fail within seconds, not hang."""
    try:
        socket.getaddrinfo("ossci-datasets.s3.amazonaws.com", 443)
    except OSError:
        pass  # offline, as expected
    else:
        pytest.skip("this machine is online: the real download would fetch MNIST")
    dm = make_dm(tmp_path / "absent")
    start = time.perf_counter()
    try:
        dm.prepare_data()
    except DataError as err:
        assert "DATA_DIR" in str(err)
    else:
        pytest.fail("the download did not fail")
    assert time.perf_counter() - start < 5


def missing_message(raw: Path, name: str) -> str:
    return rf"^mnist: {re.escape(name)} not found in {re.escape(str(raw.resolve()))}"


@pytest.mark.parametrize("name", ALL_FILES)
def test_missing_file_is_named_by_prepare_data(raw, name, no_download):
    (raw / name).unlink()
    start = time.perf_counter()
    with pytest.raises(DataError, match=missing_message(raw, name)):
        make_dm(raw.parents[1]).prepare_data()
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize(
    "name",
    [TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS],
)
def test_missing_file_is_named_by_setup(raw, name, no_download):
    (raw / name).unlink()
    with pytest.raises(DataError, match=missing_message(raw, name)):
        make_dm(raw.parents[1]).setup()


@pytest.mark.parametrize(
    ("name", "data"),
    [
        (TRAIN_IMAGES, images_bytes(TRAIN_X)[:-100]),
        (TRAIN_IMAGES, images_bytes(TRAIN_X, count=N_TRAIN + 1)),  # header promises one more image
        (TRAIN_LABELS, labels_bytes(TRAIN_Y)[:-1]),
        (TEST_IMAGES, images_bytes(TEST_X)[:-1]),
        (TEST_LABELS, labels_bytes(TEST_Y) + b"\0"),  # too long is corrupt too
    ],
    ids=["train-images-short", "train-images-count", "train-labels-short", "test-images-short", "test-labels-long"],
)
def test_truncated_file_is_named(raw, name, data):
    (raw / name).write_bytes(data)
    with pytest.raises(DataError, match=re.escape(str(raw / name)) + r" is \d+ bytes but its header"):
        make_dm(raw.parents[1]).setup()


@pytest.mark.parametrize("name", [TRAIN_IMAGES, TRAIN_LABELS])
def test_file_shorter_than_its_header_is_named(raw, name):
    (raw / name).write_bytes(b"\0\0\x08")
    with pytest.raises(DataError, match=re.escape(str(raw / name)) + r" is truncated: 3 bytes"):
        make_dm(raw.parents[1]).setup()


@pytest.mark.parametrize(
    ("name", "data", "magic", "expected"),
    [
        (TRAIN_IMAGES, images_bytes(TRAIN_X, magic=2049), 2049, 2051),
        (TEST_LABELS, labels_bytes(TEST_Y, magic=2051), 2051, 2049),
        (TRAIN_LABELS, gzip.compress(labels_bytes(TRAIN_Y), mtime=0), 0x1F8B0800, 2049),
    ],
    ids=["images-as-labels", "labels-as-images", "gzipped"],
)
def test_wrong_magic_number_is_named(raw, name, data, magic, expected):
    (raw / name).write_bytes(data)
    with pytest.raises(DataError, match=re.escape(f"{raw / name} has magic number {magic}, expected {expected}")):
        make_dm(raw.parents[1]).setup()


def test_image_and_label_counts_must_match(raw):
    (raw / TRAIN_LABELS).write_bytes(labels_bytes(TRAIN_Y[:-1]))
    message = rf"{re.escape(str(raw / TRAIN_IMAGES))} holds 300 images but {re.escape(str(raw / TRAIN_LABELS))} holds 299"
    with pytest.raises(DataError, match=message):
        make_dm(raw.parents[1]).setup()


@contextlib.contextmanager
def read_only_folder(path: Path):
    """An empty folder that nobody can write into: a read-only tmpfs when we are root (root ignores
    permission bits), else a folder with mode 0o555."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "mlplab-test", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"running as root and cannot mount a read-only tmpfs: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_read_only_data_folder_is_named_before_any_download(tmp_path, monkeypatch):
    def download(*args, **kwargs):
        pytest.fail("a download was attempted into a read-only folder")

    monkeypatch.setattr(DATASETS["mnist"].torchvision_class, "download", download)
    with read_only_folder(tmp_path / "ro") as root:
        with pytest.raises(DataError) as err:
            make_dm(root).prepare_data()
    message = str(err.value)
    assert f"not found in {root.resolve()}/MNIST/raw, and a download cannot write there" in message
    assert "Read-only file system" in message or "Permission denied" in message
    assert "DATA_DIR=" in message and "data.root=" in message
