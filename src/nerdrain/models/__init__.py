from .nerd_rain import NeRDRain, NeRDRainConfig, NeRDRainOutputs
from .registry import create_model, list_models, model_config, register_model

__all__ = ["NeRDRain", "NeRDRainConfig", "NeRDRainOutputs", "create_model", "list_models",
           "model_config", "register_model"]
