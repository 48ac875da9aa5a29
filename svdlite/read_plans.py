"""Read plans: for each component and format, which file tensors make each module tensor, and which file keys are
the component's.

A plan is {module key: strict_load.Entry(file keys, combine)}; the scope is the set of file keys that belong to the
component (those read, and those deliberately left unread: the UNet's attn2 to_q/to_k, the text-side keys of a
transformers CLIP). Both come from the tables SCOPES and PLANS, one function per (format, component); an svdlite
file needs no table: every module key is stored under `<component>.`.
"""
import torch

from . import clip_keymap, vae_keymap
from .formats import COMPONENTS, SVDLITE_FORMAT, SVDLITE_PREFIXES, ModelSource
from .strict_load import Entry, state_shapes
from .unet import UNetConfig, VideoUNet
from .unet_keymap import ORIGINAL_PREFIX, diffusers_unet_names, fold_sources, original_unet_keys


def fold_matmul(w_out: torch.Tensor, w_v: torch.Tensor) -> torch.Tensor:
    """attn2's W_out (C, C') @ W_v (C', D), in the dtype given (the loader passes float32, or float64 for a
    float64 model): float32 differs from the float64 product by ~1e-6 relative (tests/test_loading.py)."""
    return w_out @ w_v


def fold_shape(out_shape: tuple[int, ...], v_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of `fold_matmul`'s product; a RuntimeError (reported as a wrong shape) if it is undefined."""
    if len(out_shape) != 2 or len(v_shape) != 2 or out_shape[1] != v_shape[0]:
        raise RuntimeError(f"cannot multiply {out_shape} by {v_shape}")
    return out_shape[0], v_shape[1]


def unet_plan(fmt: str, config: UNetConfig, ours) -> tuple[dict[str, Entry], set[str]]:
    """The UNet's plan for an original or diffusers file, and every original tensor of the network (its scope's
    deliberately unread part is attn2's to_q/to_k). A folded module key with two sources (attn2 `to_out`, `to_v`)
    is their product (an svdlite file stores it, `fold_product`); the model may also hold both as they are."""
    keys = original_unet_keys(ours)
    names = {k: ORIGINAL_PREFIX + k for k in keys} if fmt == "original" else diffusers_unet_names(config, keys)
    plan = {}
    for key in ours:
        sources = tuple(names[s] for s in fold_sources(key))
        plan[key] = Entry(sources, fold_matmul, fold_shape) if len(sources) == 2 else Entry(sources)
    return plan, set(names.values())


def _renamed(rename, reshape=None):
    """A plan function: each module key read from `rename(ms, key)`, reshaped by `reshape(key)` (None: as is)."""
    def plan(ms: ModelSource, ours) -> tuple[dict[str, Entry], set[str]]:
        return {k: Entry((rename(ms, k),), reshape and reshape(k)) for k in ours}, set()
    return plan


def _vae_reshape(key: str):
    """diffusers' VAE mid-attention Linear (C, C) -> the original 1x1 conv (C, C, 1, 1); None elsewhere."""
    if vae_keymap.to_original_shape(key, torch.empty(1, 1, device="meta")).ndim == 4:
        return lambda t: vae_keymap.to_original_shape(key, t)
    return None


def _original_encoder_name(ms: ModelSource, key: str) -> str:
    if key.startswith("encoder."):
        return vae_keymap.ENCODER_PREFIX + key.removeprefix("encoder.")
    return vae_keymap.QUANT_CONV_PREFIX + key.removeprefix("quant_conv.")


def _diffusers_encoder_name(ms: ModelSource, key: str) -> str:
    if key.startswith("encoder."):
        return "encoder." + vae_keymap.encoder_key_map(ms.vae_config)[key.removeprefix("encoder.")]
    return key


def _original_decoder_name(ms: ModelSource, key: str) -> str:
    return (vae_keymap.FRAME_DECODER_PREFIX if ms.frame_decoder else vae_keymap.DECODER_PREFIX) + key


def _diffusers_clip_plan(ms: ModelSource, ours) -> tuple[dict[str, Entry], set[str]]:
    plan = {k: Entry(theirs, None if kind == "copy" else clip_keymap.combiner(kind))
            for k, theirs, kind in clip_keymap.key_table(ms.clip_config)}
    return plan, set(clip_keymap.IGNORED_TRANSFORMERS_KEYS)


PLANS = {  # (format, component) -> plan(ms, module shapes) -> (plan, file keys of the scope deliberately unread)
    ("original", "unet"): lambda ms, ours: unet_plan("original", ms.unet_config, ours),
    ("original", "vae_encoder"): _renamed(_original_encoder_name),
    ("original", "vae_decoder"): _renamed(_original_decoder_name),
    ("original", "image_encoder"): _renamed(lambda ms, k: clip_keymap.ORIGINAL_PREFIX + k),
    ("diffusers", "unet"): lambda ms, ours: unet_plan("diffusers", ms.unet_config, ours),
    ("diffusers", "vae_encoder"): _renamed(_diffusers_encoder_name,
                                           lambda k: _vae_reshape(k.removeprefix("encoder."))),
    ("diffusers", "vae_decoder"): _renamed(lambda ms, k: "decoder." + vae_keymap.decoder_key_map(ms.vae_config)[k],
                                           _vae_reshape),
    ("diffusers", "image_encoder"): _diffusers_clip_plan,
}


def _prefixed(*prefixes):
    return lambda ms, keys: {k for k in keys if k.startswith(prefixes)}


def _original_decoder_scope(ms: ModelSource, keys) -> set[str]:
    # an *_image_decoder file's `decoder.*` and `post_quant_conv.*` are both under first_stage_model.
    extra = (vae_keymap.FRAME_DECODER_PREFIX + "post_quant_conv.",) if ms.frame_decoder else ()
    return _prefixed(vae_keymap.DECODER_PREFIX, *extra)(ms, keys)


SCOPES = {  # (format, component) -> the file keys that are the component's
    ("original", "unet"): _prefixed(ORIGINAL_PREFIX),
    ("original", "vae_encoder"): _prefixed(vae_keymap.ENCODER_PREFIX, vae_keymap.QUANT_CONV_PREFIX),
    ("original", "vae_decoder"): _original_decoder_scope,
    ("original", "image_encoder"): _prefixed(clip_keymap.ORIGINAL_PREFIX),
    ("diffusers", "unet"): lambda ms, keys: set(keys),  # unet/ holds nothing else
    ("diffusers", "vae_encoder"): _prefixed("encoder.", "quant_conv."),
    ("diffusers", "vae_decoder"): _prefixed("decoder."),
    ("diffusers", "image_encoder"): lambda ms, keys: set(keys),
}


def _check_component(component: str) -> None:
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; expected one of {COMPONENTS}")


def component_scope(ms: ModelSource, component: str) -> set[str]:
    """The file keys that belong to a component (those it reads, and those of it deliberately left unread)."""
    _check_component(component)
    keys = ms.files[component].keys() if component in ms.files else set()
    if ms.fmt == SVDLITE_FORMAT:
        return _prefixed(SVDLITE_PREFIXES[component])(ms, keys)
    return SCOPES[ms.fmt, component](ms, keys)


def component_plan(ms: ModelSource, component: str, ours: dict[str, tuple[int, ...]]) -> tuple[dict, set, set]:
    """(read plan, the file keys that belong to this component, keys deliberately not read) for the component's
    module whose `strict_load.state_shapes` are `ours`."""
    scope = component_scope(ms, component)
    if ms.fmt == SVDLITE_FORMAT:
        prefix = SVDLITE_PREFIXES[component]
        return {k: Entry((prefix + k,)) for k in ours}, scope, set()
    plan, ignored = PLANS[ms.fmt, component](ms, ours)
    return plan, scope, ignored


def present_components(ms: ModelSource) -> list[str]:
    """The components the source holds (an original file may lack the image encoder, say)."""
    return [c for c in COMPONENTS if component_scope(ms, c)]


def component_bytes(ms: ModelSource, component: str) -> int:
    """The size of a component's tensors in its file (`component_scope`), read from the header."""
    src = ms.files[component]
    return sum(src.nbytes(k) for k in component_scope(ms, component))


def expected_unet_source_keys(fmt: str, config: UNetConfig = UNetConfig()) -> set[str]:
    """Every key the loader reads from an original or diffusers UNet (excludes the never-read attn2 to_q / to_k)."""
    with torch.device("meta"):
        shapes = state_shapes(VideoUNet(config))
    return {s for entry in unet_plan(fmt, config, shapes)[0].values() for s in entry.sources}
