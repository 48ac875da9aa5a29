"""Every approximate option, each pair of them that can meet, and the speed levels, against an independent sampler
written here from the definitions: the final latents of `svdlite.generate` must equal those of a plain
loop that shares no sampling code with svdlite.

The reference below takes from svdlite only the networks and the conditioning encoders: the UNet's blocks one by
one (`input_blocks[i]`, `middle_block`, `output_blocks[j]`, `out`, `time_embed`, `label_emb`,
`context_vectors`), the CLIP embedding, the VAE encoder and the micro-conditioning vector. Everything else is
written from docs/model.md and sgm's algorithm, not from svdlite's sampling.py / plan.py / denoiser.py / f3.py:
  - the noise levels: EDM's Karras schedule (rho 7, 700 -> 0.002, a final 0), or NVIDIA's published 10 Align Your
    Steps levels for SVD, interpolated log-linearly (numpy's interp, as the AYS authors' `loglinear_interp`);
  - the preconditioning VScalingWithEDMcNoise (sigma_data 1): c_skip = 1/(s^2+1), c_out = -s/sqrt(s^2+1),
    c_in = 1/sqrt(s^2+1), c_noise = ln(s)/4, D = c_skip x + c_out F(c_in x, conditioning latent);
  - the guidance batch [uncond; cond] (zero CLIP token and zero conditioning latent in the unconditional half,
    the same micro-conditioning), D = D_u + s_t (D_c - D_u) with s = linspace(min, max, frames);
  - Euler steps x += (s_next - s)(x - D)/s from x = noise sqrt(1 + s_0^2);
  - the guidance cut (steps >= K: conditional rows only, D = D_c), step caching (its own cache of the features
    entering output block n-1-D, the conditional half taken after the cut) and F3 (its own ranking of the
    schedule's (step, unit) statistics, the lowest round-half-up(ratio * units) skipped), as the README and
    docs/acceleration.md describe them.

Tolerance. The reference does its scalar arithmetic the way sgm does, in float32 (the sampler state's dtype): the
levels, scalings, Euler coefficients and initial scale as float32 tensors, on the same float32 network. Where the
operations are the same the result is bit-identical (the exact run, caching, F3, AYS, the speed levels: 0
difference when written). Where the reference takes another route to the same value, the conditional-only rows after
a guidance cut (its context vectors computed on the conditional rows alone, where svdlite slices the guided batch's),
float32 rounding of the same products in another row count enters and passes through the later UNet calls: up to
1e-5 on latents of magnitude ~5. Hence rtol 1e-5 / atol 2e-5. A wrong choice (a guidance half, a cached depth, a
skipped unit, a noise level) moves the latents by 1e-3 or (usually far) more, and every compared option is asserted
to move them by more than 1e-3 from the exact run, so a run that ignores an option fails too.

The size is 64x128 on purpose: at 64x64 the tiny model's deepest level is 1x1 spatial (32 channels in 32 GroupNorm
groups), and there a last-bit change of one input value grows ~5000x through the middle block (measured: ~1e-7 in,
~3e-4 out of the UNet), which would make any float32 comparison loose; at 64x128 it grows ~20x.
"""
import math

import numpy as np
import pytest
import torch

import svdlite
from svdlite.clip import encode_image
from svdlite.conditioning import micro_conditioning
from svdlite.layers import timestep_embedding

FRAMES, H, W, STEPS, SEED = 3, 64, 128, 4, 11
MIN_G, MAX_G = 1.0, 2.5
FPS, MOTION, AUG = 7, 127, 0.02
RTOL, ATOL = 1e-5, 2e-5
SETTINGS = dict(num_frames=FRAMES, height=H, width=W, min_guidance_scale=MIN_G, max_guidance_scale=MAX_G, fps=FPS,
                motion_bucket_id=MOTION, noise_aug_strength=AUG)

# NVIDIA's Align Your Steps noise levels for Stable Video Diffusion (Sabour et al. 2024, the authors' published
# 10-step list, sigma_max .. sigma_min); the sampler replaces the last by 0.
AYS_SVD_PUBLISHED = [700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002]


# ----------------------------------------------------------------------------------------------- the reference

def f32(v: float) -> float:
    """v rounded to float32, as a Python float."""
    return float(np.float32(v))


def edm_levels(n: int, sigma_min=0.002, sigma_max=700.0, rho=7.0) -> list[float]:
    """Karras et al. 2022 eq. 5, n levels from sigma_max to sigma_min, then 0, as sgm's EDMDiscretization computes
    them: a float32 ramp i/(n-1), the roots as Python floats, the rest in float32 (sigma_0 = 700.00012).
    `test_reference_sigmas` checks them against eq. 5 in float64."""
    ramp = torch.linspace(0, 1, n)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return ((a + ramp * (b - a)) ** rho).tolist() + [0.0]


