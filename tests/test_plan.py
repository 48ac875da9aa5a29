"""The acceleration plan: step caching (DeepCache), noise schedules (EDM, AYS, custom), speed levels and their
checks; each off-position bit-identical to the plain run. The tiny model is random: mechanics, not quality."""
from pathlib import Path

import numpy as np
import pytest
import torch

import svdlite
from svdlite import generate, load_model
from svdlite.plan import SPEED_LEVELS, Step, build_plan
from svdlite.sampling import ays_sigmas, check_sigmas, edm_sigmas

EXAMPLE = Path(svdlite.__file__).parent / "assets" / "example.png"
SMALL = dict(num_frames=3, num_inference_steps=4, height=64, width=64, seed=3, progress=False)
AYS_PUBLISHED = [700.0, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.0]  # diffusers AysSchedules


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.fixture(scope="module")
def plain(tiny):
    return generate(EXAMPLE, model=tiny, **SMALL)


def test_off_positions_are_bit_identical(tiny, plain):
    for options in ({"cache_interval": 1}, {"cache_interval": 1, "cache_depth": 2}, {"schedule": "edm"},
                    {"speed": "exact"}, {"guidance_cut_step": 4}, {"sigmas": edm_sigmas(4)}):
        video = generate(EXAMPLE, model=tiny, **SMALL, **options)
        assert torch.equal(video.latents, plain.latents) and torch.equal(video.frames, plain.frames), options


def _block_calls(unet):
    """Per numbered block, the list of step indices at which it ran (from the sampler's step counter)."""
    calls, hooks = {}, []
    for name, block in unet.named_blocks():
        calls[name] = 0
        hooks.append(block.register_forward_pre_hook(lambda m, a, name=name: calls.__setitem__(name, calls[name] + 1)))
    return calls, hooks


def test_cache_runs_only_the_shallow_branch_and_refreshes_at_full_steps(tiny, plain):
    unet = tiny.unet
    calls, hooks = _block_calls(unet)
    seen = []  # (cached argument, returned features) per UNet call
    hooks.append(unet.register_forward_hook(
        lambda m, args, kwargs, out: seen.append((kwargs.get("cached"), out[1])), with_kwargs=True))
    try:
        video = generate(EXAMPLE, model=tiny, cache_interval=3, cache_depth=1, **SMALL)  # steps 0, 3 full
    finally:
        for h in hooks:
            h.remove()
    n = len(unet.output_blocks)
    shallow = {"input_blocks.0", "input_blocks.1", f"output_blocks.{n - 2}", f"output_blocks.{n - 1}"}
    assert {name for name, c in calls.items() if c == 4} == shallow  # every step
    assert all(c == 2 for name, c in calls.items() if name not in shallow)  # the 2 full steps only
    assert [cached is None for cached, _ in seen] == [True, False, False, True]
    assert seen[1][0] is seen[0][1] and seen[2][0] is seen[0][1]  # steps 1, 2 reuse step 0's features
    assert seen[1][1] is seen[0][1]  # a reusing call hands the same features on
    assert not torch.equal(video.latents, plain.latents)


def test_cache_across_the_guidance_cut_uses_the_conditional_half(tiny):
    seen = []
    hook = tiny.unet.register_forward_hook(lambda m, a, kw, out: seen.append((a[0].shape[0], kw.get("cached"))),
                                           with_kwargs=True)
    try:
        generate(EXAMPLE, model=tiny, cache_interval=2, cache_depth=0, guidance_cut_step=1, **SMALL)
    finally:
        hook.remove()
    rows = [r for r, _ in seen]
    assert rows == [6, 3, 3, 3]  # step 0 guided (2 x 3 frames), then conditional only
    assert seen[1][1].shape[0] == 3 and seen[3][1].shape[0] == 3  # the guided features' conditional half


