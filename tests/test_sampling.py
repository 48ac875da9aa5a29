"""Sampler and conditioning tests: sgm reference replay, an analytic Gaussian case, and diffusers' conventions.

(a) `reference`: the sgm run in tests/reference/sample_tiny_io (EulerEDMSampler + VScalingWithEDMcNoise +
    LinearPredictionGuider, settings from sample_tiny_config.json) replayed with a fake network that returns the
    stored UNet outputs. The inputs are identical and every operation is the same float32 operation in the same
    order, so the results agree to float32 rounding (measured: bitwise); 1e-5 relative is the bound asked for,
    ~100 float32 ulps, far below plausible mistakes (guidance scales reversed over frames moves `samples` by 0.65).
    Scaling the noise by sigma_0 instead of sqrt(1 + sigma_0^2) moves everything by only 1e-6 relative, so the
    initial latents are checked separately at 1e-7 (about one float32 ulp; that mistake is 12 ulps).
(b) analytic: data N(mu, s^2) has the exact denoiser D(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu) and an exact
    probability-flow solution; the Euler sampler converges to it at first order and equals a float64 hand loop.
(c)/(d) diffusers: micro-conditioning vs `Timesteps(256, True, 0)` on `added_time_ids`; schedule, initial noise
    scale and whole sampling loop vs `EulerDiscreteScheduler` configured like SVD's scheduler_config.json.
"""
import inspect
import math
from types import SimpleNamespace

import pytest
import torch

from svdlite.conditioning import (augment_condition_image, cfg_batch, fps_id_from_fps, micro_conditioning,
                                  repeat_frames)
from svdlite.sampling import (apply_guidance, edm_denoise, edm_sigmas, frame_guidance_scales, initial_latents,
                              make_cfg_denoiser, sample_euler_edm, v_edm_scalings)

from conftest import rel_err

# ---------------------------------------------------------------------------------------------------------------
# (a) replay of the sgm reference run


@pytest.fixture(scope="module")
def sample_cfg(reference):
    return reference.json("sample_tiny_config.json")


@pytest.fixture(scope="module")
def sample_io(reference):
    return reference.tensors("sample_tiny_io.safetensors")


def _sigmas(cfg):
    d = cfg["discretization"]
    return edm_sigmas(cfg["sampler"]["num_steps"], d["sigma_min"], d["sigma_max"], d["rho"])


@pytest.mark.reference
def test_sigmas_match_sgm(sample_cfg, sample_io):
    # Same float32 ops as sgm EDMDiscretization on CPU: measured bitwise equal. rtol 1e-6 (~8 float32 ulps) only
    # leaves room for a differently vectorised pow on another CPU; wrong rho/sigma_max/ramp moves values by >1e-2.
    sigmas = _sigmas(sample_cfg)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (sample_cfg["sampler"]["num_steps"] + 1,)
    assert sigmas[-1].item() == 0.0
    torch.testing.assert_close(sigmas, sample_io["sigmas"], rtol=1e-6, atol=0)
    torch.testing.assert_close(sigmas, torch.tensor(sample_cfg["sigmas_visited"]), rtol=1e-6, atol=0)


@pytest.mark.reference
def test_initial_latents_and_guidance_scales_match_sgm(sample_cfg, sample_io):
    sigmas = _sigmas(sample_cfg)
    noise = sample_io["randn"].clone()
    x = initial_latents(noise, sigmas)
    assert torch.equal(noise, sample_io["randn"]), "initial_latents must not scale its input in place (sgm does)"
    # one float32 multiply as in sgm (measured bitwise); 1e-7 ~ 1 ulp, while sigma_0 * noise would be off by 1e-6
    assert rel_err(x, sample_io["x_init_scaled"]) <= 1e-7
    assert math.isclose(initial_latents(torch.ones(()), sigmas).item(),
                        sample_cfg["noise_multiplier_sqrt_1_plus_sigma0_sq"], rel_tol=1e-7)
    g = sample_cfg["guider"]
    scales = frame_guidance_scales(g["num_frames"], g["min_scale"], g["max_scale"])
    torch.testing.assert_close(scales, sample_io["cfg_scale"][0], rtol=0, atol=0)
    torch.testing.assert_close(scales, torch.tensor(sample_cfg["cfg_scale_per_frame"]), rtol=0, atol=0)


