"""Package and file-format versions."""

__version__ = "0.1.0"
CHECKPOINT_FORMAT = 1
EXPORT_FORMAT = 1
FEATURES_FORMAT = 1