def test_ays_schedule_against_the_published_list():
    assert ays_sigmas(10).tolist() == pytest.approx(AYS_PUBLISHED, rel=1e-7)
    levels = np.array([700.0, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002])
    for n in (4, 7, 25, 30):  # the authors' loglinear_interp over the 11 levels, then a final 0
        xs, ys = np.linspace(0, 1, len(levels)), np.log(levels[::-1])
        expected = np.exp(np.interp(np.linspace(0, 1, n + 1), xs, ys))[::-1].copy()
        expected[-1] = 0
        assert ays_sigmas(n).tolist() == pytest.approx(expected.tolist(), rel=1e-6)  # float32 storage
    with pytest.raises(ValueError, match="num_steps"):
        ays_sigmas(0)


def test_schedules_and_sigmas_in_generate(tiny, plain):
    ays = generate(EXAMPLE, model=tiny, schedule="ays", **(SMALL | {"num_inference_steps": None}))
    explicit = generate(EXAMPLE, model=tiny, sigmas=AYS_PUBLISHED[:-1], **(SMALL | {"num_inference_steps": None}))
    assert torch.equal(ays.latents, explicit.latents)  # 10 steps, the published levels
    assert not torch.equal(ays.latents, plain.latents)
    assert check_sigmas([3.0, 1.0]).tolist() == [3.0, 1.0, 0.0]
    for bad in ([1.0, 3.0], [2.0, 2.0], [float("nan"), 1.0], [], [-1.0, 0.0]):
        with pytest.raises(ValueError, match="sigmas"):
            check_sigmas(bad)
    with pytest.raises(ValueError, match="disagrees"):
        generate(EXAMPLE, model=tiny, sigmas=[3.0, 1.0], **SMALL)
    with pytest.raises(ValueError, match="either sigmas or schedule='ays'"):
        generate(EXAMPLE, model=tiny, sigmas=[3.0, 1.0], speed="fast", **(SMALL | {"num_inference_steps": None}))
    with pytest.raises(ValueError, match="unknown noise schedule"):
        generate(EXAMPLE, model=tiny, schedule="karras", **SMALL)


def test_speed_levels(tiny):
    balanced = generate(EXAMPLE, model=tiny, speed="balanced", **SMALL)
    same = generate(EXAMPLE, model=tiny, **SMALL, **SPEED_LEVELS["balanced"])
    assert torch.equal(balanced.latents, same.latents)
    override = generate(EXAMPLE, model=tiny, speed="balanced", cache_interval=1, **SMALL)  # explicit wins
    depth = SPEED_LEVELS["balanced"]["cache_depth"]
    assert torch.equal(override.latents, generate(EXAMPLE, model=tiny, cache_depth=depth, **SMALL).latents)
    with pytest.raises(ValueError, match="unknown speed"):
        generate(EXAMPLE, model=tiny, speed="turbo", **SMALL)


def test_invalid_plans_are_refused_before_work(tiny):
    for options, message in (({"cache_interval": 0}, "cache_interval"),
                             ({"cache_interval": 2, "cache_depth": -1}, "cache_depth"),
                             ({"cache_interval": 2, "cache_depth": 16}, "cache_depth must be below"),
                             ({"guidance_cut_step": 5}, r"guidance_cut_step must be in \[0, 4\]"),
                             ({"guidance_cut_step": True}, "guidance_cut_step")):
        with pytest.raises(ValueError, match=message):
            generate(EXAMPLE, model=tiny, **SMALL, **options)
    sigmas = edm_sigmas(2)
    with pytest.raises(ValueError, match="reuses cached features"):
        from svdlite.plan import Plan
        Plan(tuple(sigmas.tolist()), (Step(0, 1.0, True), Step(1, 0.5, True, cache="reuse")), cache_depth=0)
    for options, message in (({"cache_interval": 0}, "cache_interval must be an int >= 1, got 0"),
                             ({"cache_interval": 2}, "needs a cache_depth"),
                             ({"cache_interval": 2, "cache_depth": True}, "cache_depth must be an int >= 0")):
        with pytest.raises(ValueError, match=message):  # the lower-level API (count_macs) checks the same rules
            build_plan(sigmas, guidance=True, **options)
    plan = build_plan(sigmas, guidance=True, cache_interval=2, cache_depth=0)
    assert [s.cache for s in plan.steps] == ["refresh", "reuse"] and not plan.is_exact
    assert build_plan(sigmas, guidance=True).is_exact and len(build_plan(sigmas, guidance=True).describe()) == 2
