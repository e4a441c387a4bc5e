"""The built-in datasets: their facts, where their files are looked for, and how they load."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cnnlab.data.cifar import CIFAR10_LAYOUT, CIFAR100_LAYOUT, CifarLayout, read_cifar
from cnnlab.data.download import cache_root, fetch
from cnnlab.data.idx import read_idx
from cnnlab.data.types import Dataset, ImageSet
from cnnlab.errors import DataError, unknown_name

logger = logging.getLogger(__name__)

MNIST_CLASSES = tuple(str(d) for d in range(10))
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DIGITS_TEST_FRACTION = 0.2  # scikit-learn's digits ship no test split; this one is fixed
DIGITS_TEST_SEED = 0


@dataclass(frozen=True)
class RemoteFile:
    """A published file, its SHA-256, and the mirrors that serve it (tried in order)."""

    name: str
    sha256: str
    urls: tuple[str, ...]


def _idx_remote(base_urls: tuple[str, ...], sha256: dict[str, str]) -> tuple[RemoteFile, ...]:
    return tuple(
        RemoteFile(name, digest, tuple(base + name for base in base_urls))
        for name, digest in sha256.items()
    )


# SHA-256 of the published archives, as pinned by tensorflow/datasets (url_checksums/mnist.txt,
# fashion_mnist.txt) and by torchvision / Keras for the CIFAR python archives.
MNIST_REMOTE = _idx_remote(
    (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    {
        "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
)
FASHION_MNIST_REMOTE = _idx_remote(
    (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
    {
        "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
)
CIFAR10_REMOTE = (
    RemoteFile(
        "cifar-10-python.tar.gz",
        "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
        ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
    ),
)
CIFAR100_REMOTE = (
    RemoteFile(
        "cifar-100-python.tar.gz",
        "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
        ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
    ),
)


# ---------------------------------------------------------------- how each kind of source is stored


class _Storage(ABC):
    """How a source's files are laid out in a folder and read from it."""

    bundled = False  # True: the data ship with an installed package; no folder is involved
    remote: tuple[RemoteFile, ...] = ()
    system_dirs: tuple[Path, ...] = ()
    install_hint = ""  # another way to get the files, e.g. a system package

    @abstractmethod
    def missing_in(self, folder: Path) -> list[str]:
        """The required files that `folder` lacks ([] when it holds a complete copy)."""

    def to_download(self, folder: Path) -> list[RemoteFile]:
        """The published files to fetch into `folder` to complete it."""
        return [r for r in self.remote if r.name in self.missing_in(folder)]

    @abstractmethod
    def read(self, folder: Path | None, source: DatasetSource) -> Dataset:
        """Read the dataset from `folder` (None for bundled data)."""


class _BundledDigits(_Storage):
    """scikit-learn's 8x8 digits, with a fixed stratified test split carved off."""

    bundled = True

    def missing_in(self, folder: Path) -> list[str]:
        return []

    def read(self, folder: Path | None, source: DatasetSource) -> Dataset:
        from sklearn.datasets import load_digits  # deferred: sklearn is slow to import
        from sklearn.model_selection import train_test_split

        bunch = load_digits()
        pixels = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
        labels = np.asarray(bunch.target, dtype=np.int64)
        train_idx, test_idx = train_test_split(
            np.arange(len(labels)),
            test_size=DIGITS_TEST_FRACTION,
            random_state=DIGITS_TEST_SEED,
            stratify=labels,
        )
        train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
        images_t, labels_t = torch.from_numpy(pixels), torch.from_numpy(labels)
        return Dataset(
            name=source.name,
            classes=source.classes,
            train=ImageSet(images_t[train_idx], labels_t[train_idx]),
            test=ImageSet(images_t[test_idx], labels_t[test_idx]),
            notes={
                "source": "sklearn.datasets.load_digits",
                "test_split": f"stratified {DIGITS_TEST_FRACTION:.0%} held out with seed "
                f"{DIGITS_TEST_SEED}",
            },
        )


