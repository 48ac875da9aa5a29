"""svdlite: Stable Video Diffusion image-to-video without diffusers, with VCUT and F3-Pruning built in."""
from .unet import UNetConfig, VideoUNet

__version__ = "0.1.0"
__all__ = ["UNetConfig", "VideoUNet", "__version__"]
