"""tools/count_macs.py --speed, every row, against an independent count of what `generate` really runs.

The reference here shares nothing with count_macs's accounting: SVD's full-size networks are built on the meta
device, the real `svdlite.generate` runs on them (the plan, the sampler, the guidance, the step cache, the VAE and
CLIP calls all as in a real run), and a dispatch mode of this file counts the multiply-accumulates of every
product op that runs (mm, addmm, bmm, baddbmm, convolution; any other product-like op is refused), attributed to
the component that was running. count_macs's rows must equal these counts exactly (integers, no tolerance).

Also here: the block-by-block reference tests' recorder (`svdlite.testing.block_outputs`) keeps what a module returned,
even when a later op writes into that tensor in place.
"""
import contextlib
import functools
import io
import json
import re
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import svdlite
from svdlite import checks
from svdlite.clip import CLIPVisionConfig, build_image_encoder
from svdlite.components import SVDModel
from svdlite.presets import PRESETS, Preset, SamplingConfig
from svdlite.unet import UNetConfig, VideoUNet
from svdlite.vae import ConditionEncoder, VAEConfig, VideoDecoder

from svdlite.testing import block_outputs
from helpers import load_tool

FRAMES, STEPS, HEIGHT, WIDTH = 2, 2, 64, 64
CACHE = (2, 1)  # an extra step-caching row (interval 2, depth 1): a reusing step with a deeper branch than --speed's
ARGS = ["--speed", "--frames", str(FRAMES), "--steps", str(STEPS), "--height", str(HEIGHT), "--width", str(WIDTH),
        "--cache", str(CACHE[0]), str(CACHE[1])]
PRESET = "meta-count-test"  # svd-xt's guidance, with the counted setting as its defaults
aten = torch.ops.aten
PRODUCT_LIKE = re.compile(r"mm|conv|matmul|linear|einsum|dot|attention|addmv|\bmv\b|addr|bilinear|tensordot")


class MacCounter(TorchDispatchMode):
    """MACs of every product op, added to the innermost running component (a stack set by module hooks).

    mm/addmm (n,k)@(k,m): n*k*m; bmm/baddbmm (B,n,k)@(B,k,m): B*n*k*m; convolution: each output element (each input
    element for a transposed one) costs in_channels/groups * kernel size, i.e. weight[0].numel(). A meta tensor
    copied to the CPU (generate's final .cpu()) becomes zeros: no data, only shapes, exist here."""

    def __init__(self):
        super().__init__()
        self.stack, self.macs = ["outside"], {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is aten._to_copy.default and args[0].is_meta
                and torch.device(kwargs.get("device") or "meta").type == "cpu"):
            return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        out = func(*args, **kwargs)
        op = func._overloadpacket
        if op in (aten.mm, aten.bmm):
            macs = args[0].numel() * args[1].shape[-1]
        elif op in (aten.addmm, aten.baddbmm):
            macs = args[1].numel() * args[2].shape[-1]
        elif op is aten.convolution:
            transposed = args[6]
            macs = (args[0] if transposed else out).numel() * args[1][0].numel()
        else:
            assert not PRODUCT_LIKE.search(str(op)), f"{op} is a product this counter does not count"
            return out
        self.macs[self.stack[-1]] = self.macs.get(self.stack[-1], 0) + macs
        return out


@functools.cache
def image_encoder() -> torch.nn.Module:
    """CLIP's ViT-H/14 on the meta device, built once (the slow one to build) for every model of this file."""
    with torch.device("meta"):
        return build_image_encoder(CLIPVisionConfig()).eval()


def meta_model(fold) -> SVDModel:
    """SVD's full-size networks on the meta device (as count_macs documents: UNetConfig(), VAEConfig(),
    CLIPVisionConfig() defaults; the UNet as svdlite's own files hold it)."""
    vae = VAEConfig()
    with torch.device("meta"):
        return SVDModel(VideoUNet(UNetConfig(), fold_cross_attention=fold).eval(), ConditionEncoder(vae).eval(),
                        VideoDecoder(vae).eval(), image_encoder(), vae, CLIPVisionConfig(), PRESET, "meta")


def params(module) -> int:
    return sum(p.numel() for p in module.parameters())