_IDX_SPLITS = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


@dataclass(frozen=True)
class _IdxFiles(_Storage):
    """MNIST-style IDX files, each either gzipped (*.gz) or unpacked (same name without .gz)."""

    remote: tuple[RemoteFile, ...] = ()
    system_dirs: tuple[Path, ...] = ()
    install_hint: str = ""

    @staticmethod
    def _find(folder: Path, name: str) -> Path | None:
        for candidate in (folder / name, folder / name.removesuffix(".gz")):
            if candidate.is_file():
                return candidate
        return None

    def missing_in(self, folder: Path) -> list[str]:
        names = [name for pair in _IDX_SPLITS.values() for name in pair]
        return [name for name in names if self._find(folder, name) is None]

    def read(self, folder: Path | None, source: DatasetSource) -> Dataset:
        assert folder is not None  # load() passes a located folder
        sets: dict[str, ImageSet] = {}
        used: list[str] = []
        for split, (image_name, label_name) in _IDX_SPLITS.items():
            image_path, label_path = self._find(folder, image_name), self._find(folder, label_name)
            if image_path is None or label_path is None:
                raise DataError(
                    f"{folder}: {image_name} or {label_name} disappeared while loading."
                )
            sets[split] = _idx_split(image_path, label_path, source)
            used += [str(image_path), str(label_path)]
        return Dataset(
            name=source.name,
            classes=source.classes,
            train=sets["train"],
            test=sets["test"],
            notes={"source": str(folder), "files": used},
        )


def _idx_split(image_path: Path, label_path: Path, source: DatasetSource) -> ImageSet:
    """Read and cross-check one images/labels pair of IDX files."""
    images, labels = read_idx(image_path), read_idx(label_path)
    height, width, _ = source.image_shape
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DataError(
            f"{image_path}: expected unsigned-byte images with 3 dimensions (count, rows, "
            f"columns), got {images.dtype} with {images.ndim} dimension(s)."
        )
    if images.shape[1:] != (height, width):
        raise DataError(
            f"{image_path}: images are {images.shape[1]}x{images.shape[2]}, "
            f"expected {height}x{width} for {source.name}."
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(
            f"{label_path}: expected unsigned-byte labels with 1 dimension, got {labels.dtype} "
            f"with {labels.ndim} dimension(s)."
        )
    if len(images) != len(labels):
        raise DataError(
            f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} "
            "labels; the two files do not belong together."
        )
    num_classes = len(source.classes)
    if len(labels) and int(labels.max()) >= num_classes:
        raise DataError(
            f"{label_path}: label {int(labels.max())} outside the class range "
            f"0..{num_classes - 1} of {source.name}."
        )
    return ImageSet(
        torch.from_numpy(images).unsqueeze(1),  # (N, 1, H, W)
        torch.from_numpy(labels.astype(np.int64)),
    )


@dataclass(frozen=True)
class _CifarFiles(_Storage):
    """The CIFAR python archive, or its extracted folder (or the batch files themselves)."""

    layout: CifarLayout = CIFAR10_LAYOUT
    remote: tuple[RemoteFile, ...] = ()

    def _location(self, folder: Path) -> tuple[Path | None, list[str]]:
        """Where to read from in `folder` (extracted batches first), or what is missing."""
        layout = self.layout
        best: list[str] | None = None
        for candidate, prefix in ((folder / layout.folder, f"{layout.folder}/"), (folder, "")):
            present = [name for name in layout.files if (candidate / name).is_file()]
            if len(present) == len(layout.files):
                return candidate, []
            if present and best is None:
                best = [prefix + name for name in layout.files if name not in present]
        if (folder / layout.archive).is_file():
            return folder / layout.archive, []
        return None, best if best is not None else [layout.archive]

    def missing_in(self, folder: Path) -> list[str]:
        return self._location(folder)[1]

    def to_download(self, folder: Path) -> list[RemoteFile]:
        return [] if self._location(folder)[0] else list(self.remote)

    def read(self, folder: Path | None, source: DatasetSource) -> Dataset:
        assert folder is not None  # load() passes a located folder
        location = self._location(folder)[0]
        if location is None:
            raise DataError(f"{folder}: the {self.layout.archive} files disappeared while loading.")
        arrays = read_cifar(location, self.layout, num_classes=len(source.classes))
        return Dataset(
            name=source.name,
            classes=arrays.classes,
            train=ImageSet(
                torch.from_numpy(arrays.train_images), torch.from_numpy(arrays.train_labels)
            ),
            test=ImageSet(
                torch.from_numpy(arrays.test_images), torch.from_numpy(arrays.test_labels)
            ),
            notes={"source": str(location)},
        )


