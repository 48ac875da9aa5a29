"""EDM sampling for SVD as pure functions: noise schedule, v-prediction preconditioning, per-frame guidance, Euler.

Reproduces the sampling stack of the original sgm code (Stability-AI/generative-models,
`sgm/modules/diffusionmodules/`): `EDMDiscretization` + `append_zero` (discretizer.py), `Denoiser` with
`VScalingWithEDMcNoise` (denoiser.py, denoiser_scaling.py), `LinearPredictionGuider` (guiders.py) and
`EulerEDMSampler` (sampling.py) with its SVD defaults s_churn=0, s_noise=1. The sampler is Algorithm 2 of
Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models" (EDM), with its Heun
correction dropped (Euler) and no churn, so sampling is deterministic given the initial noise; no RNG is used here.

Arithmetic mirrors sgm operation for operation in the dtype of the sampler state (float32 in the pipeline), so
on identical inputs the results equal sgm's to float32 rounding; pass float64 tensors for a float64 run.
Layout: latents are `(b t) c h w` (frames of one video contiguous), as in sgm and the UNet. The network is never
seen here: callers pass `network(net_in, c_noise) -> F`, typically a closure over the UNet and its
precomputed conditioning.
"""
from collections.abc import Callable, Sequence

import torch
from einops import rearrange

Network = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (net_in (N, C+Cc, h, w), c_noise (N,)) -> F
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (N, C, h, w), sigma ()) -> D (N, C, h, w)


def edm_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 700.0, rho: float = 7.0,
               device: torch.device | str | None = None) -> torch.Tensor:
    """Karras et al. 2022 (EDM, eq. 5) noise levels, descending, with a final 0: (num_steps + 1,) float32.

    sigma_i = (sigma_max^(1/rho) + i/(n-1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho. Computed exactly like
    sgm `EDMDiscretization(sigma_min, sigma_max, rho)(num_steps)` (float32 ramp, Python-float roots, then
    `append_zero`), so it reproduces sgm's values bit for bit on CPU, including their float32 rounding
    (sigma_0 = 700.00012, not 700). SVD uses sigma_max = 700 (sgm's class default is 80).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    ramp = torch.linspace(0, 1, num_steps, device=device)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros([1])])


# Align Your Steps (Sabour et al., ICML 2024): NVIDIA's optimised 10-step noise levels for SVD. The last level
# (sigma_min) is replaced by 0, giving diffusers' `AysSchedules["StableDiffusionVideoSigmas"]`.
AYS_SVD = (700.0, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002)


def ays_sigmas(num_steps: int = 10, device: torch.device | str | None = None) -> torch.Tensor:
    """Align Your Steps noise levels for SVD, descending, with a final 0: (num_steps + 1,) float32.

    10 steps give the published list; other counts interpolate its 11 levels log-linearly onto num_steps + 1
    evenly spaced points (the authors' `loglinear_interp`, also ComfyUI's AlignYourStepsScheduler), then the
    last level is set to 0, as both do.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    levels = torch.tensor(AYS_SVD, dtype=torch.float64)
    if num_steps + 1 != len(levels):
        xs = torch.linspace(0, 1, len(levels), dtype=torch.float64)
        ys = levels.flip(0).log()  # ascending in sigma, as the interpolation needs increasing abscissae
        new_xs = torch.linspace(0, 1, num_steps + 1, dtype=torch.float64)
        index = torch.searchsorted(xs, new_xs, right=True).clamp(1, len(xs) - 1)
        x0, x1, y0, y1 = xs[index - 1], xs[index], ys[index - 1], ys[index]
        levels = (y0 + (new_xs - x0) / (x1 - x0) * (y1 - y0)).exp().flip(0)
    levels[-1] = 0.0
    return levels.to(device=device, dtype=torch.float32)


