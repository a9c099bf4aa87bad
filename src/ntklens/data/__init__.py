"""ntklens.data: real datasets, checksummed downloads, nested subsets and probe sets.

``load_dataset`` returns a :class:`Dataset` of float32 inputs and int64 labels;
``nested_subset_indices`` and ``probe_indices`` pick the training subset and the fixed
probe set of a run as index arrays into it.
"""

from ntklens.data.dataset import Dataset, dataset_from_arrays, preprocess
from ntklens.data.registry import (
    DATASET_NAMES,
    SOURCES,
    dataset_from_factory,
    download_dataset,
    load_dataset,
)
from ntklens.data.subsets import (
    evaluation_subset_indices,
    nested_subset_indices,
    probe_indices,
    stratified_permutation,
)
from ntklens.data.synthetic import teacher_task

__all__ = [
    "DATASET_NAMES",
    "SOURCES",
    "Dataset",
    "dataset_from_arrays",
    "dataset_from_factory",
    "download_dataset",
    "evaluation_subset_indices",
    "load_dataset",
    "nested_subset_indices",
    "preprocess",
    "probe_indices",
    "stratified_permutation",
    "teacher_task",
]
