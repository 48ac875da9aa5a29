"""tools/benchmark.py (its unet part, tools/bench_unet.py) and tools/measure_options.py at a tiny scale: they run
and return sane structures.

No timing is asserted anywhere (the machine's speed is not a test); only shapes, keys and exact equalities.
"""
import json
import math

import pytest
import torch

import svdlite
from svdlite.loading import load_unet
from svdlite.testing import unet_call_inputs
from svdlite.unet_keymap import diffusers_unet_params

from helpers import load_tool

bm = load_tool("benchmark")
bu = load_tool("bench_unet")
benchlib = load_tool("benchlib")
mo = load_tool("measure_options")
QUIET = lambda msg: None  # noqa: E731


# --- benchmark ---------------------------------------------------------------------------------------------------

def test_benchmark_tiny_width_runs_and_checks_equality():
    # (not fewer frames: at tiny width the deepest level is 1x1 with one channel per GroupNorm group, so a group
    # holds only T values and with T = 2 float32 rounding is amplified past the check's tolerance)
    r = bu.benchmark(bu.WIDTHS["tiny"], frames=3, height=64, width=64, repeats=2, warmup=0, log=QUIET)
    assert r["equality"]["passed"], r["equality"]
    assert set(r["equality"]["max_rel_diff_vs_svdlite"]) == {"unfolded", "diffusers_sgm_eps", "diffusers"}
    assert r["equality"]["output_shape"] == [6, 4, 8, 8]  # (2 * frames, out_channels, latent h, latent w)
    assert r["batch"] == 6 and r["memory_mode"] == "all three loaded"
    for name in bu.VARIANTS:
        s = r["seconds_per_call"][name]
        assert s["n"] == 2 and 0 < s["min"] <= s["median"] <= s["max"]
    for s in r["ratios"].values():
        assert s["n"] == 2 and s["min"] > 0
    json.dumps(r)  # the --json output is plain JSON


def test_benchmark_phased_run_times_each_pair():
    r = bu.benchmark(bu.WIDTHS["tiny"], frames=3, height=64, width=64, repeats=1, warmup=0, log=QUIET, phased=True)
    assert r["memory_mode"] == "phased" and r["equality"]["passed"]
    assert [r["seconds_per_call"][n]["n"] for n in bu.VARIANTS] == [1, 2, 1]  # svdlite runs in both phases
    assert r["ratios"]["diffusers/svdlite"]["n"] == r["ratios"]["unfolded/svdlite"]["n"] == 1
    # without the ablation there is no third copy to make room for: --phased --no-unfolded (or --quick) is one pair
    r = bu.benchmark(bu.WIDTHS["tiny"], frames=3, height=64, width=64, repeats=1, warmup=0, log=QUIET, phased=True,
                     unfolded=False)
    assert r["memory_mode"] == "diffusers and svdlite" and list(r["seconds_per_call"]) == ["diffusers", "svdlite"]


