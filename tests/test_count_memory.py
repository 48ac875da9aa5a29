"""tools/count_memory.py: the live-tensor tracker on hand-computed cases (exact bytes), the fused-attention model, the
counts at tiny size (fake CPU tensors against the same calls on real tensors, byte for byte), and the CLI."""
import json

import pytest
import torch
import torch.nn.functional as F

from helpers import load_tool

cm = load_tool("count_memory")
N = 64
MAT = N * N * 4  # one (N, N) float32 matrix


def chain(mark):
    """A matmul chain whose live bytes are counted by hand in the comments (one unit = one (N, N) fp32 matrix)."""
    a = torch.randn(N, N)      # 1
    mark()                     # peak restarts from 1 unit
    b = a @ a                  # 2
    del a                      # 1
    c = b @ b                  # 2
    d = c @ c                  # 3   <- the peak: b, c, d
    del b, c                   # 1
    d.add_(1.0)                # in place: no allocation
    torch.mul(d, 2.0, out=d)   # out=: no allocation
    e = d.view(-1)             # a view: no allocation
    f = d.t().contiguous()     # 2
    del e
    return f.sum()             # 2 units + a float32 scalar


@pytest.mark.parametrize("target", ["cpu-real", "cpu", "cuda"])
def test_matmul_chain_exact_bytes(target):
    tracker, inputs, result = cm.track(chain, target)
    unit = tracker.rounded(MAT)
    assert inputs == unit
    assert tracker.peak == 3 * unit
    assert sorted(a[1] for a in tracker.at_peak) == ["aten.mm.default"] * 3
    assert tracker.allocations == 6  # randn, 3 mm, clone for contiguous, sum
    # after the call the tracker still follows frees: the scalar alone (f died on return)
    assert tracker.current == tracker.rounded(4)
    del result
    assert tracker.current == 0
    if target == "cuda":  # meta tensors, rounded as the CUDA caching allocator rounds
        assert tracker.rounded(4) == 512 and unit == MAT


def test_peak_before_mark_is_not_counted_and_modules_label_allocations():
    layer = torch.nn.Linear(N, 2 * N)

    def fn(mark):
        big = torch.randn(8 * N, N)  # 8 units, dropped before the mark
        del big
        x = torch.randn(N, N)
        mark()
        return layer(x)

    tracker, inputs, _ = cm.track(fn, "cpu-real", {layer: "proj"})
    assert inputs == MAT and tracker.peak == 3 * MAT  # x + the (N, 2N) output
    assert ("proj", (N, 2 * N)) in {(a[2], a[3]) for a in tracker.at_peak}


def test_weights_are_counted_apart():
    layer = torch.nn.Linear(N, N)  # made before the tracker: never an allocation
    tracker, _, _ = cm.track(lambda mark: layer.weight.t().contiguous(), "cpu-real")
    assert tracker.peak == MAT
    assert cm.weight_bytes(layer) == MAT + N * 4


def test_fused_attention_model_keeps_no_attention_map():
    b, h, n, d = 2, 2, 256, 64
    out_bytes = b * h * n * d * 2

    def sdpa(dtype, transpose):
        def fn(mark):
            x = torch.randn(b, n, h * d, dtype=dtype).view(b, n, h, d).transpose(1, 2)  # layout as both UNets
            q = x.transpose(-1, -2).contiguous().transpose(-1, -2) if transpose else x  # last dim not contiguous
            mark()
            return F.scaled_dot_product_attention(q, q, q)
        return fn

    tracker, inputs, _ = cm.track(sdpa(torch.float16, False), "cuda")
    assert tracker.backends == {"flash": 1}
    # the output, flash's float32 row statistic (b*h*n*4 = 4 KiB) and its two small RNG-state tensors
    assert out_bytes <= tracker.peak - inputs <= out_bytes + 4096 + 2 * 512
    tracker, inputs, _ = cm.track(sdpa(torch.float32, False), "cuda")
    assert tracker.backends == {"efficient": 1}
    tracker, inputs, _ = cm.track(sdpa(torch.float16, True), "cuda")
    assert tracker.backends == {"math": 1}
    assert tracker.peak - inputs >= b * h * n * n * 2  # the math path materialises the (n, n) map


@pytest.fixture(scope="module")
def tiny():
    return {"frames": 3, "height": 64, "width": 128}


