"""NeRD-Rain single-image deraining (Chen, Pan, Dong, CVPR 2024)."""

from .checkpoint import CheckpointError, load_default_model, load_model, save_model
from .models import NeRDRain, NeRDRainConfig, create_model, list_models

__version__ = "0.1.0"


def derain(*args, **kwargs):
    """Derain a PIL image, numpy array or tensor; see :func:`nerdrain.inference.derain`."""
    from .inference import derain as _derain

    return _derain(*args, **kwargs)


__all__ = ["CheckpointError", "NeRDRain", "NeRDRainConfig", "create_model", "derain", "list_models",
           "load_default_model", "load_model", "save_model", "__version__"]
