"""F3-Pruning: the unit skip in the UNet, the statistics against brute force, calibration, the schedule file, and
generate()'s options. The bundled tiny model has SVD's 16 temporal blocks (random weights: mechanics, not quality).
"""
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

import svdlite
from helpers import TINY, random_tensors
from svdlite import F3Schedule, VideoUNet, calibrate_f3, generate, load_model
from svdlite.f3 import unet_identity

EXAMPLE = Path(svdlite.__file__).parent / "assets" / "example.png"
SMALL = dict(num_frames=3, num_inference_steps=3, height=64, width=64)  # tiny model, small run: a few seconds


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.fixture(scope="module")
def schedule(tiny):
    return calibrate_f3([EXAMPLE], model=tiny, seed=0, progress=False, **SMALL)


def _unet(config=TINY, seed=0) -> VideoUNet:
    with torch.device("meta"):
        net = VideoUNet(config)
    net.load_state_dict(random_tensors({k: tuple(v.shape) for k, v in net.state_dict().items()}, seed), assign=True)
    return net.eval()


def _unet_inputs(net, frames=3, rows=2, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = rows * frames
    return (torch.randn(n, net.config.in_channels, size, size, generator=g), torch.randn(n, generator=g),
            torch.randn(n, 1, net.config.context_dim, generator=g),
            torch.randn(n, net.config.adm_in_channels, generator=g))


# --- the UNet's skip and record arguments ----------------------------------------------------------------------

@torch.no_grad()
def test_skipped_unit_is_the_blend_with_alpha_one():
    net = _unet()
    x, ts, ctx, y = _unet_inputs(net)
    unit = net.temporal_units()[2]
    skipped = net(x, ts, ctx, y, 3, skip_temporal={unit})
    mixer = net.get_submodule(unit.rsplit(".time_stack.", 1)[0]).time_mixer
    exact = net(x, ts, ctx, y, 3)
    mixer.mix_factor.fill_(100.0)  # sigmoid(100) == 1.0 in float32: alpha * x + 0 * temporal == x exactly
    assert torch.equal(skipped, net(x, ts, ctx, y, 3))
    assert not torch.allclose(skipped, exact, atol=1e-3)  # the unit matters, so skipping it is visible
    with pytest.raises(ValueError, match="not temporal blocks"):
        net(x, ts, ctx, y, 3, skip_temporal={"input_blocks.1.1.time_stack.7"})


@torch.no_grad()
def test_recorded_statistics_equal_brute_force():
    net = _unet()
    x, ts, ctx, y = _unet_inputs(net)
    attn_in, blend_in = {}, {}
    hooks = []
    for unit in net.temporal_units():
        block = net.get_submodule(unit)
        hooks.append(block.attn1.register_forward_pre_hook(lambda m, a, u=unit: attn_in.__setitem__(u, a[0])))
        mixer = net.get_submodule(unit.rsplit(".time_stack.", 1)[0]).time_mixer
        # copies: the blend writes its result into the temporal branch's output (in place)
        hooks.append(mixer.register_forward_pre_hook(
            lambda m, a, u=unit: blend_in.__setitem__(u, [t.clone() for t in a[:2]])))
    record = {}
    try:
        out = net(x, ts, ctx, y, 3, record=record)
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(out, net(x, ts, ctx, y, 3))  # recording does not change the output
    assert set(record) == set(net.temporal_units())
    for unit, stats in record.items():
        attn = net.get_submodule(unit).attn1
        h = attn_in[unit].double()  # ((b s), t, c): the normalised input of the temporal self-attention
        q = (h @ attn.to_q.weight.double().T).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        k = (h @ attn.to_k.weight.double().T).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # (rows, heads, t, t)
        off_diagonal = (probs.sum(-1) - probs.diagonal(dim1=-2, dim2=-1)).mean().item()  # mass on other frames
        assert stats["attention"] == pytest.approx(off_diagonal, rel=1e-5)  # float32 map vs float64
        spatial, temporal = (t.double() for t in blend_in[unit])
        alpha = torch.sigmoid(net.get_submodule(unit.rsplit(".time_stack.", 1)[0]).time_mixer.mix_factor.double())
        contribution = ((1 - alpha) * (temporal - spatial).norm() / spatial.norm()).item()
        assert stats["contribution"] == pytest.approx(contribution, rel=1e-5)
        assert 0 < stats["attention"] < 1


# --- schedule: ranking, file, checks ---------------------------------------------------------------------------

def _toy(steps=2, units=("a.0.time_stack.0", "b.0.time_stack.0", "c.0.time_stack.0")) -> F3Schedule:
    attention = [[0.5, 0.1, 0.9], [0.3, 0.8, 0.2]][:steps]
    contribution = [[0.1, 0.9, 0.5], [0.7, 0.2, 0.3]][:steps]
    return F3Schedule(units, {"attention": attention, "contribution": contribution},
                      {"num_frames": 3, "num_inference_steps": steps, "height": 64}, {})


def test_ranking_and_skip_sets():
    s = _toy()
    assert s.num_units == 6
    assert s.ranking("attention")[:3] == [(0, "b.0.time_stack.0"), (1, "c.0.time_stack.0"), (1, "a.0.time_stack.0")]
    assert s.skip_sets(0.0) == [frozenset(), frozenset()]
    # round(0.5 * 6) = 3 lowest by attention: (0, b) 0.1, (1, c) 0.2, (1, a) 0.3
    assert s.skip_sets(0.5) == [frozenset({"b.0.time_stack.0"}), frozenset({"c.0.time_stack.0", "a.0.time_stack.0"})]
    # by contribution: (0, a) 0.1, (1, b) 0.2, (1, c) 0.3
    assert s.skip_sets(0.5, "contribution") == [frozenset({"a.0.time_stack.0"}),
                                                frozenset({"b.0.time_stack.0", "c.0.time_stack.0"})]
    for r, n in ((0.1, 1), (0.25, 2), (0.75, 5), (0.99, 6)):  # round half up: 0.25 * 6 = 1.5 -> 2
        assert sum(map(len, s.skip_sets(r))) == n == s.num_skipped(r)
    for bad in (-0.1, 1.0, 1.5, float("nan"), "0.2", True):
        with pytest.raises(ValueError, match="f3_ratio"):
            s.skip_sets(bad)
    with pytest.raises(ValueError, match="unknown F3 statistic"):
        s.skip_sets(0.2, "entropy")


def test_schedule_file_round_trip_and_refusals(tmp_path):
    s = _toy()
    path = s.save(tmp_path / "s.json")
    assert F3Schedule.load(path) == s
    with pytest.raises(FileExistsError):
        s.save(path)
    assert F3Schedule.load(s.save(path, overwrite=True)) == s
    with pytest.raises(FileNotFoundError, match="does not exist"):
        s.save(tmp_path / "missing" / "s.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]  # no temporary file left

    text = path.read_text()
    cases = {"truncated": (text[:len(text) // 2], "not valid JSON"),
             "not json": ("\x00\x01binary", "not valid JSON"),
             "other json": ("[1, 2, 3]", "not an svdlite F3 schedule"),
             "version": (text.replace('"version": 1', '"version": 9'), "version 9"),
             "missing": (json.dumps({k: v for k, v in json.loads(text).items() if k != "stats"}), "lacks"),
             "ragged": (json.dumps(json.loads(text) | {"stats": {"attention": [[0.1], [0.2, 0.3, 0.4]],
                                                                  "contribution": [[0.1, 0.2, 0.3]] * 2}}),
                        "malformed"),
             "nan": (text.replace("0.9", "NaN", 1), "finite number")}
    for name, (content, message) in cases.items():
        bad = tmp_path / f"{name.replace(' ', '_')}.json"
        bad.write_text(content)
        with pytest.raises(ValueError, match=message):
            F3Schedule.load(bad)
    with pytest.raises(FileNotFoundError, match="not found"):
        F3Schedule.load(tmp_path / "nothing.json")


def test_identity_tells_models_apart_but_not_dtypes():
    a, b = _unet(seed=0), _unet(seed=1)
    ident = unet_identity(a)
    s = dataclasses.replace(_toy(), units=tuple(a.temporal_units()[:3]), model=ident)
    units = a.temporal_units()[:3]
    assert s.check(units, unet_identity(a.to(torch.bfloat16)), {}) == []  # same weights, bfloat16: accepted
    with pytest.raises(ValueError, match="another model"):
        s.check(units, unet_identity(b), {})
    with pytest.raises(ValueError, match="not this network's temporal blocks"):
        s.check(a.temporal_units(), ident, {})


# --- calibration and generate ------------------------------------------------------------------------------------

def test_calibration_is_deterministic_and_round_trips(tiny, schedule, tmp_path):
    assert schedule.units == tuple(tiny.unet.temporal_units()) and len(schedule.units) == 16
    assert schedule.num_steps == 3 and schedule.settings["num_frames"] == 3 and schedule.settings["seed"] == 0
    again = calibrate_f3([EXAMPLE], model=tiny, seed=0, progress=False, **SMALL)
    assert again.stats == schedule.stats
    other_seed = calibrate_f3([EXAMPLE], model=tiny, seed=1, progress=False, **SMALL)
    assert other_seed.stats != schedule.stats  # the seed is used
    assert F3Schedule.load(schedule.save(tmp_path / "tiny.json")) == schedule
    for rows in schedule.stats.values():
        assert all(0 < v for row in rows for v in row)


def test_ratio_zero_is_bit_identical(tiny, schedule):
    plain = generate(EXAMPLE, model=tiny, seed=5, progress=False, **SMALL)
    zero = generate(EXAMPLE, model=tiny, seed=5, progress=False, f3_schedule=schedule, f3_ratio=0.0, **SMALL)
    assert torch.equal(plain.latents, zero.latents) and torch.equal(plain.frames, zero.frames)


@pytest.mark.parametrize("ratio, statistic", [(0.25, "attention"), (0.5, "contribution")])
def test_skipped_units_never_run(tiny, schedule, ratio, statistic):
    calls = {u: 0 for u in tiny.unet.temporal_units()}
    hooks = [tiny.unet.get_submodule(u).register_forward_pre_hook(lambda m, a, u=u: calls.__setitem__(u, calls[u] + 1))
             for u in calls]
    try:
        pruned = generate(EXAMPLE, model=tiny, seed=5, progress=False, f3_schedule=schedule, f3_ratio=ratio,
                          f3_statistic=statistic, **SMALL)
    finally:
        for h in hooks:
            h.remove()
    skip_sets = schedule.skip_sets(ratio, statistic)
    n_skipped = round(ratio * 16 * 3)
    assert sum(map(len, skip_sets)) == n_skipped
    steps = SMALL["num_inference_steps"]
    assert calls == {u: steps - sum(u in s for s in skip_sets) for u in calls}  # one guided call per step
    assert sum(calls.values()) == 16 * steps - n_skipped
    plain = generate(EXAMPLE, model=tiny, seed=5, progress=False, **SMALL)
    assert not torch.equal(plain.latents, pruned.latents)
    assert schedule.skip_sets(ratio, "attention") != schedule.skip_sets(ratio, "contribution")


def test_generate_refuses_mismatched_schedules(tiny, schedule):
    with pytest.raises(ValueError, match="num_frames=3, this run uses 4"):
        generate(EXAMPLE, model=tiny, f3_schedule=schedule, f3_ratio=0.2, **(SMALL | {"num_frames": 4}))
    with pytest.raises(ValueError, match="num_inference_steps=3, this run uses 5"):
        generate(EXAMPLE, model=tiny, f3_schedule=schedule, f3_ratio=0.2, **(SMALL | {"num_inference_steps": 5}))
    other = dataclasses.replace(schedule, model=unet_identity(_unet(svdlite.UNetConfig(
        model_channels=32, num_head_channels=16, context_dim=24, adm_in_channels=12))))
    with pytest.raises(ValueError, match="another model"):
        generate(EXAMPLE, model=tiny, f3_schedule=other, f3_ratio=0.2, **SMALL)
    with pytest.raises(ValueError, match="needs an f3_schedule"):
        generate(EXAMPLE, model=tiny, f3_ratio=0.2, **SMALL)
    with pytest.raises(ValueError, match="f3_ratio"):
        generate(EXAMPLE, model=tiny, f3_schedule=schedule, f3_ratio=1.0, **SMALL)
    with pytest.raises(ValueError, match="unknown f3_statistic"):
        generate(EXAMPLE, model=tiny, f3_schedule=schedule, f3_ratio=0.2, f3_statistic="entropy", **SMALL)
    with pytest.warns(UserWarning, match="height=64, this run uses 128"):
        generate(EXAMPLE, model=tiny, f3_schedule=schedule, f3_ratio=0.0, progress=False,
                 **(SMALL | {"height": 128, "num_inference_steps": 3}))
