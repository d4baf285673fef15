"""NeRD-Rain single-image deraining (Chen, Pan, Dong, CVPR 2024)."""

__version__ = "0.1.0"
