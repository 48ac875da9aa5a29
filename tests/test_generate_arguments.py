"""Every `generate` argument reaches the computation: one run with non-default values against diffusers'
`StableVideoDiffusionPipeline` on the same weights (a generate that used the preset's motion bucket, or left
noise_aug_strength out of the micro-conditioning, would be far off), the guidance cut's exact first step, and
GroupNorm computing in float32 under half precision."""
import pytest
import torch

import svdlite
from svdlite.components import load_model
from svdlite.pipeline import generate
from test_pipeline_diffusers import HEIGHT, WIDTH, build_tiny_pipeline, make_image, rel_err, set_original_resblock_eps

EXAMPLE = svdlite.__path__[0] + "/assets/example.png"
# every setting away from its default (steps, frames and chunking too); the image is exactly WIDTH x HEIGHT
NON_DEFAULT = dict(num_frames=3, num_inference_steps=3, fps=12, motion_bucket_id=40, noise_aug_strength=0.1,
                   min_guidance_scale=1.3, max_guidance_scale=3.1, decode_chunk_size=2, height=HEIGHT, width=WIDTH)
SEED = 4321


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    from diffusers import StableVideoDiffusionPipeline

    folder = tmp_path_factory.mktemp("tiny_svd_arguments")
    build_tiny_pipeline(folder)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_pipeline_diffusers.runs
    try:
        pipe = StableVideoDiffusionPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        set_original_resblock_eps(pipe.unet)
        final = {}

        def keep(p, i, t, kwargs):
            final["latents"] = kwargs["latents"].clone()  # overwritten each step: the last one stays
            return {}

        frames = pipe(make_image(), generator=torch.Generator().manual_seed(SEED), output_type="pt",
                      callback_on_step_end=keep, **NON_DEFAULT).frames[0]
        video = generate(make_image(), model=load_model(folder), seed=SEED, progress=False, **NON_DEFAULT)
    finally:
        torch.set_num_threads(threads)
    return final["latents"][0], frames, video


def test_non_default_arguments_match_diffusers(both):
    df_latents, df_frames, video = both
    assert video.latents.shape == (3, 4, HEIGHT // 8, WIDTH // 8) and video.fps == 12.0
    # measured 7.1e-6; with generate ignoring motion_bucket_id 8.1e-2, fps 5.3e-2, and with the micro-conditioning
    # ignoring noise_aug_strength 1.9e-3
    err = rel_err(video.latents, df_latents)
    assert err < 5e-5, f"final latents with non-default settings vs diffusers: rel {err:.3g}"
    ours = video.frames.permute(0, 3, 1, 2).float() / 255.0
    assert (ours - df_frames).abs().max() <= 1.5 / 255


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def unet_rows(model, **kwargs) -> list[int]:
    """Rows of every UNet call of one generate run: 2T while guided, T once only the conditional half runs."""
    rows = []
    handle = model.unet.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        generate(EXAMPLE, model=model, seed=0, progress=False, num_frames=2, num_inference_steps=4, **kwargs)
    finally:
        handle.remove()
    return rows


@pytest.mark.parametrize("cut,expected", [(None, [4, 4, 4, 4]), (0, [2, 2, 2, 2]), (1, [4, 2, 2, 2]),
                                          (3, [4, 4, 4, 2]), (4, [4, 4, 4, 4])])
def test_guidance_cut_starts_at_its_exact_step(tiny, cut, expected):
    """guidance_cut_step=K: steps 0..K-1 guided (both halves), steps K.. conditional only."""
    assert unet_rows(tiny, guidance_cut_step=cut) == expected


def test_group_norm_runs_in_float32_under_half_precision(monkeypatch):
    """Every GroupNorm of the UNet receives float32 input when the UNet runs in float16 (sgm's GroupNorm32)."""
    model = load_model("tiny", dtype=torch.float16)
    seen = []
    group_norm = torch.nn.functional.group_norm

    def recording(x, *args, **kwargs):
        seen.append(x.dtype)
        return group_norm(x, *args, **kwargs)

    handle = model.unet.register_forward_pre_hook(lambda m, args: seen.append("unet"))
    monkeypatch.setattr(torch.nn.functional, "group_norm", recording)
    try:
        generate(EXAMPLE, model=model, seed=0, progress=False, num_frames=2, num_inference_steps=1)
    finally:
        handle.remove()
    in_unet = seen[seen.index("unet") + 1:]  # the UNet's calls (the VAE encoder runs before, the decoder after)
    assert in_unet and set(in_unet) - {"unet"} == {torch.float32}
