"""Training: config, schedule, checkpoints, progress and the loop."""
from .checkpoint import load_run, read_checkpoint, save_checkpoint
from .config import CHOICES, RECIPES, TrainConfig
from .loop import TrainingDiverged, TrainResult, train, train_one_epoch
from .schedule import lr_at

__all__ = ["CHOICES", "RECIPES", "TrainConfig", "TrainResult", "TrainingDiverged", "load_run", "lr_at", "read_checkpoint",
           "save_checkpoint", "train", "train_one_epoch"]