def test_benchmark_cli_json(capsys):
    assert bm.main(["--width", "tiny", "--frames", "3", "--repeats", "1", "--warmup", "0", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["network"] == "tiny" and r["equality"]["passed"] and "tools/benchmark.py" in r["command"]


def test_fold_and_diffusers_agree_in_float64(tmp_path):
    """The equality check's tolerances are float32 noise. In float64 the fold equals the original computation to
    float64 noise; diffusers with the original GroupNorm eps equals svdlite to ~1e-6, the rounding of svdlite's
    deliberate float32 islands (GroupNorm32 and the mix-factor sigmoid run in float32, as in sgm); diffusers as
    shipped differs by more (its GroupNorm eps 1e-6 in some ResBlocks)."""
    config = bu.WIDTHS["tiny"]
    inputs = unet_call_inputs(config, 3, 64, 64, seed=3)
    unet = benchlib.build_diffusers_unet(config, 3, seed=3)
    unet.save_pretrained(tmp_path)
    runner = bu.Runner({k: tuple(a.double() for a in v) if isinstance(v, tuple) else v for k, v in inputs.items()})
    runner.add("diffusers", unet.double())
    runner.add("svdlite", load_unet(tmp_path, dtype=torch.float64))
    runner.add("unfolded", load_unet(tmp_path, dtype=torch.float64, fold_cross_attention=False))
    ref = runner.run("svdlite")
    assert benchlib.rel_diff(runner.run("unfolded"), ref) < 1e-9
    assert benchlib.rel_diff(bu.diffusers_with_sgm_eps(runner), ref) < 1e-5
    assert benchlib.rel_diff(runner.run("diffusers"), ref) > 1e-5


def test_diffusers_kwargs_of_svd_are_diffusers_defaults():
    from diffusers import UNetSpatioTemporalConditionModel

    kwargs = diffusers_unet_params(svdlite.UNetConfig(), 14)
    with torch.device("meta"):
        ours, theirs = UNetSpatioTemporalConditionModel(**kwargs), UNetSpatioTemporalConditionModel(num_frames=14)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    with pytest.raises(ValueError, match="attention"):
        diffusers_unet_params(svdlite.UNetConfig(attention_resolutions=(4, 2)), 14)
    with pytest.raises(ValueError, match="multiples of 64"):
        unet_call_inputs(svdlite.UNetConfig(), 2, 48, 64, 0)


# --- measure_options ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    return svdlite.load_model("tiny")


def test_option_rows(tiny_model):
    variants = [("cut0", {"guidance_cut_step": 0}), ("exact again", {"guidance_cut_step": 2}),
                ("f3", {"f3_ratio": 0.5}), ("cache", {"cache_interval": 2, "cache_depth": 0})]
    r = mo.measure(tiny_model, steps=2, frames=3, height=64, width=64, variants=variants, seed=1, rounds=2, log=QUIET)
    assert (r["num_inference_steps"], r["num_frames"], r["height"], r["width"], r["rounds"]) == (2, 3, 64, 64, 2)
    rows = {row["variant"]: row for row in r["rows"]}
    assert list(rows) == ["cut0", "exact again", "f3", "cache"]
    exact = rows["exact again"]  # K = steps is the exact computation: identical latents and frames
    assert exact["latents_rel_l2"] == 0 and exact["frames_max_abs"] == 0 and math.isinf(exact["psnr_db"])
    assert (exact["guided_evals"], exact["conditional_evals"]) == (2, 0)
    cut0 = rows["cut0"]  # K = 0 drops guidance everywhere: the output moves (tiny preset: guidance 1.0 -> 2.5)
    assert cut0["latents_rel_l2"] > 1e-3 and cut0["frames_max_abs"] > 0 and math.isfinite(cut0["psnr_db"])
    assert (cut0["guided_evals"], cut0["conditional_evals"]) == (0, 2)
    assert 0 <= cut0["frames_mean_abs"] <= cut0["frames_max_abs"] <= 255
    assert cut0["psnr_worst_frame_db"] <= cut0["psnr_db"]
    assert rows["f3"]["skipped_temporal_units"] == 16 and rows["f3"]["latents_rel_l2"] > 0  # round(0.5 * 16 * 2)
    assert rows["cache"]["reuse_steps"] == 1 and rows["cache"]["latents_rel_l2"] > 0
    for row in rows.values():
        assert len(row["time_ratios"]) == len(row["cpu_ratios"]) == 2 and row["time_ratio"] > 0 < row["cpu_ratio"]
    json.dumps(r, default=str)


def test_a_speed_level_runs_with_its_own_step_count(tiny_model):
    """`speed fast` is measured as a user gets it (AYS, 10 steps), not at the run's step count: its deviation is
    that of generate(speed="fast") from the exact run, and its row says 10 steps."""
    size = dict(num_frames=3, height=64, width=64)
    r = mo.measure(tiny_model, steps=2, frames=3, height=64, width=64, variants=[("fast", {"speed": "fast"})],
                   seed=1, log=QUIET)
    row = r["rows"][0]
    assert row["steps"] == 10 and row["guided_evals"] == 10
    exact = svdlite.generate(mo.EXAMPLE, model=tiny_model, seed=1, num_inference_steps=2, progress=False, **size)
    fast = svdlite.generate(mo.EXAMPLE, model=tiny_model, seed=1, speed="fast", progress=False, **size)
    ref = exact.latents.double()
    assert row["latents_rel_l2"] == ((fast.latents.double() - ref).norm() / ref.norm()).item()


def test_option_variants_are_checked_before_running(tiny_model):
    with pytest.raises(ValueError, match="guidance_cut_step"):
        mo.measure(tiny_model, steps=2, variants=[("bad", {"guidance_cut_step": 3})], log=QUIET)
    assert mo.parse_variant("a:cache_interval=2,cache_depth=0") == ("a", {"cache_interval": 2, "cache_depth": 0})
    assert mo.parse_variant("f3_ratio=0.2") == ("f3_ratio=0.2", {"f3_ratio": 0.2})
    for bad in ("x:unknown=1", "x:cache_interval=two", "x:"):
        with pytest.raises(ValueError):
            mo.parse_variant(bad)


def test_metric_helpers():
    assert [name for name, _ in mo.default_variants(10, f3_ratios=(0.2,), speeds=("fast",), caches=())] == [
        "guidance-cut@8", "f3@0.2", "speed fast"]  # the cut at 80% of the steps by default
    frames = torch.zeros(2, 4, 4, 3, dtype=torch.uint8)
    other = frames.clone()
    other[1, 0, 0, 0] = 255  # one pixel fully wrong in frame 1
    m = mo.frame_metrics(other, frames)
    assert m["frames_max_abs"] == 255 and m["frames_mean_abs"] == pytest.approx(255 / 96)
    assert m["psnr_db"] == pytest.approx(10 * math.log10(96))
    assert m["psnr_worst_frame_db"] == pytest.approx(10 * math.log10(48))
