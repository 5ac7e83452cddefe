"""Data: MSD I/O and validation, preprocessing, cache, phantoms, grain pipelines."""

from jaxseg.data.cache import Cache, PrepareConfig, label_budget, prepare, split_cases
from jaxseg.data.msd import DataValidationError, DatasetInfo, load_dataset_json
from jaxseg.data.phantom import write_phantom_dataset
from jaxseg.data.pipelines import (FinetuneDataConfig, PretrainDataConfig, finetune_dataset, make_iterator,
                                   pretrain_dataset)
from jaxseg.data.task import Task

__all__ = [
    "Cache", "DataValidationError", "DatasetInfo", "FinetuneDataConfig", "PrepareConfig", "PretrainDataConfig",
    "finetune_dataset", "label_budget", "load_dataset_json", "make_iterator", "prepare", "pretrain_dataset",
    "split_cases", "Task", "write_phantom_dataset",
]
