"""SVD's image conditioning: the OpenCLIP ViT-H/14 visual tower and sgm's preprocessing (docs/model.md "Conditioning").

Reproduces sgm `encoders/modules.py` `FrozenOpenCLIPImageEmbedder` as SVD uses it: kornia's antialiased bicubic
resize to 224x224 (aspect ratio not kept), (x + 1) / 2, CLIP mean/std, then `model.visual(img)`: ln_post on the
class token, `@ proj`, a 1024-d embedding, not normalised. It becomes the single cross-attention token.

The tower is open_clip's own `VisionTransformer`, built empty (no download, no pretrained tag), so its state-dict
names are the checkpoint's with `conditioner.embedders.0.open_clip.model.visual.` stripped (clip_keymap.py).
"""
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

# CLIP normalisation (sgm's mean/std buffers, transformers' OPENAI_CLIP_MEAN/STD); Python constants, not buffers.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LAYER_NORM_EPS = 1e-5  # torch/open_clip default, and SVD's transformers config

# transformers `CLIPVisionConfig` class defaults: a config.json may omit keys equal to these.
_TRANSFORMERS_DEFAULTS = {
    "hidden_size": 768, "intermediate_size": 3072, "projection_dim": 512, "num_hidden_layers": 12,
    "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}


@dataclass(frozen=True)
class CLIPVisionConfig:
    """OpenCLIP visual-tower hyperparameters; defaults are ViT-H/14 as in SVD (632,076,800 parameters)."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1280
    layers: int = 32
    heads: int = 16
    mlp_ratio: float = 4.0
    output_dim: int = 1024

    def __post_init__(self):
        for name in ("image_size", "patch_size", "width", "layers", "heads", "output_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"CLIPVisionConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.mlp_ratio, (int, float)) or isinstance(self.mlp_ratio, bool) or self.mlp_ratio <= 0:
            raise ValueError(f"CLIPVisionConfig.mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        if self.width % self.heads:
            raise ValueError(f"CLIPVisionConfig.width={self.width} is not divisible by heads={self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"CLIPVisionConfig.image_size={self.image_size} is not a multiple of "
                             f"patch_size={self.patch_size}")
        if self.mlp_width <= 0:
            raise ValueError(f"CLIPVisionConfig: int(width * mlp_ratio) = int({self.width} * {self.mlp_ratio}) "
                             "must be positive")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def grid_size(self) -> int:
        """Patches per side (16 for ViT-H/14 at 224)."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        """Patch tokens plus the class token (257 for ViT-H/14 at 224)."""
        return self.grid_size**2 + 1

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)  # open_clip's ResidualAttentionBlock rounds the same way

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any]) -> "CLIPVisionConfig":
        """Convert a transformers `CLIPVisionConfig` dict (diffusers `image_encoder/config.json`).

        Keys absent from the dict take transformers' class defaults, as transformers would. A nested `CLIPConfig`
        dict is accepted through its `vision_config`. Raises ValueError for anything open_clip's tower cannot
        express exactly: hidden_act other than exact "gelu" (transformers' default is "quick_gelu"), layer_norm_eps
        other than 1e-5, num_channels other than 3, non-square image or patch size, or a non-integral MLP ratio.
        """
        if "vision_config" in config and "hidden_size" not in config:
            config = config["vision_config"]
        c = {**_TRANSFORMERS_DEFAULTS, **config}
        if c["hidden_act"] != "gelu":
            raise ValueError(f"hidden_act={c['hidden_act']!r} is not supported; the SVD tower uses exact (erf) "
                             "'gelu'" + (" (the key is missing and transformers defaults to 'quick_gelu')"
                                         if "hidden_act" not in config else ""))
        if c["layer_norm_eps"] != LAYER_NORM_EPS:
            raise ValueError(f"layer_norm_eps={c['layer_norm_eps']!r} is not supported; expected {LAYER_NORM_EPS}")
        if c["num_channels"] != 3:
            raise ValueError(f"num_channels={c['num_channels']!r} is not supported; expected 3")
        size, patch = (_square(c, name) for name in ("image_size", "patch_size"))
        width, inner = c["hidden_size"], c["intermediate_size"]
        out = cls(image_size=size, patch_size=patch, width=width, layers=c["num_hidden_layers"],
                  heads=c["num_attention_heads"], mlp_ratio=inner / width, output_dim=c["projection_dim"])
        if out.mlp_width != inner:
            raise ValueError(f"intermediate_size={inner} is not representable as int(hidden_size * mlp_ratio) "
                             f"with hidden_size={width}")
        return out


def _square(c: Mapping[str, Any], name: str) -> int:
    value = c[name]
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{name}={value!r} is not supported; expected a square size")
        value = value[0]
    return value


class TorchvisionMismatchError(RuntimeError):
    """torchvision, which open_clip imports, was built for another torch than the one installed."""


PYTORCH_VERSIONS_PAGE = "https://pytorch.org/get-started/previous-versions/"


def _installed_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "(not found)"


def torchvision_mismatch_message(err: BaseException) -> str:
    """What to do when torchvision's import fails because it was built for another torch."""
    torch_version, torchvision_version = _installed_version("torch"), _installed_version("torchvision")
    build = f" ({torch.__version__})" if torch.__version__ != torch_version else ""
    return (f"cannot import open_clip (svdlite builds the CLIP image encoder with it): the installed torchvision "
            f"{torchvision_version} was built for another torch than the installed torch {torch_version}{build} "
            f"(importing torchvision failed: {' '.join(str(err).split())}). Install the torchvision release built "
            f"for torch {torch_version}, from the same index as torch (pip install torch=={torch_version} "
            f"torchvision==<that release>, a matching pair; see {PYTORCH_VERSIONS_PAGE})")


def _open_clip_tower_builder():
    """open_clip's (CLIPVisionCfg, _build_vision_tower), imported on first use: open_clip scans its model configs
    when imported, so it is not imported with the package. A torchvision built for another torch fails inside that
    import (torchvision registers its operators against torch's); that failure is a TorchvisionMismatchError naming
    both installed versions."""
    try:
        from open_clip.model import CLIPVisionCfg, _build_vision_tower
    except RuntimeError as err:
        text = str(err)
        if "torchvision::" in text or "torchvision versions are incompatible" in text:
            raise TorchvisionMismatchError(torchvision_mismatch_message(err)) from err
        raise
    return CLIPVisionCfg, _build_vision_tower


def build_image_encoder(config: CLIPVisionConfig = CLIPVisionConfig()) -> nn.Module:
    """An empty open_clip `VisionTransformer` built as sgm builds ViT-H/14; use it under `torch.device("meta")`.

    The same call open_clip's `create_model("ViT-H-14")` makes (`_build_vision_tower`, QuickGELU off, no cast
    dtype), minus the weight download. `forward(x)` (N, 3, S, S) -> (N, output_dim) is `ln_post(x[:, 0]) @ proj`,
    the plain class-token embedding sgm's `FrozenOpenCLIPImageEmbedder` takes from `model.visual(img)`; the
    settings that would change that are checked after construction.
    """
    CLIPVisionCfg, _build_vision_tower = _open_clip_tower_builder()
    cfg = CLIPVisionCfg(layers=config.layers, width=config.width, head_width=config.head_dim,
                        mlp_ratio=config.mlp_ratio, patch_size=config.patch_size, image_size=config.image_size)
    visual = _build_vision_tower(config.output_dim, cfg, quick_gelu=False, cast_dtype=None)
    _check_plain_tower(visual)
    return visual


def _check_plain_tower(visual: nn.Module) -> None:
    """Fail loudly if this open_clip version's defaults would not give the plain class-token embedding."""
    gelu = visual.transformer.resblocks[0].mlp.gelu
    problems = {
        "attentional pooler": getattr(visual, "attn_pool", None) is not None,
        "pool_type != 'tok'": getattr(visual, "pool_type", "tok") != "tok",
        "global average pool": bool(getattr(visual, "global_average_pool", False)),
        "output_tokens": bool(visual.output_tokens),
        "ln_pre missing": not isinstance(visual.ln_pre, nn.LayerNorm),
        "LayerNorm eps != 1e-5": any(m.eps != LAYER_NORM_EPS for m in visual.modules()
                                     if isinstance(m, nn.LayerNorm)),
        "activation is not exact GELU": not (isinstance(gelu, nn.GELU) and gelu.approximate == "none"),
        "layer scale": any(not isinstance(getattr(b, "ls_1", nn.Identity()), nn.Identity)
                           for b in visual.transformer.resblocks),
    }
    bad = [name for name, failed in problems.items() if failed]
    if bad:
        raise RuntimeError(f"open_clip built a visual tower that differs from sgm's ViT-H/14: {bad}")


def _gaussian_kernel(sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """kornia's 1-D Gaussian: size int(max(4 sigma, 3)) made odd, exp(-t^2 / 2 sigma^2) normalised to sum 1."""
    size = int(max(4.0 * sigma, 3.0))
    size += 1 - size % 2
    t = torch.arange(size, dtype=dtype, device=device) - size // 2
    s = torch.tensor(sigma, dtype=dtype, device=device)  # the references hold sigma in the image dtype
    g = torch.exp(-t.pow(2) / (2 * s.pow(2)))
    return g / g.sum()


def _blur_axis(x: torch.Tensor, kernel: torch.Tensor, axis: str) -> torch.Tensor:
    """Convolve every channel of (N, C, H, W) with `kernel` along "h" or "w", reflect padding."""
    n, pad = x.shape[0], kernel.numel() // 2
    weight = kernel.view(1, 1, -1, 1) if axis == "h" else kernel.view(1, 1, 1, -1)
    x = rearrange(x, "n c h w -> (n c) 1 h w")
    x = F.pad(x, (0, 0, pad, pad) if axis == "h" else (pad, pad, 0, 0), mode="reflect")
    return rearrange(F.conv2d(x, weight), "(n c) 1 h w -> n c h w", n=n)


def resize_antialiased(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """kornia `geometry.resize(image, size, "bicubic", align_corners=True, antialias=True)`, as sgm calls it.

    When downscaling, first a separable Gaussian blur with sigma = max((factor - 1) / 2, 0.001) per axis (skimage's
    rule; factor = input / output size), kernel int(max(4 sigma, 3)) made odd, reflect padding; then bicubic
    interpolation with align_corners=True. Like kornia: same size returns the input, pure upscaling does not blur.
    diffusers' `_resize_with_antialiasing` is the same computation (it also "blurs" with sigma 0.001, a no-op).
    """
    h, w = image.shape[-2:]
    size = (int(size[0]), int(size[1]))
    if (h, w) == size:
        return image
    fh, fw = h / size[0], w / size[1]
    if max(fh, fw) > 1:
        for axis, factor in (("w", fw), ("h", fh)):  # kornia filters along W first, then H
            # An axis with factor <= 1 gets sigma 0.001, whose kernel is exactly [0, 1, 0] (exp(-5e5) underflows
            # to 0), so skipping it is exact and avoids reflect padding of a 1-pixel-thin axis.
            if factor > 1:
                sigma = max((factor - 1.0) / 2.0, 0.001)
                image = _blur_axis(image, _gaussian_kernel(sigma, image.dtype, image.device), axis)
    return F.interpolate(image, size=size, mode="bicubic", align_corners=True)


def preprocess(image: torch.Tensor, size: int | tuple[int, int] = 224) -> torch.Tensor:
    """sgm `FrozenOpenCLIPImageEmbedder.preprocess`: image in [-1, 1] -> CLIP input.

    Args:
        image: (N, 3, H, W) floating point in [-1, 1], any H and W (aspect ratio is not kept).
        size: output side (or (height, width)); the tower's image_size.

    Returns:
        (N, 3, size, size), at least float32: antialiased bicubic resize, (x + 1) / 2, CLIP mean/std.
    """
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"expected an image batch of shape (N, 3, H, W), got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"expected a floating-point image in [-1, 1], got dtype {image.dtype}")
    size = (size, size) if isinstance(size, int) else size
    x = image.to(torch.promote_types(image.dtype, torch.float32))
    x = resize_antialiased(x, size)
    x = (x + 1.0) / 2.0
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device)
    return (x - rearrange(mean, "c -> c 1 1")) / rearrange(std, "c -> c 1 1")


@torch.no_grad()
def encode_image(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """The cross-attention token of sgm's conditioner `embedders.0` for a clean image.

    Args:
        model: the tower from `build_image_encoder`, weights loaded.
        image: (N, 3, H, W) in [-1, 1], the un-noised conditioning image at full resolution.

    Returns:
        (N, 1, output_dim) in the model's dtype and device; not normalised. The unconditional token is zeros.
    """
    weight = model.conv1.weight
    x = preprocess(image.to(weight.device), model.image_size).to(weight.dtype)
    return rearrange(model(x), "n d -> n 1 d")
