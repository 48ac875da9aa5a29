"""svdlite: Stable Video Diffusion image-to-video without diffusers, with VCUT and F3-Pruning built in."""
from .calibrate import calibrate_f3
from .components import SVDModel, load_model
from .f3 import F3Schedule
from .checkpoint_file import CheckpointError
from .loading import load_unet
from .pipeline import generate
from .run import RunSpec
from .unet import UNetConfig, VideoUNet
from .version import __version__
from .video import Video

__all__ = ["CheckpointError", "F3Schedule", "RunSpec", "SVDModel", "UNetConfig", "Video", "VideoUNet", "__version__",
           "calibrate_f3", "generate", "load_model", "load_unet"]
