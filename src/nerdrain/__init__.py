"""NeRD-Rain single-image deraining (Chen, Pan, Dong, CVPR 2024)."""

from .checkpoint import CheckpointError, load_default_model, load_model, save_model
from .inference import clear_default_model_cache, derain, derain_files
from .models import NeRDRain, NeRDRainConfig, create_model, list_models

__version__ = "0.1.0"

__all__ = ["CheckpointError", "NeRDRain", "NeRDRainConfig", "clear_default_model_cache", "create_model", "derain",
           "derain_files", "list_models", "load_default_model", "load_model", "save_model", "__version__"]
