"""Export: the encoder as a standalone folder (state dict + TorchScript + metadata) and features as HDF5.

Module map (tests mirror it as tests/test_export_<module>.py):
  encoder.py     export_encoder / read_export / load_encoder / load_torchscript
  hdf5.py        export_features / read_features (resumable, chunked HDF5)
  transform.py   EncoderTransform: the eval transform rebuilt from an export's metadata
  atomic_dir.py  atomic_directory: build a folder beside its final name, rename when complete
"""
from .encoder import export_encoder, load_encoder, load_torchscript, read_export, read_export_metadata
from .hdf5 import FeatureExportResult, export_features, read_features, read_features_attrs
from .transform import EncoderTransform

__all__ = ["EncoderTransform", "FeatureExportResult", "export_encoder", "export_features", "load_encoder",
           "load_torchscript", "read_export", "read_export_metadata", "read_features", "read_features_attrs"]