@pytest.mark.reference
def test_cfg_batch_matches_sgm_layout(sample_cfg, sample_io):
    t = sample_cfg["guider"]["num_frames"]
    # the reference's c tensors are one video's values repeated per frame: row 0 is the per-video input
    batch = cfg_batch(sample_io["cond.crossattn"][:1], sample_io["cond.concat"][:1], sample_io["cond.vector"][:1], t)
    for got, key in zip(batch, ("crossattn", "concat", "vector")):
        assert torch.equal(got, torch.cat([sample_io[f"uc.{key}"], sample_io[f"cond.{key}"]])), key


@pytest.mark.reference
def test_sampler_replays_sgm_run(sample_cfg, sample_io):
    num_steps, g = sample_cfg["sampler"]["num_steps"], sample_cfg["guider"]
    assert sample_cfg["sampler"]["s_churn"] == 0.0  # the only setting sample_euler_edm implements
    sigmas = _sigmas(sample_cfg)
    scales = frame_guidance_scales(g["num_frames"], g["min_scale"], g["max_scale"])
    concat = torch.cat([sample_io["uc.concat"], sample_io["cond.concat"]])
    worst = {}

    def network(net_in, c_noise):  # stands in for the UNet: checks its inputs, returns sgm's stored output
        k = network.calls
        network.calls += 1
        expected_in = torch.cat([sample_io[f"step{k}.net_in"], concat], dim=1)  # reference net_in is before concat
        err = rel_err(net_in, expected_in)
        worst["net_in"] = max(worst.get("net_in", 0.0), err)
        assert err <= 1e-6, (k, err)
        torch.testing.assert_close(c_noise, sample_io[f"step{k}.c_noise"], rtol=1e-6, atol=0)
        return sample_io[f"step{k}.net_out"]

    network.calls = 0
    trace = []
    x = initial_latents(sample_io["randn"], sigmas)
    out = sample_euler_edm(make_cfg_denoiser(network, concat, scales), x, sigmas, callback=trace.append)
    assert network.calls == num_steps and [s["i"] for s in trace] == list(range(num_steps))
    for k, step in enumerate(trace):
        assert step["sigma"].item() == sample_io[f"step{k}.sigma"][0].item()
        for name in ("x", "denoised"):
            err = rel_err(step[name], sample_io[f"step{k}.{name}"])
            worst[name] = max(worst.get(name, 0.0), err)
            assert err <= 1e-5, (k, name, err)
    assert rel_err(out, sample_io["samples"]) <= 1e-5
    print(f"worst relative errors vs sgm: {worst}, samples {rel_err(out, sample_io['samples']):.2e}")


# ---------------------------------------------------------------------------------------------------------------
# (b) analytic Gaussian data


def _gauss_denoiser(mu, s):
    return lambda x, sigma: mu + s**2 / (s**2 + sigma**2) * (x - mu)


def _exact_flow(x_start, sigma_start, mu, s):
    """Probability-flow ODE solution from sigma_start to 0 for data N(mu, s^2): x - mu scales with sqrt(s^2+sigma^2)."""
    return mu + (x_start - mu) * s / math.sqrt(s**2 + sigma_start**2)


