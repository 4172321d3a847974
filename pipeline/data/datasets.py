"""Datasets as in-memory arrays with stable int64 sample ids.

`load(config.data)` returns the private training set (ids are positions in the dataset's
canonical training split), the public pretraining set and the test set. Images are float32
(N, C, H, W), normalised; labels int64. With `data.canaries = M` the test split's last M images
become audit canaries instead (`canaries.py`): the included ones are appended to the private
split with ids n..n+k−1.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import DataConfig
from pipeline.data import canaries
from pipeline.data.canaries import Canaries
from pipeline.data.split import DataError, Split

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# (mean, std) per channel, used to normalise images into roughly unit scale.
NORMALISATION = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "digits": ((0.3051,), (0.3779,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@dataclass(frozen=True)
class Data:
    name: str
    num_classes: int
    private: Split
    public: Split
    test: Split
    canaries: Canaries | None = None  # the audit's canary pool (data.canaries > 0), included or not

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.private.x.shape[1:])


def normalise(name: str, images: np.ndarray) -> np.ndarray:
    """uint8 / float images (N, H, W[, C]) in [0, 1] scale → normalised float32 (N, C, H, W)."""
    x = images.astype(np.float32)
    if x.max() > 1.5:
        x = x / (16.0 if name == "digits" else 255.0)
    if x.ndim == 3:
        x = x[:, None]
    elif x.shape[-1] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    mean, std = NORMALISATION[name]
    mean_arr = np.asarray(mean, np.float32)[None, :, None, None]
    std_arr = np.asarray(std, np.float32)[None, :, None, None]
    return np.ascontiguousarray((x - mean_arr) / std_arr)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _candidate_roots(config: DataConfig) -> list[Path]:
    roots = [Path(config.root)] if config.root else []
    if os.environ.get("DPSISA_DATA"):
        roots.append(Path(os.environ["DPSISA_DATA"]))
    roots += [DEBIAN_FASHION_MNIST, _cache_root() / "FashionMNIST" / "raw"]
    return roots


def _cache_root() -> Path:
    return Path(os.environ.get("DPSISA_CACHE", Path.home() / ".cache" / "dpsisa")) / "data"


def _missing(name: str, tried: list[Path]) -> DataError:
    where = ", ".join(str(p) for p in tried) or "(nowhere)"
    return DataError(
        f"{name} not found (looked in {where}). Get it one of three ways: "
        f"(1) `sudo apt-get install dataset-fashion-mnist` (Debian; files land in {DEBIAN_FASHION_MNIST}); "
        "(2) put the four idx .gz files in a folder and set DPSISA_DATA=/that/folder (or data.root); "
        "(3) with internet, set data.download=true to let torchvision download it."
    )


def _fashion_mnist(config: DataConfig) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    tried = _candidate_roots(config)
    for root in tried:
        if all((root / f).is_file() for pair in FMNIST_FILES.values() for f in pair):
            train = tuple(_read_idx(root / f) for f in FMNIST_FILES["train"])
            test = tuple(_read_idx(root / f) for f in FMNIST_FILES["test"])
            return train, test  # type: ignore[return-value]
    if config.download:
        return _torchvision("fashion_mnist", config)
    raise _missing("Fashion-MNIST", tried)


def _torchvision(name: str, config: DataConfig) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """MNIST / Fashion-MNIST / CIFAR via torchvision (downloads only when data.download is true)."""
    import torchvision

    classes = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}
    root = Path(config.root) if config.root else _cache_root()
    cls = getattr(torchvision.datasets, classes[name])
    try:
        splits = [cls(str(root), train=train, download=config.download) for train in (True, False)]
    except RuntimeError as exc:
        raise DataError(
            f"{name} not found under {root} ({exc}). Set data.download=true (needs internet), or put "
            f"torchvision's files for {classes[name]} under data.root / $DPSISA_CACHE/data."
        ) from exc
    out = []
    for split in splits:
        x = split.data.numpy() if hasattr(split.data, "numpy") else np.asarray(split.data)
        out.append((x, np.asarray(split.targets)))
    return out[0], out[1]


def _digits() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's 8×8 digits; every fifth image (index % 5 == 4) is the test set."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images, labels = bunch.images, bunch.target
    is_test = np.arange(len(labels)) % 5 == 4
    return (images[~is_test], labels[~is_test]), (images[is_test], labels[is_test])


def _raw(name: str, config: DataConfig):
    if name == "digits":
        return _digits()
    if name == "fashion_mnist":
        return _fashion_mnist(config)
    return _torchvision(name, config)


def load(config: DataConfig) -> Data:
    """Private / public / test splits for `config`; ids index the canonical training split."""
    (x_train, y_train), (x_test, y_test) = _raw(config.name, config)
    x_train, x_test = normalise(config.name, x_train), normalise(config.name, x_test)
    y_train, y_test = y_train.astype(np.int64), y_test.astype(np.int64)
    ids = np.arange(len(y_train), dtype=np.int64)
    num_classes = int(max(y_train.max(), y_test.max()) + 1)
    if config.public == "heldout":
        if config.public_size >= len(ids):
            raise DataError(
                f"data.public_size={config.public_size} leaves no private data ({config.name} has {len(ids)} "
                "training samples); lower data.public_size."
            )
        # The public part is the *last* public_size samples, so private ids are a prefix: stable.
        cut = len(ids) - config.public_size
        public = Split(x_train[cut:], y_train[cut:], ids[cut:])
        private = Split(x_train[:cut], y_train[:cut], ids[:cut])
    else:
        public_config = DataConfig(**{**config.__dict__, "name": config.public, "public": "heldout"})
        (x_pub, y_pub), _ = _raw(config.public, public_config)
        public = Split(normalise(config.public, x_pub), y_pub.astype(np.int64), np.arange(len(y_pub), dtype=np.int64))
        private = Split(x_train, y_train, ids)
    if config.private_limit is not None:
        n = config.private_limit
        private = Split(private.x[:n], private.y[:n], private.ids[:n])
    test = Split(x_test, y_test, np.arange(len(y_test), dtype=np.int64))
    canary_pool = None
    if config.canaries:  # audit canaries: the test split's tail, some appended to the private split
        private, test, canary_pool = canaries.reserve(private, test, config.canaries, config.canary_seed, num_classes)
    if config.test_limit is not None:
        n = config.test_limit
        test = Split(test.x[:n], test.y[:n], test.ids[:n])
    return Data(config.name, num_classes, private, public, test, canary_pool)
