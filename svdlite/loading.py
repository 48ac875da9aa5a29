"""The one loader: any component from any source (original file, diffusers folder or file, svdlite file).

`load_component(ms, component)` builds the component's module on the meta device for the networks the source
declares (formats.open_model_source), makes its read plan (read_plans.py) and loads it strictly (strict_load.py).
`load_model` (components.py), `load_unet`, conversion (convert.py) and `svdlite info` (info.py) all go through it.
"""
import contextlib

import torch
from torch import nn

from .checkpoint_file import CheckpointError
from .clip import build_image_encoder
from .formats import SVDLITE_FORMAT, ModelSource, blend_is_stored_folded, open_model_source
from .read_plans import component_plan
from .strict_load import gc_paused, load_planned, state_shapes
from .tensor_source import TensorSource
from .unet import UNetConfig, VideoUNet
from .vae import ConditionEncoder, FrameDecoder, VideoDecoder

__all__ = ["CheckpointError", "build_component", "load_component", "load_unet", "planned_component"]


def build_component(component: str, ms: ModelSource, fold_cross_attention: bool | str = True,
                    fold_product: bool | None = None) -> nn.Module:
    """The empty (meta device) module of a component, for the checkpoint's configs. fold_product (UNet): whether
    the folded cross-attention holds the product; by default as the source stores it (only svdlite files do)."""
    if fold_product is None:
        fold_product = ms.fmt == SVDLITE_FORMAT
    with torch.device("meta"):
        if component == "unet":
            return VideoUNet(ms.unet_config, fold_cross_attention=fold_cross_attention, fold_product=fold_product)
        if component == "vae_encoder":
            return ConditionEncoder(ms.vae_config)
        if component == "vae_decoder":
            return FrameDecoder(ms.vae_config) if ms.frame_decoder else VideoDecoder(ms.vae_config)
        return build_image_encoder(ms.clip_config)


def planned_component(ms: ModelSource, component: str, **build) -> tuple[nn.Module, dict, dict, set, set]:
    """(meta module, its state shapes, read plan, scope, deliberately unread keys): what loading the component
    would read, nothing read yet (`info` reports from it). build: `build_component`'s fold options."""
    model = build_component(component, ms, **build)
    shapes = state_shapes(model)
    plan, scope, ignored = component_plan(ms, component, shapes)
    return model, shapes, plan, scope, ignored


def _label(ms: ModelSource, component: str) -> str:
    label = f"{ms.fmt}-format {component} ({ms.path})"
    if component == "unet":  # a wrong network is the usual cause of shape errors: say which one was expected
        c = ms.unet_config
        label += (f" for UNetConfig(model_channels={c.model_channels}, channel_mult={c.channel_mult}, "
                  f"context_dim={c.context_dim})")
    return label


def load_component(ms: ModelSource, component: str, *, device="cpu", dtype: torch.dtype = torch.float32,
                   fold_cross_attention: bool | str = True, fold_product: bool | None = None,
                   on_read=None) -> nn.Module:
    """One component, loaded strictly, in eval mode, without gradients.

    fold_cross_attention, fold_product: the UNet's (`build_component`); an svdlite file holds only the folded
    product. on_read(bytes) reports the reading in steps (a progress bar's update; `strict_load.load_planned`)."""
    if component == "unet" and fold_cross_attention is not True and ms.fmt == SVDLITE_FORMAT:
        raise CheckpointError(f"{ms.path} is an svdlite file, which holds only the folded cross-attention; the "
                              "unfolded ablation needs an original or diffusers checkpoint")
    # the UNet's ~27k module objects are built with the collector paused (strict_load.gc_paused); never the CLIP
    # tower, whose build imports open_clip: its import cycles would wait for a collection in the middle of sampling
    with gc_paused() if component == "unet" else contextlib.nullcontext():
        model, shapes, plan, scope, ignored = planned_component(
            ms, component, fold_cross_attention=fold_cross_attention, fold_product=fold_product)
        load_planned(model, ms.files[component], plan, scope=scope, ignored=ignored, dtype=dtype, device=device,
                     label=_label(ms, component), shapes=shapes, on_read=on_read)
    if component == "unet":
        mark_stored_blend(model, ms.files["unet"])
    return model


def mark_stored_blend(unet: VideoUNet, src: TensorSource) -> VideoUNet:
    """Mark each VideoResBlock of `unet`, loaded from `src`, as holding the blend folded in if the file says so
    (`VideoResBlock.branch_scale` is then 1 for video frames); other files' tensors are used as they are."""
    from .unet_blocks import VideoResBlock

    if blend_is_stored_folded(src):
        for block in unet.modules():
            if isinstance(block, VideoResBlock):
                block.blend_folded = True
    return unet


def load_unet(source, config: UNetConfig | None = None, *, device="cpu", dtype: torch.dtype = torch.float32,
              fold_cross_attention: bool | str = True, return_source: bool = False):
    """`VideoUNet` loaded strictly from `source`: an original file, a diffusers pipeline or `unet/` folder or UNet
    file, or an svdlite file (format detected; formats.open_model_source).

    config: the network; by default the one the checkpoint declares (svdlite metadata, diffusers config.json, an
    original file's shapes with SVD's head width 64). Pass it for a network whose head width is not 64.
    Cross-attention is folded (unet_blocks.py): an svdlite file holds the product, original and diffusers files load
    attn2 `to_v`/`to_out` as they are (no product at load); attn2 `to_q`/`to_k` are never read.
    fold_cross_attention=False (ablation only) loads the original attn2 weights and computes them at every call;
    "temporal" folds only the temporal blocks' (the VCUT paper's variant).
    return_source: also return the UNet's TensorSource (its `reads` list what was read).
    """
    ms = open_model_source(source, require_all=False, unet_config=config)
    model = load_component(ms, "unet", device=device, dtype=dtype, fold_cross_attention=fold_cross_attention)
    return (model, ms.files["unet"]) if return_source else model
