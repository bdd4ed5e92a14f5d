"""Datasets, transforms and batched augmentation for instdisc (see docs/design.md, "Datasets").

Module map (tests mirror it as tests/test_data_<module>.py):
  spec.py       build_dataset / parse_spec / scan_bad_images   dataset.py  IndexedDataset
  idx.py        MNIST-style IDX files                          cifar.py    CIFAR python batches
  folder.py     image folders (scandir index)                  filelist.py text file lists
  index_cache.py cached listings and scans                     images.py   open / check image files
  paths.py      compact path table                             transforms.py  PIL recipes
  batch_aug.py  the recipe on uint8 batch tensors             geometry.py size and channels from the images
  cache.py      decoded-image caches (read, memmap)             prepare.py  write a cache (instdisc prepare)
  subset.py     rows_of: a dataset restricted to some rows
"""
from .batch_aug import BatchAugment, batch_eval
from .dataset import IndexedDataset
from .images import IMG_EXTENSIONS, BadImage
from .spec import DATASET_NAMES, build_dataset, parse_spec, scan_bad_images
from .transforms import TwoView, eval_transform, train_transform

__all__ = [
    "IndexedDataset", "build_dataset", "parse_spec", "scan_bad_images", "BadImage", "DATASET_NAMES",
    "IMG_EXTENSIONS", "train_transform", "eval_transform", "TwoView", "BatchAugment", "batch_eval",
]
