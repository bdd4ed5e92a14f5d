"""Training: config, schedule, checkpoints, progress and the loop."""
from .checkpoint import load_run, read_checkpoint, save_checkpoint
from .config import RECIPES, TrainConfig
from .loop import TrainingDiverged, TrainResult, resolve_device, train
from .schedule import lr_at

__all__ = ["RECIPES", "TrainConfig", "TrainResult", "TrainingDiverged", "load_run", "lr_at", "read_checkpoint",
           "resolve_device", "save_checkpoint", "train"]
