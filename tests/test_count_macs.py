"""tools/count_macs.py: parameter and MAC counts of the full-size networks (meta device) against docs/papers.md."""
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from svdlite.attention import CrossAttention, SelfAttention
from svdlite.run import RunSpec

from helpers import TOOLS, load_tool

TOOL = TOOLS / "count_macs.py"


cm = load_tool("count_macs")
ORIGINAL_PARAMS = 1_524_623_082
VCUT_PARAMS = 1_449_502_442
TEMPORAL_ATTN2, TEMPORAL_FOLD = 50_352_320, 12_792_000


@pytest.fixture(scope="module", autouse=True)
def cli_run():
    """The CLI on a small setting, started first so it runs beside the in-process count (the count is op-bound)."""
    process = subprocess.Popen([sys.executable, str(TOOL), "--frames", "2", "--steps", "3", "--height", "128",
                                "--width", "128", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield process
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def svd_xt():
    rows = cm.count("svd-xt", frames=25, steps=25, height=576, width=1024)
    return {r["mode"]: r for r in rows}


def test_original_and_vcut(svd_xt):
    original, vcut, temporal = svd_xt["original"], svd_xt["vcut"], svd_xt["vcut-temporal"]
    assert original["params"] == ORIGINAL_PARAMS
    assert abs(original["macs_per_eval_frames"] - 39.97e12) <= 0.01e12  # one UNet call on 25 frames
    assert abs(original["macs_per_video"] - 2.0e15) <= 0.02 * 2.0e15  # 25 steps x 2 halves
    assert vcut["params"] == VCUT_PARAMS
    assert vcut["saving_vs_original"] >= 74e12
    assert temporal["params"] == ORIGINAL_PARAMS - TEMPORAL_ATTN2 + TEMPORAL_FOLD
    assert cm.temporal_attn2_params() == TEMPORAL_ATTN2
    assert 0 < temporal["saving_vs_original"] < vcut["saving_vs_original"]
    for row in (original, temporal, vcut):
        assert row["macs_per_eval"] == 2 * row["macs_per_eval_frames"]  # the CFG batch doubles every product
        assert row["macs_per_video"] == 25 * row["macs_per_eval"] + row["macs_setup_per_video"]
    assert original["macs_setup_per_video"] == 0 < vcut["macs_setup_per_video"] < 1e10


def test_guidance_cut_meets_322T(svd_xt):
    cuts = {r["guided_evals"]: r for r in svd_xt.values() if r["mode"].startswith(cm.CUT_PREFIX)}
    assert {10, 15, 20} <= set(cuts)
    flagged = [k for k, r in cuts.items() if r["meets_322T_latest"]]
    assert len(flagged) == 1
    k = flagged[0]
    row = cuts[k]
    assert row["mode"] == f"{cm.CUT_PREFIX}{k}" and row["params"] == VCUT_PARAMS
    assert row["saving_vs_original"] >= 322e12
    vcut = svd_xt["vcut"]
    assert row["macs_per_video"] == (k * vcut["macs_per_eval"] + (25 - k) * vcut["macs_per_eval_frames"]
                                     + row["macs_setup_per_video"])
    later = cm.unet_row("vcut", 25, 25, 576, 1024, cut=k + 1)  # cutting one step later no longer saves 322T
    assert svd_xt["original"]["macs_per_video"] - later["macs_per_video"] < 322e12


def test_vae_and_clip_rows(svd_xt):
    assert svd_xt["clip"]["params"] == 632_076_800
    for mode in ("vae-encoder", "vae-decoder", "clip"):
        assert svd_xt[mode]["macs_per_video"] == svd_xt[mode]["macs_per_eval"] > 0
    assert "aten.bmm (counted)" in cm.OPS_SEEN["unet"]  # attention products went through the counter


def test_attention_products_are_counted():
    b, n, m, dim, ctx_dim, heads, dh = 3, 7, 5, 40, 24, 2, 24
    inner = heads * dh
    with torch.device("meta"):
        attn, cross = SelfAttention(dim, heads, dh), CrossAttention(dim, ctx_dim, heads, dh)
        x, context = torch.randn(b, n, dim), torch.randn(b, m, ctx_dim)
    projections = b * n * (3 * dim * inner + inner * dim)  # to_q, to_k, to_v, to_out
    scores_and_values = 2 * b * heads * n * n * dh
    assert cm.count_call("test", lambda: attn(x)) == projections + scores_and_values
    cross_macs = b * n * 2 * dim * inner + b * m * 2 * ctx_dim * inner + 2 * b * heads * n * m * dh
    assert cm.count_call("test", lambda: cross(x, context)) == cross_macs


def test_cli_json_small(cli_run):
    out, err = cli_run.communicate(timeout=300)
    assert cli_run.returncode == 0, err
    rows = {r["mode"]: r for r in json.loads(out)}
    assert {"original", "vcut-temporal", "vcut", "vae-encoder", "vae-decoder", "clip"} <= set(rows)
    assert any(mode.startswith(cm.CUT_PREFIX) for mode in rows)
    for r in rows.values():
        assert all(isinstance(r[k], int) for k in ("params", "macs_per_eval", "macs_per_video"))
    assert rows["original"]["params"] == ORIGINAL_PARAMS and rows["vcut"]["params"] == VCUT_PARAMS
    assert rows["original"]["macs_per_video"] > rows["vcut"]["macs_per_video"]


def _meta_inputs(net, rows, frames, size):
    with torch.device("meta"):
        x = torch.randn(rows, net.config.in_channels, size, size)
        ts, y = torch.randn(rows), torch.randn(rows, net.config.adm_in_channels)
        context = torch.randn(rows, 1, net.config.context_dim)
    return x, ts, y, net.context_vectors(context, frames)


def test_plan_steps_count_exactly_what_runs():
    """A plan step's MACs, read from the per-module count of one exact forward, equal a real count of the UNet call
    with that step's arguments (skipped F3 units; a cache-reusing step with skips inside and outside its branch)."""
    from svdlite.plan import Step

    net, frames, size = cm.unet(True), 2, 16
    units = net.temporal_units()
    skip = frozenset(units[::3])  # includes input_blocks.1.1 (in the cached branch at depth 1) and deeper ones
    x, ts, y, vectors = _meta_inputs(net, 2 * frames, frames, size)
    real = cm.count_call("unet", lambda: net(x, ts, None, y, frames, context_vectors=vectors, skip_temporal=skip))
    assert cm.step_macs(Step(0, 1.0, True, skip), None, frames, 8 * size, 8 * size) == real
    _, features = net(x, ts, None, y, frames, context_vectors=vectors, cache_depth=1)
    partial = cm.count_call("unet", lambda: net(x, ts, None, y, frames, context_vectors=vectors, skip_temporal=skip,
                                                cache_depth=1, cached=features))
    assert cm.step_macs(Step(1, 1.0, True, skip, "reuse"), 1, frames, 8 * size, 8 * size) == partial
    full = cm.step_macs(Step(0, 1.0, True), None, frames, 8 * size, 8 * size)
    assert real < full and partial < full / 5


def test_f3_rows_from_a_schedule(tmp_path):
    from svdlite import F3Schedule

    units = cm.unet(True).temporal_units()
    g = torch.Generator().manual_seed(0)
    stats = {k: torch.rand(4, len(units), generator=g).tolist() for k in ("attention", "contribution")}
    path = F3Schedule(tuple(units), stats, {"num_inference_steps": 4}, {}).save(tmp_path / "s.json")
    rows = {r["mode"]: r for r in cm.count("svd", frames=2, steps=4, height=128, width=128, cut_steps=[2],
                                           components=False, plans=cm.option_plans(cm_args(path, [0.0, 0.5], [2])))}
    vcut, zero, half = rows["vcut"], rows["vcut+f3@0"], rows["vcut+f3@0.5"]
    assert zero["macs_per_video"] == vcut["macs_per_video"] and zero["skipped_temporal_units"] == 0
    assert half["skipped_temporal_units"] == 32  # round(0.5 * 16 units * 4 steps)
    assert vcut["macs_per_video"] * 0.8 < half["macs_per_video"] < vcut["macs_per_video"]
    both = rows[f"{cm.CUT_PREFIX}2+f3@0.5"]
    assert both["macs_per_video"] < min(half["macs_per_video"], rows[f"{cm.CUT_PREFIX}2"]["macs_per_video"])
    with pytest.raises(ValueError, match="4 steps"):
        cm.count("svd", frames=2, steps=5, height=128, width=128, components=False,
                 plans=cm.option_plans(cm_args(path, [0.2], [])))


def cm_args(path, ratios, cuts):
    import argparse
    return argparse.Namespace(f3_schedule=str(path), f3_ratio=ratios, f3_statistic="attention", cut_steps=cuts)


def test_committed_full_width_schedule_counts_at_full_size():
    """tests/data/f3_fullwidth_random_25steps.json (README: `tools/measure_options.py --model fullwidth --steps 25
    --f3-save ... --calibrate-only`) ranks SVD's 16 temporal blocks over 25 steps, so it counts SVD-XT videos."""
    from svdlite import F3Schedule

    schedule = F3Schedule.load(Path(__file__).parent / "data" / "f3_fullwidth_random_25steps.json")
    assert list(schedule.units) == cm.unet(True).temporal_units() and schedule.num_steps == 25
    assert schedule.settings["num_inference_steps"] == 25 and schedule.model["parameters"] == VCUT_PARAMS
    spec = RunSpec(f3_schedule=cm.ranking_only(schedule), f3_ratio=0.3)  # calibrated at 8 frames: counts at 25
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor does it warn about the other frame count, size or model
        plan = cm.plan_of(spec, cm.meta_model("svd-xt", 25, 25, 576, 1024))
    assert sum(len(s.skip_temporal) for s in plan.steps) == 120  # round(0.3 * 16 * 25)