# ---------------------------------------------------------------- the public source type


@dataclass(frozen=True)
class DatasetSource:
    """A built-in dataset: what it holds, and how to find, fetch and load its files."""

    name: str
    description: str
    image_shape: tuple[int, int, int]  # (H, W, C), as Keras users read it
    classes: tuple[str, ...]
    num_train: int
    num_test: int
    storage: _Storage = field(repr=False, compare=False)  # how files are found and read

    def search_dirs(self, data_dir: Path | None) -> list[Path]:
        """Folders looked in, in order: data_dir, data_dir/<name>, the cache, system folders."""
        dirs: list[Path] = []
        if data_dir is not None:
            data_dir = Path(data_dir).expanduser()
            dirs += [data_dir, data_dir / self.name]
        dirs.append(self.cache_dir())
        dirs += list(self.storage.system_dirs)
        return list(dict.fromkeys(dirs))

    def cache_dir(self) -> Path:
        """Where downloads of this dataset go."""
        return cache_root() / self.name

    def missing_files(self, data_dir: Path | None = None) -> list[str]:
        """[] when a complete copy is found; else the files lacking from the most complete folder."""
        if self.storage.bundled:
            return []
        best: list[str] | None = None
        for folder in self.search_dirs(data_dir):
            missing = self.storage.missing_in(folder)
            if not missing:
                return []
            if best is None or len(missing) < len(best):
                best = missing
        return best or []

    def available(self, data_dir: Path | None = None) -> bool:
        """Whether load() would succeed without downloading."""
        return not self.missing_files(data_dir)

    def load(self, data_dir: Path | None = None, download: bool = True) -> Dataset:
        """Load the dataset, downloading into the cache if it is found nowhere and download is on."""
        if self.storage.bundled:
            return self.storage.read(None, self)
        folder = self._locate(data_dir)
        problem = "Downloading is off (download=False / --no-download)."
        if folder is None and download:
            problem = self._download()
            if not self.storage.missing_in(self.cache_dir()):
                folder = self.cache_dir()
        if folder is None:
            raise DataError(self._not_found_message(data_dir, problem))
        logger.info("Loading %s from %s", self.name, folder)
        return self.storage.read(folder, self)

    def _locate(self, data_dir: Path | None) -> Path | None:
        for folder in self.search_dirs(data_dir):
            if not self.storage.missing_in(folder):
                return folder
        return None

    def _download(self) -> str:
        """Fetch what the cache lacks, trying each mirror; return what went wrong, if anything."""
        cache = self.cache_dir()
        needed = self.storage.to_download(cache)
        logger.info(
            "%s not found locally; downloading %d file(s) into %s", self.name, len(needed), cache
        )
        failures: list[str] = []
        for remote in needed:
            errors: list[str] = []
            for url in remote.urls:
                try:
                    fetch(url, cache / remote.name, remote.sha256)
                    break
                except DataError as exc:
                    logger.warning("%s", exc)
                    errors.append(str(exc))
            else:
                failures.append("; ".join(errors))
        return "Download failed: " + " | ".join(failures) if failures else ""

    def _not_found_message(self, data_dir: Path | None, problem: str) -> str:
        lines = [
            f"Dataset '{self.name}' was not found: missing {', '.join(self.missing_files(data_dir))}.",
            "Looked in:",
        ]
        for folder in self.search_dirs(data_dir):
            state = (
                "no such folder"
                if not folder.is_dir()
                else ("lacks " + ", ".join(self.storage.missing_in(folder)))
            )
            lines.append(f"  {folder} ({state})")
        if problem:
            lines.append(problem)
        lines.append(
            f"To get it, download these files into {self.cache_dir()} "
            "(or into the folder you pass as --data-dir):"
        )
        lines += [f"  {remote.urls[0]}  (sha256 {remote.sha256})" for remote in self.storage.remote]
        if self.storage.install_hint:
            lines.append(f"Or: {self.storage.install_hint}")
        return "\n".join(lines)


