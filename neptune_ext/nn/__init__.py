"""Drop-in layers: Stage (fused Conv2d -> BatchNorm2d -> ReLU) and fuse_stages(model)."""
from .stage import Stage
from ..fuse import fuse_stages

__all__ = ["Stage", "fuse_stages"]
