"""instdisc: memory-bank instance discrimination (Wu et al., CVPR 2018) — train, evaluate with kNN, export.

The public API is listed in ``__all__``; the README's module map says which file holds what and which test covers it.
"""
from .downstream import finetune, linear_probe, load_finetuned
from .data import BatchAugment, IndexedDataset, build_dataset, eval_transform, train_transform
from .errors import InstdiscError
from .export import export_encoder, export_features, read_features
from .features import Features, extract_features
from .knn import knn_evaluate, retrieval_evaluate
from .method import InstDiscModel, build_model
from .models import ProjectionHead, build_encoder, list_encoders
from .objective import Objective
from .seeding import seed_everything
from .source import ModelSource, load_encoder, open_model
from .training import RECIPES, TrainConfig, TrainResult, load_run, train
from .version import __version__

__all__ = [
    "BatchAugment", "Features", "IndexedDataset", "InstDiscModel", "InstdiscError", "ModelSource", "Objective",
    "ProjectionHead", "RECIPES", "TrainConfig", "TrainResult", "__version__", "build_dataset", "build_encoder",
    "build_model", "eval_transform", "extract_features", "knn_evaluate", "list_encoders", "load_run", "open_model",
    "retrieval_evaluate", "seed_everything", "train", "train_transform",
    "export_encoder", "export_features", "finetune", "linear_probe", "load_encoder", "load_finetuned", "read_features",
]