# ---------------------------------------------------------------- the registry


def _build_registry() -> dict[str, DatasetSource]:
    sources = [
        DatasetSource(
            name="cifar10",
            description="CIFAR-10: 32x32 colour photos of 10 object classes "
            "(50,000 train / 10,000 test).",
            image_shape=(32, 32, 3),
            classes=CIFAR10_CLASSES,
            num_train=50_000,
            num_test=10_000,
            storage=_CifarFiles(layout=CIFAR10_LAYOUT, remote=CIFAR10_REMOTE),
        ),
        DatasetSource(
            name="cifar100",
            description="CIFAR-100: 32x32 colour photos of 100 fine-grained classes "
            "(50,000 train / 10,000 test).",
            image_shape=(32, 32, 3),
            classes=CIFAR100_CLASSES,
            num_train=50_000,
            num_test=10_000,
            storage=_CifarFiles(layout=CIFAR100_LAYOUT, remote=CIFAR100_REMOTE),
        ),
        DatasetSource(
            name="digits",
            description="scikit-learn's 8x8 grayscale handwritten digits (1,797 images, bundled). "
            "It ships no test split: cnnlab holds out a fixed stratified 20% (seed 0) as test "
            "(1,437 train / 360 test).",
            image_shape=(8, 8, 1),
            classes=MNIST_CLASSES,
            num_train=1_437,
            num_test=360,
            storage=_BundledDigits(),
        ),
        DatasetSource(
            name="fashion-mnist",
            description="Fashion-MNIST: Zalando's 28x28 grayscale clothing images, 10 classes "
            "(60,000 train / 10,000 test).",
            image_shape=(28, 28, 1),
            classes=FASHION_MNIST_CLASSES,
            num_train=60_000,
            num_test=10_000,
            storage=_IdxFiles(
                remote=FASHION_MNIST_REMOTE,
                system_dirs=(DEBIAN_FASHION_MNIST_DIR,),
                install_hint=f"apt-get install dataset-fashion-mnist (installs the files into "
                f"{DEBIAN_FASHION_MNIST_DIR}/).",
            ),
        ),
        DatasetSource(
            name="mnist",
            description="MNIST: 28x28 grayscale handwritten digits (60,000 train / 10,000 test).",
            image_shape=(28, 28, 1),
            classes=MNIST_CLASSES,
            num_train=60_000,
            num_test=10_000,
            storage=_IdxFiles(remote=MNIST_REMOTE),
        ),
    ]
    return {source.name: source for source in sources}


DATASETS: dict[str, DatasetSource] = _build_registry()


def list_datasets() -> list[DatasetSource]:
    """Every built-in source, sorted by name."""
    return [DATASETS[name] for name in sorted(DATASETS)]


def get_source(name: str) -> DatasetSource:
    """The source called `name` (case and '_' vs '-' do not matter); DataError if unknown."""
    key = name.strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise DataError(unknown_name("dataset", name, DATASETS))
    return DATASETS[key]


def load_dataset(name: str, data_dir: Path | None = None, download: bool = True) -> Dataset:
    """Load a built-in dataset by name; see DatasetSource.load."""
    return get_source(name).load(data_dir=data_dir, download=download)
