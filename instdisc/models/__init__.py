"""Encoders and projection heads."""
from .head import ProjectionHead
from .registry import ENCODERS, build_encoder, list_encoders, register_encoder

__all__ = ["ENCODERS", "ProjectionHead", "build_encoder", "list_encoders", "register_encoder"]