def check_sigmas(sigmas) -> torch.Tensor:
    """A user's noise schedule as (n + 1,) float32: finite, strictly descending, positive but the last, which is
    appended as 0 when it is not given."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).flatten()
    if not torch.isfinite(sigmas).all():
        raise ValueError(f"sigmas must be finite, got {sigmas.tolist()}")
    if sigmas.numel() and sigmas[-1] != 0:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    if sigmas.numel() < 2 or not (sigmas[:-1] > 0).all() or not (sigmas[1:] < sigmas[:-1]).all():
        raise ValueError(f"sigmas must be positive and strictly descending (a final 0 is appended), got "
                         f"{sigmas.tolist()}")
    return sigmas


def v_edm_scalings(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """sgm `VScalingWithEDMcNoise`: v-prediction preconditioning with sigma_data = 1 and EDM's noise input.

    Returns (c_skip, c_out, c_in, c_noise) = (1/(s^2+1), -s/sqrt(s^2+1), 1/sqrt(s^2+1), ln(s)/4), each shaped
    like `sigma`, so that D(x; s) = c_skip * x + c_out * F(c_in * x, c_noise).
    """
    sigma = torch.as_tensor(sigma)
    c_skip = 1.0 / (sigma**2 + 1.0)
    c_out = -sigma / (sigma**2 + 1.0) ** 0.5
    c_in = 1.0 / (sigma**2 + 1.0) ** 0.5
    c_noise = 0.25 * sigma.log()
    return c_skip, c_out, c_in, c_noise


def initial_latents(noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_0 = noise * sqrt(1 + sigma_0^2), as sgm `BaseDiffusionSampler.prepare_sampling_loop`.

    The factor is sqrt(1 + sigma_0^2), not sigma_0 (diffusers' `init_noise_sigma` for "leading" spacing agrees).
    Unlike sgm, which scales its argument in place, this returns a new tensor.
    """
    return noise * torch.sqrt(1.0 + sigmas[0] ** 2.0).to(noise.device)


def frame_guidance_scales(num_frames: int, min_scale: float, max_scale: float,
                          device: torch.device | str | None = None) -> torch.Tensor:
    """Per-frame guidance scale (num_frames,) float32 = linspace(min_scale, max_scale, num_frames), as sgm
    `LinearPredictionGuider.scale`: frame 0 gets min_scale, the last frame max_scale."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return torch.linspace(min_scale, max_scale, num_frames, device=device)


def apply_guidance(d_uncond: torch.Tensor, d_cond: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Per-frame classifier-free guidance D = D_u + s_t * (D_c - D_u), as sgm `LinearPredictionGuider.__call__`.

    Args:
        d_uncond, d_cond: ((b t), ...) denoised predictions of the two branches, frames of a video contiguous.
        scales: (t,) per-frame scales, e.g. from `frame_guidance_scales`.
    Returns:
        ((b t), ...) guided prediction.
    """
    t = scales.shape[0]
    if d_uncond.shape != d_cond.shape or d_uncond.shape[0] % t:
        raise ValueError(f"need equal shapes with rows a multiple of {t} frames, got {tuple(d_uncond.shape)} "
                         f"and {tuple(d_cond.shape)}")
    u = rearrange(d_uncond, "(b t) ... -> b t ...", t=t)
    c = rearrange(d_cond, "(b t) ... -> b t ...", t=t)
    s = scales.to(device=u.device, dtype=u.dtype).reshape(1, t, *([1] * (u.ndim - 2)))
    return rearrange(u + s * (c - u), "b t ... -> (b t) ...")


def edm_denoise(network: Network, x: torch.Tensor, sigma: torch.Tensor, concat: torch.Tensor | None = None
                ) -> torch.Tensor:
    """One preconditioned denoiser call, sgm `Denoiser.forward` + `OpenAIWrapper`'s concat.

    D = c_skip * x + c_out * network(cat([c_in * x, concat], dim=1), c_noise). Only x is scaled by c_in; the
    conditioning latent `concat` is appended unscaled. sigma is a scalar (0-dim) or one value per row (N,).

    Args:
        network: (net_in (N, C + Cc, h, w), c_noise (N,)) -> F (N, C, h, w), e.g. a UNet closure.
        x: (N, C, h, w) noisy latents in the sampler dtype.
        sigma: () or (N,) noise level(s).
        concat: (N, Cc, h, w) or None.
    Returns:
        (N, C, h, w) denoised estimate, in x's dtype.
    """
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
    c_skip, c_out, c_in, c_noise = v_edm_scalings(sigma.reshape(-1, *([1] * (x.ndim - 1))))
    net_in = x * c_in
    if concat is not None:
        net_in = torch.cat([net_in, concat.to(device=x.device, dtype=x.dtype)], dim=1)
    out = network(net_in, c_noise.reshape(-1)).to(x.dtype)
    return out * c_out + x * c_skip