def edm_levels_float64(n: int, sigma_min=0.002, sigma_max=700.0, rho=7.0) -> list[float]:
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(a + i / (n - 1) * (b - a)) ** rho for i in range(n)] + [0.0]


def ays_levels(n: int) -> list[float]:
    """n steps of AYS: the published 11 levels when n = 10, else log-linear interpolation onto n + 1 points evenly
    spaced in [0, 1] (ascending abscissae, so on the reversed list); the last level then 0."""
    levels = np.array(AYS_SVD_PUBLISHED, dtype=np.float64)
    if n + 1 != len(levels):
        xs = np.linspace(0, 1, len(levels))
        ys = np.log(levels[::-1])
        levels = np.exp(np.interp(np.linspace(0, 1, n + 1), xs, ys))[::-1]
    return [f32(v) for v in levels[:-1]] + [0.0]


class Conditioning:
    """The run's inputs built here: noise-augmented condition image from the seed's generator (its first draw, as
    generate documents), its VAE latent, the CLIP token, the micro-conditioning, and initial noise of our own."""

    def __init__(self, model, image: torch.Tensor, seed: int, noise_seed: int):
        pixels = (image * 2.0 - 1.0)[None]  # [0, 1] -> [-1, 1], (1, 3, H, W)
        g = torch.Generator().manual_seed(seed)
        aug = torch.randn(pixels.shape, generator=g)
        self.token = encode_image(model.image_encoder, pixels).float().reshape(1, 1, -1)  # (1, 1, D)
        self.latent = model.vae_encoder(pixels + AUG * aug).float()  # (1, 4, h, w)
        self.vector = micro_conditioning(FPS - 1, MOTION, AUG, 1)  # (1, 768)
        self.noise = torch.randn((FRAMES, 4, H // 8, W // 8), generator=torch.Generator().manual_seed(noise_seed))

    def rows(self, guided: bool):
        """(context, concat, y) for one UNet call: [uncond; cond] when guided, else the conditional rows."""
        ctx = self.token.expand(FRAMES, 1, -1)
        cat = self.latent.expand(FRAMES, -1, -1, -1)
        y = self.vector.expand(FRAMES, -1)
        if not guided:
            return ctx, cat, y
        return torch.cat([torch.zeros_like(ctx), ctx]), torch.cat([torch.zeros_like(cat), cat]), torch.cat([y, y])


def unet_by_blocks(unet, x, c_noise: torch.Tensor, context, y, skip_units=(), depth=None, cached=None):
    """The UNet run block by block: (F, features entering output block n-1-depth). With `cached`, only input
    blocks 0..depth and output blocks n-1-depth.. run, on `cached` as the deep features."""
    t = FRAMES
    rows = x.shape[0]
    vecs = unet.context_vectors(context, t)
    emb = unet.time_embed(timestep_embedding(c_noise.expand(rows), unet.config.model_channels)) \
        + unet.label_emb(y)
    only_images = torch.zeros(rows // t, t)
    skip = {}
    for unit in skip_units:  # "<block>.<layer>.time_stack.<d>"
        layer_path, d = unit.split(".time_stack.")
        skip.setdefault(layer_path.rsplit(".", 1)[0], set()).add(int(d))

    def run(name, block, h):
        return block(h, emb, vecs.get(name), t, only_images, skip.get(name, set()))

    n_out = len(unet.output_blocks)
    last_in = len(unet.input_blocks) - 1 if cached is None else depth
    skips, h = [], x
    for i in range(last_in + 1):
        h = run(f"input_blocks.{i}", unet.input_blocks[i], h)
        skips.append(h)
    features = cached
    if cached is None:
        h = run("middle_block", unet.middle_block, h)
    else:
        h = cached
    for j in range(0 if cached is None else n_out - 1 - depth, n_out):
        if depth is not None and cached is None and j == n_out - 1 - depth:
            features = h
        h = run(f"output_blocks.{j}", unet.output_blocks[j], torch.cat([h, skips.pop()], dim=1))
    return unet.out(h), features


def f3_skips(schedule, ratio: float, statistic: str = "attention") -> list[set]:
    """Per step, the units F3 skips: all (step, unit) pairs ranked by the statistic (ties: earlier step, then earlier
    unit), the lowest round-half-up(ratio * pairs) of them."""
    rows = schedule.stats[statistic]
    pairs = sorted((rows[i][j], i, j) for i in range(len(rows)) for j in range(len(schedule.units)))
    count = int(math.floor(ratio * len(pairs) + 0.5))
    out = [set() for _ in rows]
    for _, i, j in pairs[:count]:
        out[i].add(schedule.units[j])
    return out


_MEMO: dict = {}


def reference(model, cond: Conditioning, sigmas: list[float], **options) -> torch.Tensor:
    """The reference's final latents, computed once per model, conditioning, levels and options."""
    key = (id(model), id(cond), tuple(sigmas), repr(sorted(options.items())))
    if key not in _MEMO:
        _MEMO[key] = sample_reference(model, cond, sigmas, **options)
    return _MEMO[key]


@torch.no_grad()
def sample_reference(model, cond: Conditioning, sigmas: list[float], *, min_g=MIN_G, max_g=MAX_G, cut=None,
                     skips=None, interval=1, depth=None) -> torch.Tensor:
    """EDM Euler sampling with per-frame linear guidance and the options, as a plain loop: the final latents."""
    unet = model.unet
    n = len(sigmas) - 1
    guidance = max_g > 1  # sgm/diffusers: no guidance at all when the largest scale is <= 1
    scale = torch.tensor(np.linspace(min_g, max_g, FRAMES), dtype=torch.float32).reshape(FRAMES, 1, 1, 1)
    sig = torch.tensor(sigmas, dtype=torch.float32)  # the sampler's state and levels are float32
    x = cond.noise * torch.sqrt(1.0 + sig[0] ** 2)
    cache = None  # our own: the deep features of the last refreshing step
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        guided = guidance and (cut is None or i < cut)
        c_skip, c_out = 1.0 / (s**2 + 1.0), -s / (s**2 + 1.0) ** 0.5  # sgm VScalingWithEDMcNoise
        c_in, c_noise = 1.0 / (s**2 + 1.0) ** 0.5, 0.25 * s.log()
        xx = torch.cat([x, x]) if guided else x
        context, concat, y = cond.rows(guided)
        net_in = torch.cat([xx * c_in, concat], dim=1)
        units = skips[i] if skips else ()
        if interval > 1 and i % interval:  # a reusing step: the shallow branch on the cached features
            cached = cache if cache.shape[0] == xx.shape[0] else cache[FRAMES:]  # guided -> conditional: cond half
            out, _ = unet_by_blocks(unet, net_in, c_noise, context, y, units, depth, cached)
            cache = cached
        else:
            out, features = unet_by_blocks(unet, net_in, c_noise, context, y, units,
                                           depth if interval > 1 else None)
            cache = features
        d_all = out * c_out + xx * c_skip
        if guided:
            d_u, d_c = d_all[:FRAMES], d_all[FRAMES:]
            denoised = d_u + scale * (d_c - d_u)
        else:
            denoised = d_all
        x = x + (s_next - s) * ((x - denoised) / s)
    return x


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def model():
    yield svdlite.load_model("tiny", device="cpu", dtype=torch.float32, progress=False)
    _MEMO.clear()


@pytest.fixture(scope="module")
def image():
    return torch.rand(3, H, W, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def cond(model, image):
    with torch.no_grad():
        return Conditioning(model, image, SEED, noise_seed=99)


@pytest.fixture(scope="module")
def run(model, image, cond):
    def generate(**options) -> torch.Tensor:
        settings = SETTINGS | {k: v for k, v in options.items() if k in SETTINGS}
        rest = {k: v for k, v in options.items() if k not in SETTINGS}
        if "speed" not in rest and "schedule" not in rest and "num_inference_steps" not in rest:
            rest["num_inference_steps"] = STEPS
        return svdlite.generate(image, model=model, seed=SEED, latents=cond.noise.clone(), progress=False,
                                **settings, **rest).latents
    return generate


@pytest.fixture(scope="module")
def exact(run):
    return run()


@pytest.fixture(scope="module")
def f3_schedule(model, image):
    """One schedule for the EDM runs, one for the AYS runs (a schedule is calibrated for a step count)."""
    return svdlite.calibrate_f3(image, model=model, seed=SEED, num_inference_steps=STEPS, progress=False, **SETTINGS)


@pytest.fixture(scope="module")
def f3_schedule_ays(model, image):
    return svdlite.calibrate_f3(image, model=model, seed=SEED, schedule="ays", num_inference_steps=STEPS,
                                progress=False, **SETTINGS)


def assert_matches(got: torch.Tensor, want: torch.Tensor, exact: torch.Tensor | None = None, what: str = ""):
    assert got.shape == want.shape, what
    err = (got - want).abs().max().item()
    assert torch.allclose(got, want, rtol=RTOL, atol=ATOL), f"{what}: max |generate - reference| = {err:.3g}"
    if exact is not None:  # the option must matter, or this comparison says nothing
        moved = (want - exact).abs().max().item()
        assert moved > 1e-3, f"{what}: the option moved the latents only {moved:.3g}"


# ----------------------------------------------------------------------------------------------- the options

def test_reference_sigmas():
    for n in (2, 4, 7, 25):
        # sgm's float32 evaluation: the base rounded, then raised to the 7th power (7x its rounding, ~2e-6)
        assert edm_levels(n) == pytest.approx(edm_levels_float64(n), rel=4e-6)
    assert ays_levels(10) == [f32(v) for v in AYS_SVD_PUBLISHED[:-1]] + [0.0]
    seven = ays_levels(7)
    assert len(seven) == 8 and seven[0] == f32(700.0) and seven[-1] == 0.0
    # the middle point of 7 steps (x = 4/7) lies between published levels 5 (x = 0.5) and 6 (x = 0.6), log-linearly
    w = (4 / 7 - 0.5) / 0.1
    assert seven[4] == pytest.approx(math.exp((1 - w) * math.log(1.789) + w * math.log(0.981)), rel=1e-6)


def test_exact(model, cond, exact):
    assert_matches(exact, reference(model, cond, edm_levels(STEPS)), what="exact")


@pytest.mark.parametrize("cut", [0, 1, 3])
def test_guidance_cut(model, cond, run, exact, cut):
    assert_matches(run(guidance_cut_step=cut), reference(model, cond, edm_levels(STEPS), cut=cut), exact,
                   f"cut {cut}")


@pytest.mark.parametrize("interval,depth", [(2, 0), (2, 1), (3, 0), (3, 1)])
def test_step_caching(model, cond, run, exact, interval, depth):
    assert_matches(run(cache_interval=interval, cache_depth=depth),
                   reference(model, cond, edm_levels(STEPS), interval=interval, depth=depth), exact,
                   f"cache N={interval} D={depth}")


@pytest.mark.parametrize("ratio,statistic", [(0.3, "attention"), (0.5, "contribution")])
def test_f3(model, cond, run, exact, f3_schedule, ratio, statistic):
    skips = f3_skips(f3_schedule, ratio, statistic)
    assert_matches(run(f3_schedule=f3_schedule, f3_ratio=ratio, f3_statistic=statistic),
                   reference(model, cond, edm_levels(STEPS), skips=skips), exact, f"f3 {ratio} {statistic}")


@pytest.mark.parametrize("steps", [10, 4, 7])
def test_ays_runs_the_interpolated_levels_and_the_steps_asked(model, cond, run, exact, steps):
    calls = []
    hook = model.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        got = run(schedule="ays", num_inference_steps=steps)
    finally:
        hook.remove()
    assert len(calls) == steps
    assert_matches(got, reference(model, cond, ays_levels(steps)), exact, f"ays {steps}")


# --------------------------------------------------------------------------------------------------- the pairs

@pytest.mark.parametrize("cut,interval,depth", [(1, 2, 0), (2, 3, 1), (2, 2, 1), (3, 3, 0)])
def test_cut_with_caching(model, cond, run, exact, cut, interval, depth):
    assert_matches(run(guidance_cut_step=cut, cache_interval=interval, cache_depth=depth),
                   reference(model, cond, edm_levels(STEPS), cut=cut, interval=interval, depth=depth), exact,
                   f"cut {cut} x cache N={interval} D={depth}")


def test_cut_with_f3(model, cond, run, exact, f3_schedule):
    skips = f3_skips(f3_schedule, 0.3)
    assert_matches(run(guidance_cut_step=2, f3_schedule=f3_schedule, f3_ratio=0.3),
                   reference(model, cond, edm_levels(STEPS), cut=2, skips=skips), exact, "cut x f3")


@pytest.mark.parametrize("interval,depth", [(2, 0), (3, 1)])
def test_caching_with_f3(model, cond, run, exact, f3_schedule, interval, depth):
    skips = f3_skips(f3_schedule, 0.4)
    assert_matches(run(cache_interval=interval, cache_depth=depth, f3_schedule=f3_schedule, f3_ratio=0.4),
                   reference(model, cond, edm_levels(STEPS), skips=skips, interval=interval, depth=depth), exact,
                   f"cache N={interval} D={depth} x f3")


def test_all_three(model, cond, run, exact, f3_schedule):
    skips = f3_skips(f3_schedule, 0.25)
    assert_matches(run(guidance_cut_step=1, cache_interval=2, cache_depth=1, f3_schedule=f3_schedule, f3_ratio=0.25),
                   reference(model, cond, edm_levels(STEPS), cut=1, skips=skips, interval=2, depth=1), exact,
                   "cut x cache x f3")


def test_ays_with_cut(model, cond, run, exact):
    assert_matches(run(schedule="ays", num_inference_steps=7, guidance_cut_step=4),
                   reference(model, cond, ays_levels(7), cut=4), exact, "ays x cut")


def test_ays_with_caching(model, cond, run, exact):
    assert_matches(run(schedule="ays", num_inference_steps=7, cache_interval=3, cache_depth=1),
                   reference(model, cond, ays_levels(7), interval=3, depth=1), exact, "ays x cache")


def test_ays_with_f3(model, cond, run, exact, f3_schedule_ays):
    skips = f3_skips(f3_schedule_ays, 0.3)
    assert_matches(run(schedule="ays", num_inference_steps=STEPS, f3_schedule=f3_schedule_ays, f3_ratio=0.3),
                   reference(model, cond, ays_levels(STEPS), skips=skips), exact, "ays x f3")


# ---------------------------------------------------------------------------------------------- speed levels

def test_speed_balanced_is_cache_2_depth_0(model, cond, run, exact):
    # README / docs/acceleration.md: balanced = cache_interval=2, cache_depth=0, at the run's step count
    assert_matches(run(speed="balanced", num_inference_steps=STEPS),
                   reference(model, cond, edm_levels(STEPS), interval=2, depth=0), exact, "balanced")


def test_speed_fast_is_ays_10_steps(model, cond, run, exact):
    # docs/acceleration.md: fast = schedule="ays", 10 steps
    assert_matches(run(speed="fast"), reference(model, cond, ays_levels(10)), exact, "fast")


def test_speed_level_yields_to_explicit_options(model, cond, run, exact):
    # options given explicitly override a level's: balanced with depth 1 and a cut
    assert_matches(run(speed="balanced", num_inference_steps=STEPS, cache_depth=1, guidance_cut_step=2),
                   reference(model, cond, edm_levels(STEPS), interval=2, depth=1, cut=2), exact, "balanced, D=1")


# ------------------------------------------------------------------------------------------ arithmetic edges

@pytest.mark.parametrize("units_times_ratio,expected", [(10.4, 10), (10.5, 11), (10.6, 11), (0.4, 0), (0.6, 1)])
def test_f3_unit_count_rounds_half_up(model, cond, run, f3_schedule, units_times_ratio, expected):
    total = f3_schedule.num_steps * len(f3_schedule.units)  # 4 steps x 16 temporal blocks
    assert total == STEPS * len(model.unet.temporal_units()) == 64
    ratio = units_times_ratio / total
    calls, units = [], set(model.unet.temporal_units())
    hooks = [m.register_forward_pre_hook(lambda mod, a: calls.append(1)) for name, m in model.unet.named_modules()
             if name in units]
    try:
        got = run(f3_schedule=f3_schedule, f3_ratio=ratio)
    finally:
        for h in hooks:
            h.remove()
    assert total - len(calls) == expected  # temporal blocks that did not run, counted
    skips = f3_skips(f3_schedule, ratio)
    assert sum(len(s) for s in skips) == expected
    assert_matches(got, reference(model, cond, edm_levels(STEPS), skips=skips), what=f"f3 {units_times_ratio}/64")


@pytest.mark.parametrize("g", [2.0, 1.0])
def test_constant_guidance(model, cond, run, exact, g):
    got = run(min_guidance_scale=g, max_guidance_scale=g)
    assert_matches(got, reference(model, cond, edm_levels(STEPS), min_g=g, max_g=g), exact if g > 1 else None,
                   f"guidance {g}..{g}")


def test_calibration_over_two_images_is_the_average_of_each_alone(model, image):
    other = torch.rand(3, H, W, generator=torch.Generator().manual_seed(6))
    both = svdlite.calibrate_f3([image, other], model=model, seed=SEED, num_inference_steps=STEPS, progress=False,
                                **SETTINGS)
    alone = [svdlite.calibrate_f3(im, model=model, seed=SEED + k, num_inference_steps=STEPS, progress=False,
                                  **SETTINGS) for k, im in enumerate([image, other])]
    assert both.units == alone[0].units
    for name in ("attention", "contribution"):
        a, b = np.array(alone[0].stats[name]), np.array(alone[1].stats[name])
        assert a.shape == (STEPS, 16) and not np.allclose(a, b, rtol=1e-4, atol=0)  # two different images
        np.testing.assert_allclose(np.array(both.stats[name]), (a + b) / 2, rtol=1e-12, atol=0, err_msg=name)
