"""The planned denoiser: one `Step` of the plan -> one UNet call with classifier-free guidance, the conditional
half alone, F3's skipped temporal units and step caching's features (docs/design.md "One plan")."""
import torch

from . import sampling
from .components import SVDModel
from .plan import Step


def make_denoiser(model: SVDModel, batch, num_frames: int, min_g: float, max_g: float, cache_depth: int | None,
                  dtype: torch.dtype, record: dict | None = None):
    """The planned denoiser `denoise(x, sigma, step, carry) -> (D, carry)` for `sampling.sample_euler_edm`.

    Every cross-attention vector is computed here, once per video. A guided step runs both halves [uncond; cond]
    and applies the per-frame guidance; otherwise only the conditional half runs. The step's skipped temporal
    units and cache mode go to the UNet as arguments; `carry` is the deep features of the last refreshing step
    (a guided step's features serve a later conditional-only step through their conditional half)."""
    unet = model.unet
    vectors_both = unet.context_vectors(batch.context.to(dtype), num_frames)
    half = batch.context.shape[0] // 2
    # the conditional half's vectors are the second half of every (per-frame, per-video) vector: [uncond; cond]
    vectors_cond = {name: [(s[s.shape[0] // 2:], t[t.shape[0] // 2:]) for s, t in per_depth]
                    for name, per_depth in vectors_both.items()}
    scales = sampling.frame_guidance_scales(num_frames, min_g, max_g)

    def denoise(x, sigma, step: Step, carry):
        vectors, y, concat = ((vectors_both, batch.vector, batch.concat) if step.guided else
                              (vectors_cond, batch.vector[half:], batch.concat[half:]))
        rows = concat.shape[0]
        cached = None
        if step.cache == "reuse":
            cached = carry if carry.shape[0] == rows else carry[carry.shape[0] - rows:]  # the conditional half
        kept = {}

        def network(net_in, c_noise):
            options = {} if step.cache is None else {"cache_depth": cache_depth, "cached": cached}
            out = unet(net_in.to(dtype), c_noise, None, y.to(dtype), num_frames, context_vectors=vectors,
                       skip_temporal=step.skip_temporal,
                       record=None if record is None else record.setdefault(step.index, {}), **options)
            if step.cache is not None:
                out, kept["features"] = out
            return out.float()

        if step.guided:
            return sampling.make_cfg_denoiser(network, concat, scales)(x, sigma), kept.get("features")
        return sampling.edm_denoise(network, x, sigma, concat), kept.get("features")

    return denoise
