"""tools/gpu_check.py, the GPU check, run the CPU way (`--device cpu --quick`: tiny width, small sizes) in this
process, so that the code the GPU runs cannot rot between GPU runs: the JSON's structure, every part run, the
fidelity numbers within the tests' tolerances, the half-precision numbers within the tool's bounds, a failing part
recorded without stopping the others, the time budget, and the refusals.
"""
import json
import math

import pytest

from helpers import load_tool

QUICK_PARTS = ["fidelity", "half", "speed_unet", "speed_generate", "memory", "levels"]


def exit_code(tool, argv) -> int:
    try:
        return tool.main(argv)
    except SystemExit as stop:
        return stop.code


@pytest.fixture(scope="module")
def tool():
    return load_tool("gpu_check")


@pytest.fixture(scope="module")
def quick(tool, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "quick.json"
    rc = tool.main(["--device", "cpu", "--quick", "--json", str(out)])
    return rc, json.loads(out.read_text())


def test_quick_run_passes_and_runs_every_part_but_compile(quick):
    rc, r = quick
    assert rc == 0 and r["passed"] is True
    assert list(r["parts"]) == QUICK_PARTS == r["parts_asked"]
    for name, part in r["parts"].items():
        assert part["status"] == "ok", (name, part.get("error"), part.get("traceback"))
        assert part["seconds"] > 0 and isinstance(part["result"], dict)
    assert r["device"] == "cpu" and r["quick"] is True and r["width"] == "tiny"
    assert r["machine"]["torch"] and r["machine"]["diffusers"] and r["machine"]["svdlite"]
    assert r["setup"]["params"]["unet"] > 0 and r["setup"]["folder_bytes"] > 0
    assert r["checks"] and all(c["passed"] for c in r["checks"])
    assert 0 < r["total_seconds"] and r["budget_s"] == 480


def test_fidelity_numbers_are_within_the_tests_tolerances(quick, tool):
    _, r = quick
    f = r["parts"]["fidelity"]["result"]
    rows = {row["name"].split(" (")[0]: row for row in f["reference"]}
    expected = {"unet main out", "unet varctx out", "unet ioi out", "unet main out, context vectors precomputed",
                "unet blocks", "vae decoder 1 video out", "vae decoder 2 videos out", "vae decoder blocks",
                "vae encoder moments", "vae encoder mode", "vae encoder moments_quant_conv",
                "vae encoder mode_quant_conv", "sampling final latent", "sampling decoded video"}
    assert expected <= set(rows)
    assert any(name.startswith("sampling every step's net_out") for name in rows)
    assert len(f["reference"]) == 18
    for row in f["reference"]:
        assert row["passed"] and row["finite"], row
        if row["kind"] == "close":  # torch.testing.assert_close(atol=rtol=1e-4) passes exactly when this is <= 1
            assert row["limit"] == 1.0 and 0 <= row["value"] <= 1.0, row
        else:
            assert row["limit"] == tool.REF_REL == 1e-4 and 0 <= row["value"] < 1e-4, row
        assert row["rel_err"] < 1e-4, row
    d = f["reference_unet_main_with_torch_default_tf32"]  # on the CPU torch's defaults are plain float32
    assert 0 <= d["close_ratio"] <= 1.0 and d["rel_err"] < 1e-4
    e = f["unet_eval_device_vs_cpu"]
    assert e["same_device"] is True and e["finite"] is True
    assert 0 <= e["rel_err"] <= e["limit_rel_err"] == tool.CPU_DEVICE_REL
    assert e["batch"] == 2 * e["frames"] and e["output_max_abs"] > 0


def test_half_precision_numbers(quick, tool):
    _, r = quick
    h = r["parts"]["half"]["result"]
    for name in ("float16", "bfloat16"):
        limits = tool.HALF_LIMITS[name]
        ev, gen = h["eval"][name], h["generate"][name]
        assert ev["finite"] and gen["latents_finite"]
        assert 0 < ev["rel_l2"] <= limits["eval_rel_l2"]  # not zero: the dtype really changed the arithmetic
        assert 0 < gen["latents_rel_l2"] <= limits["latents_rel_l2"]
        psnr = gen["frames_psnr_db"]
        assert psnr == "inf" or psnr >= limits["frames_psnr_db"]
    # bfloat16 keeps fewer bits than float16: its error is the larger
    assert h["eval"]["bfloat16"]["rel_l2"] > h["eval"]["float16"]["rel_l2"]
    assert set(h["generate"]["seconds"]) == {"float32", "float16", "bfloat16"}


def test_speed_memory_and_levels_report_measured_numbers(quick):
    _, r = quick
    s = r["parts"]["speed_unet"]["result"]
    assert s["dtype"] == "float32" and s["batch"] == 2 * s["frames"]
    for side in ("svdlite", "diffusers"):
        st = s["seconds"][side]
        assert st["n"] == s["rounds"] and 0 < st["min"] <= st["median"] <= st["max"]
        assert s["macs"][side] > 0 and s[f"{side}_tflops"] > 0 and s[f"{side}_fraction_of_peak"] > 0
    assert s["macs"]["diffusers"] > s["macs"]["svdlite"]  # the original cross-attention at every call
    assert s["peak_matmul"]["float32"]["tflops"] > 0 and "measured in this run" in s["peak_note"]
    assert s["agreement"]["finite"] and s["agreement"]["rel_err"] < 1e-3  # same weights, float32
    g = r["parts"]["speed_generate"]["result"]
    assert set(g["seconds"]) == {"svdlite", "diffusers"} and g["agreement"]["finite"]
    assert g["agreement"]["latents_rel_err"] < 5e-3
    m = r["parts"]["memory"]["result"]
    assert m["measured"] is False and m["unet_eval"]["svdlite"]["memory"] is None  # no CUDA allocator on the CPU
    assert m["generate_default"]["svdlite"]["weights_bytes"] > 0 and m["generate_default"]["diffusers"]["seconds"] > 0
    lv = r["parts"]["levels"]["result"]
    assert lv["steps"] == {"exact": 30, "balanced": 30, "fast": 10}
    assert all(v > 0 for v in lv["seconds"].values()) and math.isclose(lv["speedup_vs_exact"]["exact"], 1.0)


def test_a_failing_part_is_recorded_and_the_others_still_run(tool, tmp_path, monkeypatch, capsys):
    def broken(ctx):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(tool, "part_fidelity", broken)
    out = tmp_path / "r.json"
    assert tool.main(["--device", "cpu", "--quick", "--parts", "speed_unet,fidelity", "--json", str(out)]) == 1
    r = json.loads(out.read_text())
    assert list(r["parts"]) == ["fidelity", "speed_unet"]  # the tool's order, most valuable first
    assert r["parts"]["fidelity"]["status"] == "failed" and "planted failure" in r["parts"]["fidelity"]["error"]
    assert "RuntimeError: planted failure" in r["parts"]["fidelity"]["traceback"]
    assert r["parts"]["speed_unet"]["status"] == "ok" and r["passed"] is False
    assert "fidelity        failed" in capsys.readouterr().out


def test_parts_past_the_budget_are_skipped(tool, tmp_path):
    out = tmp_path / "r.json"
    assert tool.main(["--device", "cpu", "--parts", "fidelity,half", "--budget-s", "0", "--json", str(out)]) == 1
    r = json.loads(out.read_text())
    assert {p["status"] for p in r["parts"].values()} == {"skipped"}
    assert all(p["error"].startswith("budget:") for p in r["parts"].values())
    assert "params" not in r["setup"]  # nothing was built


def test_refusals(tool, tmp_path, capsys):
    assert exit_code(tool, ["--device", "cpu", "--parts", "fidelity,nonsense"]) == 2
    existing = tmp_path / "r.json"
    existing.write_text("kept")
    assert exit_code(tool, ["--device", "cpu", "--quick", "--json", str(existing)]) == 2
    assert existing.read_text() == "kept"
    assert exit_code(tool, ["--device", "tpu"]) == 2
    capsys.readouterr()
