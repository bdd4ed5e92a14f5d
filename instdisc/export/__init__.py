"""Export: the encoder as a standalone folder (state dict, TorchScript, safetensors, ONNX, metadata) and features
as HDF5.

Module map (tests mirror it as tests/test_export_<module>.py; folders are written by instdisc.atomic_dir):
  encoder.py     export_encoder / read_export / load_torchscript (load_encoder: instdisc.source)
  formats.py     what every format's writer and checker share (ExportContext, ExportParityError, parity)
  fmt_torchscript.py, fmt_safetensors.py, fmt_onnx.py   one writer + one checker per format (encoder.FORMATS)
  hdf5.py        export_features / read_features (resumable, chunked HDF5)
  transform.py   EncoderTransform: the eval transform rebuilt from an export's metadata
"""
from .encoder import export_encoder, load_torchscript, read_export, read_export_metadata
from .hdf5 import FeatureExportResult, export_features, read_features, read_features_attrs
from .transform import EncoderTransform

__all__ = ["EncoderTransform", "FeatureExportResult", "export_encoder", "export_features", "load_torchscript",
           "read_export", "read_export_metadata", "read_features", "read_features_attrs"]
