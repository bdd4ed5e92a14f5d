"""Encoders and projection heads."""
from .head import ProjectionHead
from .registry import ENCODERS, build_encoder, encoder_recipe, list_encoders, register_encoder

__all__ = ["ENCODERS", "ProjectionHead", "build_encoder", "encoder_recipe", "list_encoders", "register_encoder"]