def make_cfg_denoiser(network: Network, concat: torch.Tensor, scales: torch.Tensor) -> Denoiser:
    """A guided denoiser D(x, sigma) built exactly like sgm's `LinearPredictionGuider` around `Denoiser`.

    Each call runs the network once on the batch [x; x] (unconditional half first, as sgm's
    `prepare_inputs` `cat((uc, c))`), computes D per half with `edm_denoise`, then `apply_guidance`.

    Args:
        network: (net_in (2N, C + Cc, h, w), c_noise (2N,)) -> F (2N, C, h, w). The closure must feed the UNet
            the matching [uncond; cond] context/vector rows (see `conditioning.cfg_batch`).
        concat: (2N, Cc, h, w) conditioning latents [uncond; cond] (sgm: zeros; then the image latent per frame).
        scales: (t,) per-frame guidance scales; N must be a multiple of t.
    Returns:
        denoise(x (N, C, h, w), sigma ()) -> guided D (N, C, h, w).
    """
    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if concat.shape[0] != 2 * x.shape[0]:
            raise ValueError(f"concat has {concat.shape[0]} rows; expected 2 * {x.shape[0]} ([uncond; cond])")
        d_uncond, d_cond = edm_denoise(network, torch.cat([x, x]), sigma, concat).chunk(2)
        return apply_guidance(d_uncond, d_cond, scales)

    return denoise


def sample_euler_edm(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, steps: Sequence | None = None,
                     callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """Euler sampler of Karras et al. 2022 (EDM, Algorithm 2 without the Heun correction, s_churn = 0).

    Reproduces sgm `EulerEDMSampler` with its SVD defaults (s_churn 0, so gamma = 0, sigma_hat = sigma and no
    noise is injected: deterministic, no RNG). Churn is not implemented. For i = 0..n-1:
    D = denoise(x, sigma_i); d = (x - D) / sigma_i; x = x + (sigma_{i+1} - sigma_i) * d. With a final sigma of 0
    the last step returns D exactly.

    Args:
        denoise: (x (N, C, h, w), sigma ()) -> D, e.g. from `make_cfg_denoiser`.
        x: (N, C, h, w) initial latents, already scaled (`initial_latents`). Not modified.
        sigmas: (n + 1,) descending noise levels from `edm_sigmas`.
        steps: n per-step plan entries (`plan.Plan.steps`). When given, the denoiser is called as
            `denoise(x, sigma, steps[i], carry) -> (D, carry)`: `carry` starts as None and is whatever the previous
            call returned (the step cache's features), so the cache lives in this loop, not in a module.
        callback: called after each step's denoiser call with dict(i=, sigma=, x=, denoised=), where x is the
            state entering step i (for traces and progress bars).
    Returns:
        (N, C, h, w) the final latents.
    """
    sigmas = sigmas.to(x.device)
    if steps is not None and len(steps) != len(sigmas) - 1:
        raise ValueError(f"{len(sigmas) - 1} steps need as many plan entries, got {len(steps)}")
    carry = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if steps is None:
            denoised = denoise(x, sigma)
        else:
            denoised, carry = denoise(x, sigma, steps[i], carry)
        if callback is not None:
            callback(dict(i=i, sigma=sigma, x=x, denoised=denoised))
        d = (x - denoised) / sigma  # sgm `to_d`
        x = x + (sigma_next - sigma) * d
    return x