class Recorder:
    """Runs `generate` on a meta model under a MacCounter: per UNet call (rows, MACs), the context vectors' MACs
    (the UNet's `context_vectors`, outside its forward) and the VAE encoder / decoder and CLIP totals."""

    def __init__(self, model: SVDModel):
        self.model, self.counter = model, MacCounter()
        self.unet_calls: list[tuple[int, int]] = []

    def _enter(self, name):
        self.counter.stack.append(name)
        if name == "unet":
            self.counter.macs["unet"] = 0

    def _leave(self, name, args):
        assert self.counter.stack.pop() == name
        if name == "unet":
            self.unet_calls.append((args[0].shape[0], self.counter.macs.pop("unet")))

    def run(self, **options) -> dict:
        model, hooks = self.model, []
        components = {"unet": model.unet, "vae-encoder": model.vae_encoder, "vae-decoder": model.vae_decoder,
                      "clip": model.image_encoder}
        for name, module in components.items():
            hooks.append(module.register_forward_pre_hook(lambda m, args, name=name: self._enter(name)))
            hooks.append(module.register_forward_hook(lambda m, args, out, name=name: self._leave(name, args)))
        vectors = type(model.unet).context_vectors

        def context_vectors(*args, **kwargs):
            self._enter("setup")
            try:
                return vectors(model.unet, *args, **kwargs)
            finally:
                self._leave("setup", None)

        model.unet.context_vectors = context_vectors  # the instance's, for this run
        self.unet_calls, self.counter.macs = [], {}
        try:
            with self.counter:
                video = svdlite.generate(torch.rand(3, HEIGHT, WIDTH), model=model, seed=0, progress=False,
                                         **options)
        finally:
            del model.unet.context_vectors
            for hook in hooks:
                hook.remove()
        assert len(video) == FRAMES and (video.height, video.width) == (HEIGHT, WIDTH)
        macs = dict(self.counter.macs)
        assert macs.pop("outside", 0) == 0, "a product ran outside the components"
        return {"calls": list(self.unet_calls), "setup": macs.pop("setup", 0), **macs}


@pytest.fixture(scope="module")
def counted():
    """{(fold, options as a sorted tuple): Recorder.run(...)}, filled on demand; generate sees the test preset."""
    mp = pytest.MonkeyPatch()
    mp.setitem(PRESETS, PRESET, Preset(PRESET, "", "", SamplingConfig(
        num_frames=FRAMES, num_inference_steps=STEPS, min_guidance_scale=1.5, max_guidance_scale=3.0,
        decode_chunk_size=14, height=HEIGHT, width=WIDTH)))
    # meta tensors hold no values to check: the finiteness check is off, wherever svdlite's modules hold it
    original = checks.check_finite
    for module in [m for name, m in sys.modules.items() if name == "svdlite" or name.startswith("svdlite.")]:
        if getattr(module, "check_finite", None) is original:
            mp.setattr(module, "check_finite", lambda *args, **kwargs: None)
    recorders, results = {}, {}

    def run(fold=True, **options):
        options.setdefault("speed", "exact")  # generate's default: the key of a plain run and of "speed exact"
        key = (fold, tuple(sorted(options.items())))
        if key not in results:
            if fold not in recorders:
                recorders[fold] = Recorder(meta_model(fold))
            results[key] = recorders[fold].run(**options)
        return results[key]

    run.recorders = recorders
    yield run
    mp.undo()


@pytest.fixture(scope="module")
def rows():
    """(the rows `count_macs.py ARGS` prints, as --json would print them, and the table it prints), in-process:
    one count, the rows taken where main hands them to print_table."""
    cm = load_tool("count_macs")
    handed, print_table = [], cm.print_table
    cm.print_table = lambda rows, *args: (handed.append(json.loads(json.dumps(rows))), print_table(rows, *args))
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        cm.main(ARGS)
    assert len(handed) == 1
    return handed[0], buffer.getvalue()


def check_unet_row(row, run, counted, fold):
    guided = [macs for n, macs in run["calls"] if n == 2 * FRAMES]
    conditional = [macs for n, macs in run["calls"] if n == FRAMES]
    assert len(guided) + len(conditional) == len(run["calls"]), run["calls"]
    assert row["macs_per_video"] == sum(m for _, m in run["calls"]) + run["setup"]
    assert row["macs_setup_per_video"] == run["setup"]
    assert (row["guided_evals"], row["conditional_evals"]) == (len(guided), len(conditional))
    assert row["steps"] == len(run["calls"])
    if "macs_per_step" in row:
        assert row["macs_per_step"] == [m for _, m in run["calls"]]
    # one full call on the guided batch, and one on the conditional half (a run cut at step 0)
    full_guided = counted(fold)["calls"][:1]  # the exact run: every call the guided batch
    full_conditional = counted(fold, num_inference_steps=1, guidance_cut_step=0)["calls"]
    assert [n for n, _ in full_guided] == [2 * FRAMES] and [n for n, _ in full_conditional] == [FRAMES]
    assert row["macs_per_eval"] == full_guided[0][1] and row["macs_per_eval_frames"] == full_conditional[0][1]
    assert row["params"] == params(counted.recorders[fold].model.unet)