def test_tiny_counts_equal_real_tensors(tiny):
    """The fake-tensor count of the CPU path equals the tracker on the same calls with real tensors, byte for byte."""
    f, h, w = tiny["frames"], tiny["height"], tiny["width"]
    counted = cm.count_unet("svdlite", f, h, w, torch.float32, "tiny", "cpu", top=3)
    net = cm.build("svdlite", "unet", "tiny", torch.float32, "cpu-real", f)
    real, inputs, _ = cm.track(cm.unet_call("svdlite", net, f, h, w, torch.float32), "cpu-real")
    assert (counted["peak"], counted["inputs"]) == (real.peak, inputs)
    assert counted["weights"] == cm.weight_bytes(net)
    assert len(counted["at_peak"]) == 3 and counted["at_peak"][0]["bytes"] >= counted["at_peak"][1]["bytes"]
    dec = cm.count_decode("svdlite", f, h, w, 2, torch.float16, "tiny", "cpu")
    vae = cm.build("svdlite", "decoder", "tiny", torch.float32, "cpu-real")
    real, _, frames = cm.track(cm.decode_call("svdlite", vae, f, h, w, 2, torch.float32), "cpu-real")
    assert dec["peak"] == real.peak and dec["dtype"] == "float32"  # svdlite decodes in float32 whatever the dtype
    assert frames.shape == (f, 3, h, w)


def test_tiny_cuda_target_counts(tiny):
    f, h, w = tiny["frames"], tiny["height"], tiny["width"]
    guided = cm.count_unet("svdlite", f, h, w, torch.float16, "tiny")
    assert guided["attention"] == {"flash": 32}  # 16 spatial + 16 temporal self-attentions, one call each
    assert guided["weights"] == cm.weight_bytes(cm.build("svdlite", "unet", "tiny", torch.float16, "cpu-real"), 512)
    longer = cm.count_unet("svdlite", 2 * f, h, w, torch.float16, "tiny")
    assert guided["peak"] < longer["peak"] <= 2 * guided["peak"] + 512 * guided["allocations"]
    one, whole = (cm.count_decode("svdlite", f, h, w, c, torch.float16, "tiny") for c in (1, f))
    assert one["peak"] < whole["peak"]
    theirs = cm.count_unet("diffusers", f, h, w, torch.float16, "tiny")  # the same tracker on diffusers' UNet
    assert theirs["attention"] == {"flash": 64}  # its cross-attentions run too
    assert theirs["peak"] > 0 and theirs["weights"] > 0
    with pytest.raises(ValueError, match="multiples of 64"):
        cm.count_unet("svdlite", f, 72, w, torch.float16, "tiny")


def test_cli(tmp_path, capsys, monkeypatch, tiny):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        cm.main(["--help"])
    assert e.value.code == 0 and "--json" in capsys.readouterr().out
    size = f"{tiny['width']}x{tiny['height']}"
    args = ["--network", "tiny", "--size", size, "--frames", str(tiny["frames"]), "--dtype", "fp16", "--chunks", "1",
            "3", "--no-diffusers"]
    cm.main(args)
    out = capsys.readouterr().out
    assert "| 3 | 128x64 | float16 | svdlite |" in out and list(tmp_path.iterdir()) == []  # nothing written
    out_file = tmp_path / "memory.json"
    out_file.write_text("keep")
    with pytest.raises(SystemExit):  # refused before any counting
        cm.main(args + ["--json", str(out_file)])
    assert "exists" in capsys.readouterr().err and out_file.read_text() == "keep"
    cm.main(args + ["--json", str(out_file), "--force"])
    (row,) = json.loads(out_file.read_text())["rows"]
    unet = cm.count_unet("svdlite", tiny["frames"], tiny["height"], tiny["width"], torch.float16, "tiny")
    assert row["unet"]["peak"] == unet["peak"]
    assert row["total"]["3"] == row["weights_total"] + max(row["unet"]["peak"], row["decode"]["3"]["peak"],
                                                          row["encode"]["peak"])
    assert set(row["weights"]) == {"unet", "clip", "vae_encoder", "vae_decoder"}
    with pytest.raises(SystemExit):
        cm.main(["--size", "100x64", "--network", "tiny"])


def test_cuda_target_counts_the_memory_choices(tiny, monkeypatch):
    """The `cuda` target runs svdlite's GPU choices (`svdlite.kernels`): with the budgets shrunk to the tiny sizes,
    the feed-forward and norm chunks lower the UNet's counted peak, and the decoder runs in frame sub-batches (more
    allocations; the tiny decoder's peak is in its temporal layers, which hold the whole chunk either way)."""
    from svdlite import kernels

    f, h, w = tiny["frames"], tiny["height"], tiny["width"]
    plain = {"unet": cm.count_unet("svdlite", f, h, w, torch.float16, "tiny"),
             "decode": cm.count_decode("svdlite", f, h, w, f, torch.float16, "tiny")}
    monkeypatch.setattr(kernels, "FF_MEMORY_BYTES", 64 * 1024)
    monkeypatch.setattr(kernels, "NORM_MEMORY_BYTES", 16 * 1024)
    monkeypatch.setattr(kernels, "DECODE_MEMORY_BYTES", 1)
    assert cm.count_unet("svdlite", f, h, w, torch.float16, "tiny")["peak"] < plain["unet"]["peak"]
    sliced = cm.count_decode("svdlite", f, h, w, f, torch.float16, "tiny")
    assert sliced["peak"] <= plain["decode"]["peak"] and sliced["allocations"] > plain["decode"]["allocations"]