def test_euler_equals_float64_hand_loop():
    mu, s = 0.7, 1.3
    sigmas = edm_sigmas(50).double()
    x0 = initial_latents(torch.randn(64, 4, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
                         sigmas)
    out = sample_euler_edm(_gauss_denoiser(mu, s), x0, sigmas)
    x = x0.clone()
    for i in range(len(sigmas) - 1):
        d = (x - (mu + s**2 / (s**2 + sigmas[i] ** 2) * (x - mu))) / sigmas[i]
        x = x + (sigmas[i + 1] - sigmas[i]) * d
    assert out.dtype == torch.float64 and torch.equal(out, x)


def test_euler_converges_to_the_exact_flow_and_the_data():
    mu, s = 0.7, 1.3
    noise = torch.randn(20000, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    errors = []
    for n in (10, 40, 160, 640):
        sigmas = edm_sigmas(n).double()
        x_start = initial_latents(noise, sigmas)
        out = sample_euler_edm(_gauss_denoiser(mu, s), x_start, sigmas)
        exact = _exact_flow(x_start, sigmas[0].item(), mu, s)
        errors.append(rel_err(out, exact))
    # Euler is first order: 4x the steps divides the error by ~4 (measured 0.32, 0.085, 0.022, 0.0054)
    assert all(b < a / 3.5 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-2, errors
    # x_start ~ N(0, 1 + sigma_0^2) is N(mu, s^2 + sigma_0^2) up to O(1/sigma_0): the output is the data law
    assert abs(out.mean().item() - mu) < 0.02 and abs(out.std().item() - s) < 0.02


def test_cfg_denoiser_with_exact_v_network_float64():
    """Full stack (concat, c_in/c_noise, v-prediction, [uncond; cond], per-frame guidance) against a hand loop.

    The network returns the exact v for Gaussian data whose mean is read from the concat channel (0 for the
    unconditional half, mu for the conditional one), so guided D is the Gaussian denoiser with mean s_t * mu."""
    mu, s, b, t = 0.5, 1.0, 2, 4
    scales = frame_guidance_scales(t, 1.0, 3.0).double()
    sigmas = edm_sigmas(30).double()
    concat = torch.cat([torch.zeros(b * t, 1, 2, 2), torch.full((b * t, 1, 2, 2), mu)]).double()

    def network(net_in, c_noise):
        sigma = (4 * c_noise).exp().reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, _ = v_edm_scalings(sigma)
        x, m = net_in[:, :3] / c_in, net_in[:, 3:]
        return (m + s**2 / (s**2 + sigma**2) * (x - m) - c_skip * x) / c_out

    x_start = initial_latents(torch.randn(b * t, 3, 2, 2, generator=torch.Generator().manual_seed(2),
                                          dtype=torch.float64), sigmas)
    out = sample_euler_edm(make_cfg_denoiser(network, concat, scales), x_start, sigmas)
    frame_mu = (scales * mu).repeat(b).reshape(-1, 1, 1, 1)  # (b t) layout: t fastest
    x = x_start.clone()
    for i in range(len(sigmas) - 1):
        d = (x - _gauss_denoiser(frame_mu, s)(x, sigmas[i])) / sigmas[i]
        x = x + (sigmas[i + 1] - sigmas[i]) * d
    assert rel_err(out, x) < 1e-12


def test_apply_guidance_layout_and_edm_denoise_concat():
    u, c = torch.zeros(6, 1), torch.ones(6, 1)
    assert apply_guidance(u, c, torch.tensor([1.0, 2.0, 3.0])).flatten().tolist() == [1, 2, 3, 1, 2, 3]
    seen = {}

    def network(net_in, c_noise):
        seen.update(net_in=net_in, c_noise=c_noise)
        return torch.zeros_like(net_in[:, :2])

    x, concat, sigma = torch.randn(3, 2, 4, 4), torch.randn(3, 5, 4, 4), torch.tensor(3.0)
    out = edm_denoise(network, x, sigma, concat)
    c_skip, _, c_in, c_noise = v_edm_scalings(sigma)
    assert torch.equal(seen["net_in"][:, 2:], concat)  # concat is appended unscaled
    assert torch.equal(seen["net_in"][:, :2], x * c_in) and torch.equal(seen["c_noise"], c_noise.expand(3))
    assert torch.equal(out, x * c_skip)


# ---------------------------------------------------------------------------------------------------------------
# (c) conditioning vs diffusers' conventions


def test_micro_conditioning_matches_diffusers_added_time_ids():
    from diffusers import StableVideoDiffusionPipeline
    from diffusers.models.embeddings import Timesteps

    fps = inspect.signature(StableVideoDiffusionPipeline.__call__).parameters["fps"].default
    assert fps == 7 and fps_id_from_fps(fps) == 6  # = fps_id 6 of sgm simple_video_sample.py
    motion, aug, batch = 127, 0.02, 2
    fake = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(addition_time_embed_dim=256),
                                                add_embedding=SimpleNamespace(linear_1=SimpleNamespace(in_features=768))))
    ids = StableVideoDiffusionPipeline._get_add_time_ids(fake, fps - 1, motion, aug, torch.float32, batch, 1, True)
    theirs = Timesteps(256, True, downscale_freq_shift=0)(ids.flatten()).reshape(ids.shape[0], -1)  # UNet's path
    ours = micro_conditioning(fps_id_from_fps(fps), motion, aug, num_rows=ids.shape[0])
    assert ours.shape == (2 * batch, 768) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    direct = Timesteps(256, True, 0)(torch.tensor([fps - 1.0, motion, aug])).reshape(1, -1)
    torch.testing.assert_close(ours[:1], direct, rtol=0, atol=1e-6)


def test_augment_condition_image_and_repeat_frames():
    image = torch.rand(2, 3, 8, 8) * 2 - 1
    before = image.clone()
    out = augment_condition_image(image, 0.02, torch.Generator().manual_seed(5))
    expected = before + 0.02 * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out, expected) and torch.equal(image, before)
    rows = repeat_frames(torch.arange(2.0)[:, None], 3).flatten().tolist()
    assert rows == [0, 0, 0, 1, 1, 1]  # (b t): frames of one video contiguous


