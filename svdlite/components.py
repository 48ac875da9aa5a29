"""The whole model: its four components loaded from a preset name or a path, and the preset whose defaults apply.

Components and their svdlite names: `unet` (VideoUNet), `vae_encoder` (encoder + quant_conv, the conditioning
path), `vae_decoder` (temporal VideoDecoder), `image_encoder` (OpenCLIP ViT-H/14 visual tower). Each is read
from an original single file, a diffusers pipeline folder or an svdlite file by the one loader (loading.py).
"""
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .checks import resolve_device, resolve_dtype
from .checkpoint_file import CheckpointError
from .clip import CLIPVisionConfig
from .formats import COMPONENTS, open_model_source
from .loading import load_component
from .presets import PRESETS
from .read_plans import component_bytes
from .unet import VideoUNet
from .vae import ConditionEncoder, FrameDecoder, VAEConfig, VideoDecoder

__all__ = ["COMPONENTS", "SVDModel", "load_model", "resolve_model_path"]


@dataclass
class SVDModel:
    """Loaded components plus the preset whose sampling defaults apply."""

    unet: VideoUNet
    vae_encoder: ConditionEncoder
    vae_decoder: VideoDecoder | FrameDecoder  # FrameDecoder: an *_image_decoder checkpoint, no temporal layers
    image_encoder: nn.Module
    vae_config: VAEConfig
    clip_config: CLIPVisionConfig
    preset: str
    source: str

    @property
    def sampling(self):
        return PRESETS[self.preset].sampling


def resolve_model_path(model, token: str | None = None) -> tuple[Path, str | None]:
    """A model argument (preset name or path) -> (local path, preset name if one was named)."""
    if isinstance(model, str) and model in PRESETS:
        if model == "tiny":
            return Path(__file__).parent / "assets" / "tiny.safetensors", "tiny"
        from .hub import download_preset
        return download_preset(model, token=token), model
    path = Path(model)
    if not path.exists():
        raise CheckpointError(f"model {model!r}: no such file or folder, and not a preset ({', '.join(PRESETS)})")
    return path, None


def load_model(model="svd-xt", *, device="auto", dtype="auto", token: str | None = None,
               progress: bool = False) -> SVDModel:
    """Load all four components from a preset name, an original file, a diffusers folder or an svdlite file.

    Args:
        model: a preset name (`svd`, `svd-xt`, `svd-xt-1.1`: downloaded once from Hugging Face; `tiny`: the
            bundled random model), or the path of an original `.safetensors` file, a diffusers folder or an
            svdlite file.
        device: "auto" (the default: the first CUDA GPU when torch sees one, else the CPU; `checks.resolve_device`),
            or a device: "cpu", "cuda", "cuda:N", "mps" or a torch.device.
        dtype: the UNet's and CLIP's dtype: "auto" (the default: float16 on a CUDA or MPS GPU, what SVD is run in
            there, and float32 on the CPU, where half precision is slower and less exact; `checks.resolve_dtype`),
            or torch.float32, torch.float16 or torch.bfloat16. The VAE runs in float32 whatever `dtype` is (as sgm
            disables autocast for encoding and decoding).
        token: a Hugging Face token, for a gated preset (default: the `HF_TOKEN` environment variable or the
            huggingface-cli login).
        progress: show a progress bar on stderr (tqdm: "loading", the bytes of the components' tensors read, the
            time left). It moves every few tensors, costing the loading nothing measurable.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    path, preset = resolve_model_path(model, token)
    ms = open_model_source(path, preset)
    dtypes = {"unet": dtype, "vae_encoder": torch.float32, "vae_decoder": torch.float32, "image_encoder": dtype}
    sizes = {component: component_bytes(ms, component) for component in dtypes} if progress else {}
    parts = {}
    with tqdm(total=sum(sizes.values()), desc="loading", unit="B", unit_scale=True, disable=not progress) as bar:
        for component, component_dtype in dtypes.items():
            before = bar.n
            parts[component] = load_component(ms, component, device=device, dtype=component_dtype,
                                               on_read=bar.update if progress else None)
            if progress:  # the tensors of the component's scope left unread (attn2's to_q and to_k in the UNet)
                bar.update(max(0, before + sizes[component] - bar.n))
    return SVDModel(**parts, vae_config=ms.vae_config, clip_config=ms.clip_config, preset=ms.preset,
                    source=str(path))
