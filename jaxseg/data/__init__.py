"""Data: MSD I/O and validation, preprocessing, cache, phantoms, grain pipelines."""

from jaxseg.data.cache import Cache, PrepareConfig, prepare
from jaxseg.data.msd import DataValidationError, DatasetInfo, load_dataset_json
from jaxseg.data.phantom import write_phantom_dataset
from jaxseg.data.pipelines import finetune_dataset, make_iterator, pretrain_dataset
from jaxseg.data.splits import labelled_subset, split_cases
from jaxseg.data.task import Task

__all__ = [
    "Cache", "DataValidationError", "DatasetInfo", "PrepareConfig",
    "finetune_dataset", "labelled_subset", "load_dataset_json", "make_iterator", "prepare", "pretrain_dataset",
    "split_cases", "Task", "write_phantom_dataset",
]
