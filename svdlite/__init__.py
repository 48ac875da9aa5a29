"""svdlite: Stable Video Diffusion image-to-video without diffusers, with VCUT and F3-Pruning built in."""
__version__ = "0.1.0"

from .calibrate import calibrate_f3  # noqa: E402
from .components import SVDModel, load_model  # noqa: E402
from .f3 import F3Schedule  # noqa: E402
from .loading import CheckpointError, load_unet  # noqa: E402
from .pipeline import generate  # noqa: E402
from .unet import UNetConfig, VideoUNet  # noqa: E402
from .video import Video  # noqa: E402

__all__ = ["CheckpointError", "F3Schedule", "SVDModel", "UNetConfig", "Video", "VideoUNet", "__version__",
           "calibrate_f3", "generate", "load_model", "load_unet"]
