"""Datasets: the built-in sources, safe file readers, validation splits and batch transforms."""

from cnnlab.data.cifar import RestrictedUnpickler, load_cifar_batch
from cnnlab.data.download import cache_root, fetch
from cnnlab.data.idx import read_idx
from cnnlab.data.registry import (
    DATASETS,
    DatasetSource,
    get_source,
    list_datasets,
    load_dataset,
)
from cnnlab.data.splits import split_validation
from cnnlab.data.transforms import Augment, augment_batch, channel_stats, normalize
from cnnlab.data.types import Dataset, ImageSet

__all__ = [
    "DATASETS",
    "Augment",
    "Dataset",
    "DatasetSource",
    "ImageSet",
    "RestrictedUnpickler",
    "augment_batch",
    "cache_root",
    "channel_stats",
    "fetch",
    "get_source",
    "list_datasets",
    "load_cifar_batch",
    "load_dataset",
    "normalize",
    "read_idx",
    "split_validation",
]
