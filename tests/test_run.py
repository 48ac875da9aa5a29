"""RunSpec: every model-free check when it is made, the model-aware ones once in resolve(); generate, calibrate_f3
and run_batch give the same videos from a spec as from the same keywords."""
import pytest
import torch

from svdlite import RunSpec, calibrate_f3, generate, load_model
from svdlite.batch import run_batch
from svdlite.plan import DEFAULT_CACHE_DEPTH

SMALL = dict(num_frames=3, num_inference_steps=2, height=64, width=64)
IMAGE = "svdlite/assets/example.png"


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("options, message", [
    ({"num_frames": 0}, "num_frames must be a positive int"),
    ({"cache_interval": 2, "cache_depth": 12}, "cache_depth must be below 12"),
    ({"f3_ratio": 0.2}, "needs an f3_schedule"),
    ({"speed": "fastest"}, "unknown speed"),
    ({"schedule": "ays", "sigmas": [2.0, 1.0, 0.0]}, "either sigmas or schedule"),
    ({"num_inference_steps": 3, "sigmas": [2.0, 1.0, 0.0]}, "disagrees with the 2 steps of sigmas"),
    ({"f3_schedule": "missing.json"}, "missing.json not found"),
    ({"guidance_cut_step": 5, "num_inference_steps": 4}, r"guidance_cut_step must be in \[0, 4\]"),
])
def test_bad_runs_are_refused_when_the_spec_is_made(options, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        RunSpec(**options)


def test_unknown_keyword_is_named():
    with pytest.raises(TypeError, match="colour"):
        RunSpec.from_options(colour="red")


def test_resolve_fills_the_preset_and_builds_the_plan(tiny):
    run = RunSpec(num_frames=3, cache_interval=2, speed="fast").resolve(tiny)
    assert run.settings.num_frames == 3 and run.settings.height == tiny.sampling.height
    assert run.schedule_name == "ays" and run.plan.num_steps == 10 == len(run.sigmas) - 1  # the fast level's
    assert run.plan.cache_depth == DEFAULT_CACHE_DEPTH and [s.cache for s in run.plan.steps[:2]] == ["refresh", "reuse"]
    with pytest.raises(ValueError, match="multiple of 64"):
        RunSpec(height=96).resolve(tiny)


def test_spec_and_keywords_give_the_same_video(tiny, tmp_path):
    options = SMALL | {"guidance_cut_step": 1, "cache_interval": 2}
    by_keywords = generate(IMAGE, model=tiny, seed=4, progress=False, **options)
    by_spec = generate(IMAGE, model=tiny, seed=4, progress=False, spec=RunSpec(**options))
    assert torch.equal(by_keywords.latents, by_spec.latents)
    with pytest.raises(ValueError, match="either in spec or as keywords"):
        generate(IMAGE, model=tiny, spec=RunSpec(**options), num_frames=3)
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(open(IMAGE, "rb").read())
    one = run_batch([folder], tmp_path / "one", model=tiny, seed=1, progress=False, **options)["records"]
    two = run_batch([folder], tmp_path / "two", model=tiny, seed=1, progress=False, spec=RunSpec(**options))["records"]
    assert one[0]["frames_sha256"] == two[0]["frames_sha256"] and one[0]["settings"] == two[0]["settings"]


def test_calibration_refuses_approximate_options(tiny):
    with pytest.raises(ValueError, match="calibration runs the exact computation"):
        calibrate_f3([IMAGE], model=tiny, spec=RunSpec(cache_interval=2, **SMALL), progress=False)
    exact = calibrate_f3([IMAGE], model=tiny, seed=0, spec=RunSpec(**SMALL), progress=False)
    keywords = calibrate_f3([IMAGE], model=tiny, seed=0, progress=False, **SMALL)
    assert exact.stats == keywords.stats and exact.settings["num_inference_steps"] == 2


def test_record_is_json_ready(tmp_path, tiny):
    schedule = calibrate_f3([IMAGE], model=tiny, seed=0, progress=False, **SMALL)
    path = schedule.save(tmp_path / "f3.json")
    record = RunSpec(f3_schedule=path, f3_ratio=0.2, sigmas=(3.0, 1.0, 0.0)).record()
    assert record["f3_schedule"] == str(path) and record["sigmas"] == [3.0, 1.0, 0.0] and record["f3_ratio"] == 0.2
