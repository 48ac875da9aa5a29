"""Named models: where their weights live and their sampling defaults (docs/model.md "Models and their defaults").

SVD, SVD-XT and SVD-XT 1.1 share one network (UNetConfig()); they differ in weights and in these defaults,
which follow the original sgm sampling configs (`scripts/sampling/configs/*.yaml`, simple_video_sample.py).
`fps` is the diffusers convention: the model is conditioned on fps_id = fps - 1, so fps=7 gives the official
script's fps_id 6.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingConfig:
    num_frames: int
    num_inference_steps: int
    min_guidance_scale: float
    max_guidance_scale: float
    decode_chunk_size: int
    fps: int = 7
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02
    height: int = 576
    width: int = 1024

    def __post_init__(self):
        for name in ("num_frames", "num_inference_steps", "decode_chunk_size", "fps", "height", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"SamplingConfig.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Preset:
    name: str
    repo_id: str  # Hugging Face repository
    single_file: str  # the original sgm checkpoint in that repository
    sampling: SamplingConfig
    gated: bool = False


PRESETS = {
    "svd": Preset("svd", "stabilityai/stable-video-diffusion-img2vid", "svd.safetensors",
                  SamplingConfig(num_frames=14, num_inference_steps=25, min_guidance_scale=1.0,
                                 max_guidance_scale=2.5, decode_chunk_size=14)),
    "svd-xt": Preset("svd-xt", "stabilityai/stable-video-diffusion-img2vid-xt", "svd_xt.safetensors",
                     SamplingConfig(num_frames=25, num_inference_steps=30, min_guidance_scale=1.5,
                                    max_guidance_scale=3.0, decode_chunk_size=14)),
    "svd-xt-1.1": Preset("svd-xt-1.1", "stabilityai/stable-video-diffusion-img2vid-xt-1-1", "svd_xt_1_1.safetensors",
                         SamplingConfig(num_frames=25, num_inference_steps=30, min_guidance_scale=1.5,
                                        max_guidance_scale=3.0, decode_chunk_size=7), gated=True),
    # bundled random weights with SVD's structure at tiny width (tools/make_tiny_model.py): produces noise, not video
    "tiny": Preset("tiny", "", "", SamplingConfig(num_frames=6, num_inference_steps=4, min_guidance_scale=1.0,
                                                  max_guidance_scale=2.5, decode_chunk_size=6, height=128, width=192)),
}