def test_every_row_equals_the_count_of_what_generate_runs(rows, counted):
    out, table = rows
    folds = {"original": False, "vcut-temporal": "temporal", "vcut": True}
    seen = set()
    for row in out:
        mode = row["mode"]
        seen.add(mode)
        assert (row["frames"], row["height"], row["width"]) == (FRAMES, HEIGHT, WIDTH), mode
        if mode in folds:
            check_unet_row(row, counted(folds[mode]), counted, folds[mode])
            assert row["steps"] == STEPS
        elif (cut := re.fullmatch(r"vcut\+guidance-cut@(\d+)", mode)) is not None:
            run = counted(True, guidance_cut_step=int(cut[1]))
            check_unet_row(row, run, counted, True)
            assert row["guided_evals"] == int(cut[1])  # a cut at K: K guided steps
        elif (level := re.fullmatch(r"speed (\w+)", mode)) is not None:
            check_unet_row(row, counted(True, speed=level[1]), counted, True)  # the level's own steps if it sets them
        elif mode == f"vcut+cache@{CACHE[0]}/{CACHE[1]}":
            run = counted(True, cache_interval=CACHE[0], cache_depth=CACHE[1])
            check_unet_row(row, run, counted, True)
            full = counted(True)["calls"][0][1]
            assert row["reuse_steps"] == sum(m < full for _, m in run["calls"]) > 0
        elif mode in ("vae-encoder", "vae-decoder", "clip"):
            run = counted(True)
            assert row["macs_per_video"] == row["macs_per_eval"] == run[mode] > 0, mode
            module = {"vae-encoder": "vae_encoder", "vae-decoder": "vae_decoder", "clip": "image_encoder"}[mode]
            assert row["params"] == params(getattr(counted.recorders[True].model, module))
            for other in (counted(False), counted(True, speed="fast")):  # every run encodes and decodes alike
                assert other[mode] == run[mode]
        else:
            pytest.fail(f"row {mode!r}: no independent count for it in this test")
    assert {"original", "vcut-temporal", "vcut", "speed exact", "speed balanced", "speed fast",
            "vae-encoder", "vae-decoder", "clip"} <= seen
    assert any(m.startswith("vcut+guidance-cut@") for m in seen)
    # the fast level ran its own 10 steps; a guided call costs twice a conditional-only one
    assert len(counted(True, speed="fast")["calls"]) == 10
    by_mode = {r["mode"]: r for r in out}
    assert by_mode["vcut"]["macs_per_eval"] == 2 * by_mode["vcut"]["macs_per_eval_frames"]
    assert by_mode["speed exact"]["macs_per_video"] == by_mode["vcut"]["macs_per_video"]
    # the printed table shows every row, each with its per-video MACs (T = 1e12, 2 decimals)
    lines = table.splitlines()
    for row in out:
        line = next((text for text in lines if text.startswith(f"{row['mode']:<30}")), None)
        assert line is not None, f"row {row['mode']} not printed"
        assert f"{row['macs_per_video'] / 1e12:,.2f}" in line.split()


def test_counter_counts_products_exactly():
    """The counter's own formulas on known shapes (so the comparison above rests on a checked reference)."""
    counter = MacCounter()
    with torch.device("meta"):
        a, b, c = torch.randn(5, 7), torch.randn(7, 3), torch.randn(2, 5, 7)
        conv, convt, linear = (torch.nn.Conv2d(6, 8, 3, padding=1, groups=2), torch.nn.ConvTranspose2d(4, 6, 2, 2),
                               torch.nn.Linear(7, 3))
        img, img4 = torch.randn(1, 6, 10, 12), torch.randn(1, 4, 5, 5)
    with counter:
        a @ b
        c @ b
        linear(a)
        conv(img)
        convt(img4)
    expected = 5 * 7 * 3 + 2 * 5 * 7 * 3 + 5 * 7 * 3 + (8 * 10 * 12) * (3 * 3 * 3) + (4 * 5 * 5) * (6 * 2 * 2)
    assert counter.macs == {"outside": expected}


def test_block_outputs_keeps_what_the_module_returned():
    """A module whose output the next op changes in place (SiLU(inplace=True) after a norm, as the VAE decoder's
    norm_out): the recorded tensor is the norm's output, not the activation's."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.GroupNorm(2, 4), torch.nn.SiLU(inplace=True), torch.nn.Identity())
    x = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        expected_norm = torch.nn.functional.group_norm(x, 2, net[0].weight, net[0].bias, net[0].eps)
    got = block_outputs(net, ["0.out", "1.out"], lambda: net(x))
    torch.testing.assert_close(got["0.out"], expected_norm, rtol=0, atol=0)
    assert got["0.out"].min() < -0.5  # the norm's negatives, which SiLU would have raised to >= -0.28
    torch.testing.assert_close(got["1.out"], torch.nn.functional.silu(expected_norm), rtol=0, atol=0)
    assert got["0.out"].data_ptr() != got["1.out"].data_ptr()


def test_block_outputs_copies_each_tensor_of_a_tuple():
    class Pair(torch.nn.Module):
        def forward(self, x):
            return x * 2, x * 3

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()

        def forward(self, x):
            a, b = self.pair(x)
            return a.zero_(), b.fill_(7.0)

    net, x = Net(), torch.ones(3)
    got = block_outputs(net, ["pair.out"], lambda: net(x))
    assert isinstance(got["pair.out"], tuple) and len(got["pair.out"]) == 2
    assert got["pair.out"][0].tolist() == [2.0] * 3 and got["pair.out"][1].tolist() == [3.0] * 3