# ---------------------------------------------------------------------------------------------------------------
# (d) schedule and loop vs diffusers' EulerDiscreteScheduler with SVD's scheduler_config.json

SVD_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                            prediction_type="v_prediction", interpolation_type="linear", use_karras_sigmas=True,
                            sigma_min=0.002, sigma_max=700.0, timestep_spacing="leading", timestep_type="continuous",
                            steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True, clip_sample=False)


def _svd_scheduler():
    from diffusers import EulerDiscreteScheduler
    return EulerDiscreteScheduler.from_config(SVD_SCHEDULER_CONFIG)


@pytest.mark.parametrize("num_steps", [5, 25, 30])
def test_sigmas_match_diffusers(num_steps):
    # diffusers evaluates the Karras formula in float64 and rounds once; we follow sgm in float32. Near sigma_min
    # the base max^(1/7) + ramp (min^(1/7) - max^(1/7)) ~ 0.41 carries an absolute rounding error of ~ulp(2.55)
    # = 2.4e-7, i.e. ~6e-7 relative, which the 7th power multiplies by 7: ~4e-6. Measured worst 3.5e-6 (25 steps,
    # sigma 0.0079), 1.7e-6 for 5 and 30 steps; tolerance 1e-5 relative. c_noise = ln(sigma)/4 then differs by
    # <= 1e-6 absolute (measured 8.3e-7); tolerance 2e-6.
    scheduler = _svd_scheduler()
    scheduler.set_timesteps(num_steps)
    ours = edm_sigmas(num_steps)
    torch.testing.assert_close(ours, scheduler.sigmas, rtol=1e-5, atol=0)
    torch.testing.assert_close(v_edm_scalings(ours[:-1])[3], scheduler.timesteps, rtol=0, atol=2e-6)
    assert math.isclose(torch.sqrt(1.0 + ours[0] ** 2.0).item(), float(scheduler.init_noise_sigma), rel_tol=1e-6)


def test_sampling_loop_matches_diffusers():
    """Same toy v-network, unguided: our Euler loop vs diffusers' scale_model_input/step loop (docs/model.md)."""
    def network(net_in, c_noise):  # a nonlinear stand-in for the UNet
        return torch.tanh(net_in * (1 + c_noise.reshape(-1, 1, 1, 1))) - 0.3 * net_in

    num_steps = 25
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    sigmas = edm_sigmas(num_steps)
    ours = sample_euler_edm(lambda x, sigma: edm_denoise(network, x, sigma), initial_latents(noise, sigmas), sigmas)
    scheduler = _svd_scheduler()
    scheduler.set_timesteps(num_steps)
    latents = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        v = network(scheduler.scale_model_input(latents, t), t.expand(latents.shape[0]))
        latents = scheduler.step(v, t, latents).prev_sample
    assert rel_err(ours, latents) < 1e-5
