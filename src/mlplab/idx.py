"""IDX files, the format MNIST and Fashion-MNIST ship in: checked, downloaded when missing, read.

torchvision's dataset classes parse the files; the checks here run first, so that a missing,
truncated or foreign file ends in a message naming the file and the fix rather than a reshape
error from deep inside torchvision.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor

from mlplab.rundir import unwritable

if TYPE_CHECKING:
    from mlplab.data import DatasetInfo

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



def ensure_split_files(root: str | Path, info: DatasetInfo, split: str) -> None:
    """Makes sure one split's two IDX files are there and sound, downloading them if missing.

    Missing files are downloaded as torchvision does; when that fails, the error names the
    folder, the files looked for, and the two ways to fix it.
    """
    dataset = info.name
    raw = Path(root) / info.folder / "raw"
    files = IDX_FILES[split]
    for name in files.values():  # else reported "not found", and a download is tried
        if (raw / name).is_dir():
            raise DataError(f"{raw / name} is a folder, not an IDX file. Replace it with the (uncompressed) file "
                            f"{name}, or point data.root at a folder that has it.")
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
                f"({type(err).__name__}: {' '.join(str(err).split())[:300]}). "
                f"Fix: put the four IDX files ({', '.join(n for s in IDX_FILES.values() for n in s.values())}) "
                f"in {raw.resolve()}, or point the kit at a folder that has them with "
                f"`DATA_DIR=/path/to/data` or `data.root=/path/to/data` (the folder that contains {info.folder}/raw)."
            ) from err
    counts = {kind: check_idx_file(raw / name, kind) for kind, name in files.items()}
    if counts["images"] != counts["labels"]:
        raise DataError(f"{raw / files['images']} holds {counts['images']} images but {raw / files['labels']} "
                        f"holds {counts['labels']} labels; the pair must match. Replace both with fresh copies.")


def load_split(root: str | Path, info: DatasetInfo, split: str) -> tuple[Tensor, Tensor]:
    """Reads one split as uint8 images (N, 28, 28) and int64 labels (N,), after checking the files.

    All four files are checked, not just this split's: torchvision's class refuses to load either
    split unless all four are there, with an error that names none of them.
    """
    for each_split in IDX_FILES:
        ensure_split_files(root, info, each_split)
    ds = info.torchvision_class(str(root), train=split == "train", download=False)
    bad = (ds.targets < 0) | (ds.targets >= info.num_classes)  # else an IndexError mid-epoch that names no file
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        path = Path(root) / info.folder / "raw" / IDX_FILES[split]["labels"]
        raise DataError(f"{path} holds label {int(ds.targets[i])} at item {i}, but {info.name} has "
                        f"{info.num_classes} classes (labels 0 to {info.num_classes - 1}): the file is corrupt. "
                        "Replace it with a fresh copy.")
    return ds.data, ds.targets

