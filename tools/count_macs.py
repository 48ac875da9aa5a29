#!/usr/bin/env python3
"""Parameters and multiply-accumulates (MACs) of SVD's FULL-SIZE networks, counted on the meta device.

    python tools/count_macs.py [--preset P] [--frames N] [--steps N] [--height H] [--width W] [--cut-steps K ...]
                               [--f3-schedule S --f3-ratio R ...] [--cache N D] [--speed] [--json] [--ops]

Nothing real is allocated: every module is built under `torch.device("meta")` and run on meta tensors inside
`torch.utils.flop_counter.FlopCounterMode`; MACs = FLOPs / 2. The networks are always SVD's (UNetConfig(),
VAEConfig(), CLIPVisionConfig() defaults); `--preset` only supplies the default frames, steps and size.

What is counted: every product of a matrix multiply or convolution (aten mm, addmm, bmm, baddbmm, convolution),
including the attention scores q k^T and the values softmax(.) v: on the meta device
`scaled_dot_product_attention` decomposes into bmm, and a recording mode below the counter checks that every op
that ran either has a FLOP formula or is not a product (elementwise, normalisation, softmax, data movement, which
are not MACs by the usual convention). `--ops` lists them.

Modes (UNet):
  original                 the reference computation, every cross-attention run at every call (fold=False)
  vcut-temporal            the VCUT paper's variant: temporal cross-attention folded, spatial original
  vcut                     svdlite's default: both folded (exact)
  vcut+guidance-cut@K      vcut, and from step K on only the conditional branch runs (approximate)
  vcut+f3@R                F3-Pruning: the lowest-ranked ratio R of a schedule's (step, temporal block) units skipped
  vcut+cache@N/D           step caching: every N-th step full, the others run input_blocks 0..D and the last D+1
                           output blocks on cached deep features
  speed LEVEL              the plan of `generate(speed=LEVEL)` (its own step count where the level sets one)
Every approximate row's plan is generate's: the row's options as an `svdlite.run.RunSpec`, resolved against SVD's
network on the meta device with the counted frames, steps and size as its defaults (`plan_of`); its work is
counted step by step from the per-module MACs of one exact forward (what a step runs is a set of modules). An F3
schedule counts by its ranking only, so one calibrated at any frame count, size or model counts here; its step
count must be the counted one.
Per video = the UNet evaluations only (steps with classifier-free guidance run one call on the doubled batch of
2*frames; after a guidance cut, one call on `frames`), plus the folded context vectors computed once per video as
`svdlite.denoiser.make_denoiser` does. The VAE encoder (+ quant_conv, one image), the temporal VAE decoder (all
frames; decoding in chunks costs the same MACs) and the CLIP image encoder (one image at 224) are separate rows.
"""
import argparse
import dataclasses
import functools
import json
import re
import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from svdlite.clip import CLIPVisionConfig, build_image_encoder
from svdlite.f3 import F3Schedule
from svdlite.plan import SPEED_LEVELS, Plan
from svdlite.presets import PRESETS, SamplingConfig
from svdlite.run import RunSpec, noise_schedule
from svdlite.unet import UNetConfig, VideoUNet
from svdlite.vae import ConditionEncoder, VAEConfig, VideoDecoder

META = torch.device("meta")
UNET_MODES = {"original": False, "vcut-temporal": "temporal", "vcut": True}  # mode -> fold_cross_attention
CUT_PREFIX = "vcut+guidance-cut@"

# The paper's claims (VCUT, docs/papers.md), all for a 25-frame video (SVD-XT; 25 steps assumed).
CLAIM_PARAMS = 50_000_000
CLAIM_MACS = 322e12
CLAIM_LATENCY = 0.20
CLAIM_FRAMES, CLAIM_STEPS = 25, 25

# An op name that looks like a product; such an op must have a FLOP formula, else the count is refused.
_PRODUCT = re.compile(r"mm|conv|attention|einsum|matmul|linear|dot|^aten\.mv$|addmv|addr|bilinear")
OPS_SEEN: dict[str, Counter] = {}  # component -> Counter of "op (counted)" / "op" over every count run


class _OpRecorder(TorchDispatchMode):
    """Entered before FlopCounterMode, so it sits below it and sees the ops that actually run (after the
    counter's decompositions)."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func._overloadpacket] += 1
        return func(*args, **(kwargs or {}))


def count_call(component: str, fn, per_module: dict | None = None) -> int:
    """MACs of fn() on meta tensors; refuses if a product-like op ran without a FLOP formula.

    per_module: a dict to fill with {module path (no root class name): MACs} of every module that ran."""
    recorder = _OpRecorder()
    with torch.no_grad(), recorder, FlopCounterMode(display=False) as counter:
        fn()
    uncounted = sorted(str(op) for op in recorder.ops if op not in flop_registry)
    missed = [op for op in uncounted if _PRODUCT.search(op)]
    if missed:
        raise RuntimeError(f"{component}: product ops ran without a FLOP formula (their MACs would be lost): {missed}")
    seen = OPS_SEEN.setdefault(component, Counter())
    for op, n in recorder.ops.items():
        seen[f"{op}{' (counted)' if op in flop_registry else ''}"] += n
    flops = counter.get_total_flops()
    if flops % 2:
        raise AssertionError(f"{component}: odd FLOP count {flops}")
    if per_module is not None:
        for name, ops in counter.get_flop_counts().items():
            if name != "Global":
                per_module[name.partition(".")[2]] = sum(ops.values()) // 2
    return flops // 2


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@functools.lru_cache(maxsize=None)
def unet(fold) -> VideoUNet:
    with META:
        return VideoUNet(UNetConfig(), fold_cross_attention=fold).eval()


@functools.lru_cache(maxsize=None)
def unet_eval_macs(mode: str, batch_frames: int, num_frames: int, height: int, width: int) -> tuple[int, int]:
    """(MACs of one UNet forward on batch_frames = b*num_frames frames, MACs of its context vectors)."""
    net = unet(UNET_MODES[mode])
    h, w = height // 8, width // 8
    with META:
        x = torch.randn(batch_frames, net.config.in_channels, h, w)
        timesteps = torch.randn(batch_frames)
        context = torch.randn(batch_frames, 1, net.config.context_dim)
        y = torch.randn(batch_frames, net.config.adm_in_channels)
    vectors = {}
    setup = count_call("unet", lambda: vectors.update(net.context_vectors(context, num_frames)))
    forward = count_call("unet", lambda: net(x, timesteps, None, y, num_frames, context_vectors=vectors))
    return forward, setup


@functools.lru_cache(maxsize=None)
def unet_module_macs(batch_frames: int, num_frames: int, height: int, width: int) -> dict[str, int]:
    """{module path: MACs} of one exact (vcut) UNet forward on batch_frames rows; "" is the whole forward. Every
    plan step's work is read from this: what runs at a step is a set of these modules (products are additive)."""
    net = unet(True)
    with META:
        x = torch.randn(batch_frames, net.config.in_channels, height // 8, width // 8)
        timesteps, y = torch.randn(batch_frames), torch.randn(batch_frames, net.config.adm_in_channels)
        context = torch.randn(batch_frames, 1, net.config.context_dim)
    vectors = net.context_vectors(context, num_frames)
    macs: dict[str, int] = {}
    macs[""] = count_call("unet", lambda: net(x, timesteps, None, y, num_frames, context_vectors=vectors), macs)
    return macs


def step_macs(step, cache_depth: int | None, frames: int, height: int, width: int) -> int:
    """MACs of the UNet call one plan step makes (svdlite.plan.Step): the guided batch or the conditional half;
    a "reuse" step runs only time_embed, label_emb, input_blocks 0..D, the last D + 1 output blocks and `out`;
    a skipped temporal unit does not run its block, nor its transformer's frame embedding when no unit there runs."""
    m = unet_module_macs(2 * frames if step.guided else frames, frames, height, width)
    net = unet(True)
    n = len(net.output_blocks)
    if step.cache == "reuse":
        running = (["time_embed", "label_emb"] + [f"input_blocks.{i}" for i in range(cache_depth + 1)]
                   + [f"output_blocks.{i}" for i in range(n - 1 - cache_depth, n)] + ["out"])
    else:
        running = [""]
    total = sum(m.get(name, 0) for name in running)
    runs = lambda path: any(r == "" or path == r or path.startswith(r + ".") for r in running)  # noqa: E731
    for svt in {u.rsplit(".time_stack.", 1)[0] for u in step.skip_temporal}:
        units = [u for u in net.temporal_units() if u.startswith(svt + ".time_stack.")]
        skipped = [u for u in units if u in step.skip_temporal]
        if runs(svt):
            total -= sum(m[u] for u in skipped) + (m[svt + ".time_pos_embed"] if len(skipped) == len(units) else 0)
    return total


def plan_row(name: str, plan, frames: int, height: int, width: int) -> dict:
    """A UNet row for a whole plan (svdlite.plan.Plan) of svdlite's network: every step's call plus the folded
    context vectors, computed once per video on the guided batch as `make_denoiser` does."""
    _, setup = unet_eval_macs("vcut", 2 * frames, frames, height, width)
    per_step = [step_macs(s, plan.cache_depth, frames, height, width) for s in plan.steps]
    guided = sum(s.guided for s in plan.steps)
    return {"mode": name, "component": "unet", "params": n_params(unet(True)),
            "macs_per_eval": unet_eval_macs("vcut", 2 * frames, frames, height, width)[0],
            "macs_per_eval_frames": unet_eval_macs("vcut", frames, frames, height, width)[0],
            "macs_setup_per_video": setup, "guided_evals": guided, "conditional_evals": plan.num_steps - guided,
            "macs_per_step": per_step, "macs_per_video": sum(per_step) + setup,
            "skipped_temporal_units": sum(len(s.skip_temporal) for s in plan.steps),
            "reuse_steps": sum(s.cache == "reuse" for s in plan.steps),
            "frames": frames, "steps": plan.num_steps, "height": height, "width": width}


def temporal_attn2_params() -> int:
    """Parameters of the 16 temporal cross-attentions of the original network: what the paper removes."""
    return sum(p.numel() for name, p in unet(False).named_parameters() if ".time_stack." in name and ".attn2." in name)


def _check_size(frames: int, steps: int, height: int, width: int) -> None:
    if frames < 1 or steps < 1:
        raise ValueError(f"frames and steps must be >= 1, got {frames}, {steps}")
    multiple = 8 * UNetConfig().latent_downscale
    if height < multiple or width < multiple or height % multiple or width % multiple:
        raise ValueError(f"height and width must be positive multiples of {multiple}, got {height}x{width}")


def unet_row(mode: str, frames: int, steps: int, height: int, width: int, cut: int | None = None,
             preset: str = "svd-xt") -> dict:
    """One UNet row. cut=K: steps 0..K-1 guided (2*frames), K..steps-1 conditional only (frames)."""
    if cut is not None:
        plan = plan_of(RunSpec(guidance_cut_step=cut), meta_model(preset, frames, steps, height, width))
        return plan_row(f"{CUT_PREFIX}{cut}", plan, frames, height, width)
    guided, setup = unet_eval_macs(mode, 2 * frames, frames, height, width)  # vectors: once, on the guided batch
    single, _ = unet_eval_macs(mode, frames, frames, height, width)
    return {"mode": mode, "component": "unet", "params": n_params(unet(UNET_MODES[mode])), "macs_per_eval": guided,
            "macs_per_eval_frames": single, "macs_setup_per_video": setup, "guided_evals": steps,
            "conditional_evals": 0, "macs_per_video": steps * guided + setup,
            "frames": frames, "steps": steps, "height": height, "width": width}


@dataclasses.dataclass(frozen=True)
class MetaModel:
    """What `RunSpec.resolve` reads of a loaded model (an `SVDModel`'s unet, sampling and vae_config): SVD's folded
    UNet on the meta device, and the counted run's settings as the sampling defaults."""

    unet: VideoUNet
    sampling: SamplingConfig
    vae_config: VAEConfig


def meta_model(preset: str, frames: int, steps: int, height: int, width: int) -> MetaModel:
    """SVD's network with `preset`'s sampling defaults (its guidance), frames, steps and size replaced by these."""
    sampling = dataclasses.replace(PRESETS[preset].sampling, num_frames=frames, num_inference_steps=steps,
                                   height=height, width=width)
    return MetaModel(unet(True), sampling, VAEConfig())


def ranking_only(schedule: F3Schedule) -> F3Schedule:
    """The schedule without its recorded settings and model: what counting uses of it is its ranking, which says
    which units a ratio skips at any frame count and size (`plan_of` checks its step count and units)."""
    return dataclasses.replace(schedule, settings={}, model={})


def plan_of(spec: RunSpec, model: MetaModel) -> Plan:
    """The plan `generate` runs for `spec` on `model`: `spec.resolve(model).plan`. With an F3 schedule, its step
    count and units are checked first, and the schedule's model identity is not computed (a meta network has no
    weights to identify: pass it through `ranking_only`, which records none, and resolve checks no identity)."""
    if spec.f3_schedule is None:
        return spec.resolve(model).plan
    o = spec.options()
    sigmas, _ = noise_schedule(o.get("num_inference_steps"), o.get("schedule"), spec.sigmas,
                               model.sampling.num_inference_steps)
    steps, f3 = len(sigmas) - 1, spec.f3_schedule
    if f3.num_steps != steps:
        raise ValueError(f"the F3 schedule has {f3.num_steps} steps; counting {steps} steps needs one "
                         "calibrated for that many (--steps)")
    if list(f3.units) != model.unet.temporal_units():
        raise ValueError("the F3 schedule's units are not SVD's 16 temporal blocks")
    return spec.resolve(model).plan


def other_rows(frames: int, height: int, width: int) -> list[dict]:
    vae, clip_cfg = VAEConfig(), CLIPVisionConfig()
    with META:
        encoder, decoder, clip = ConditionEncoder(vae), VideoDecoder(vae), build_image_encoder(clip_cfg)
        image = torch.randn(1, vae.in_channels, height, width)
        z = torch.randn(frames, vae.z_channels, height // vae.downscale, width // vae.downscale)
        clip_in = torch.randn(1, 3, clip_cfg.image_size, clip_cfg.image_size)
    rows = []
    for mode, module, fn, what in (
            ("vae-encoder", encoder, lambda: encoder(image), "encoder + quant_conv, 1 image"),
            ("vae-decoder", decoder, lambda: decoder(z, frames), f"temporal decoder, {frames} frames"),
            ("clip", clip, lambda: clip(clip_in), f"ViT-H/14, 1 image at {clip_cfg.image_size}")):
        macs = count_call(mode, fn)
        rows.append({"mode": mode, "component": mode, "params": n_params(module), "macs_per_eval": macs,
                     "macs_per_video": macs, "what": what, "frames": frames, "height": height, "width": width})
    return rows


def default_cut_steps(steps: int) -> list[int]:
    """A few cut steps spread over the schedule: 40%, 60%, 80% of the steps (10, 15, 20 for 25)."""
    return sorted({min(max(round(f * steps), 1), steps - 1) for f in (0.4, 0.6, 0.8)} - {0}) if steps > 1 else []


def latest_cut_meeting(target: float, frames: int, steps: int, height: int, width: int,
                       preset: str = "svd-xt") -> int | None:
    """The LARGEST K (the latest cut, fewest conditional-only steps) whose vcut+guidance-cut@K row saves at least
    `target` MACs per video against `original`; None if even K=0 does not. The saving falls as K grows."""
    reference = unet_row("original", frames, steps, height, width)["macs_per_video"]
    meeting = [k for k in range(steps + 1) if reference - unet_row(
        "vcut", frames, steps, height, width, cut=k, preset=preset)["macs_per_video"] >= target]
    return max(meeting) if meeting else None


def count(preset: str = "svd-xt", frames: int | None = None, steps: int | None = None, height: int | None = None,
          width: int | None = None, cut_steps: list[int] | None = None, components: bool = True,
          plans=()) -> list[dict]:
    """All rows (dicts with int `params`, `macs_per_eval`, `macs_per_video`; UNet rows also `macs_per_eval_frames`
    (one call on `frames`), `macs_setup_per_video`, `guided_evals`, `conditional_evals`, `saving_vs_original`).
    None means the preset's value. cut_steps default: `default_cut_steps(steps)` plus the latest K meeting the
    paper's 322T (flagged `meets_322T_latest`). plans: (name, RunSpec) pairs, each counted as a row of its own (F3,
    step caching, speed levels, combinations; `option_plans`), its plan resolved as generate resolves it, with these
    frames, steps and size as the defaults (`plan_of`)."""
    sampling = PRESETS[preset].sampling
    frames = sampling.num_frames if frames is None else frames
    steps = sampling.num_inference_steps if steps is None else steps
    height = sampling.height if height is None else height
    width = sampling.width if width is None else width
    _check_size(frames, steps, height, width)
    rows = [unet_row(mode, frames, steps, height, width) for mode in UNET_MODES]
    k_claim = latest_cut_meeting(CLAIM_MACS, frames, steps, height, width, preset)
    if cut_steps is None:
        cut_steps = default_cut_steps(steps) + ([k_claim] if k_claim is not None else [])
    for k in sorted(set(cut_steps)):
        if not 0 <= k <= steps:
            raise ValueError(f"cut step {k} is outside [0, {steps}]")
        rows.append(unet_row("vcut", frames, steps, height, width, cut=k, preset=preset)
                    | {"meets_322T_latest": k == k_claim})
    model = meta_model(preset, frames, steps, height, width)
    for name, spec in plans:
        rows.append(plan_row(name, plan_of(spec, model), frames, height, width))
    reference = rows[0]
    for row in rows:
        row["saving_vs_original"] = reference["macs_per_video"] - row["macs_per_video"]
    if components:
        rows += other_rows(frames, height, width)
    return rows


def _t(macs: float) -> str:
    return f"{macs / 1e12:,.2f}"


def print_table(rows: list[dict], preset: str, steps_source: str) -> None:
    unet_rows = [r for r in rows if r["component"] == "unet"]
    ref = unet_rows[0]
    f, s, h, w = ref["frames"], ref["steps"], ref["height"], ref["width"]
    print(f"SVD full-size networks, meta-device count (MACs = FLOPs/2; 1T = 1e12 MACs), preset {preset}")
    print(f"  {f} frames, {h}x{w} (latent {h // 8}x{w // 8}), STEPS = {s} ({steps_source})")
    print("  per video = UNet evaluations only: guided step = 1 call on 2*frames (CFG batch), conditional-only step"
          " = 1 call on frames,\n  plus the folded context vectors once per video; VAE and CLIP are separate rows.")
    print("  counted: every conv / linear / matmul product incl. attention scores and values; not counted: "
          "elementwise, norms, softmax.\n")
    header = (f"{'mode':<30}{'params':>15}{'Δparams':>14}{'eval 2T':>10}{'eval T':>10}{'evals':>8}"
              f"{'per video':>12}{'saved':>10}{'saved %':>9}  paper claims met")
    print(header)
    print("-" * (len(header) + 22))
    paper_removed = temporal_attn2_params()
    for r in unet_rows:
        saved, dparams = r["saving_vs_original"], r["params"] - ref["params"]
        claims = []
        if r["mode"] == "vcut-temporal":
            claims.append(f"-{paper_removed / 1e6:.2f}M attn2 params (paper framing) >= 50M")
        elif r["mode"] != "original" and -dparams >= CLAIM_PARAMS:
            claims.append(f"{-dparams / 1e6:.1f}M fewer params >= 50M")
        if r["mode"] != "original":
            claims.append(f"322T: {'yes' if saved >= CLAIM_MACS else 'no'}")
            claims.append(f"20%: {'yes' if saved >= CLAIM_LATENCY * ref['macs_per_video'] else 'no'}")
        if r.get("meets_322T_latest"):
            claims.append("<- latest K meeting 322T")
        evals = f"{r['guided_evals']}+{r['conditional_evals']}"
        print(f"{r['mode']:<30}{r['params']:>15,}{dparams:>+14,}{_t(r['macs_per_eval']):>10}"
              f"{_t(r['macs_per_eval_frames']):>10}{evals:>8}{_t(r['macs_per_video']):>12}{_t(saved):>10}"
              f"{100 * saved / ref['macs_per_video']:>8.2f}%  {'; '.join(claims)}")
    print("\n(eval 2T / eval T: T MACs of one UNet call on the guided batch of 2*frames / on frames; evals: guided +"
          " conditional-only calls)\n")
    for r in rows:
        if r["component"] != "unet":
            print(f"{r['mode']:<30}{r['params']:>15,}  {_t(r['macs_per_video']):>8} T MACs once per video  "
                  f"({r['what']})")
    total = {r["mode"]: r["macs_per_video"] for r in rows if r["component"] != "unet"}
    print(f"{'(VAE + CLIP total)':<23}{'':>15}  {_t(sum(total.values())):>8} T MACs per video\n")
    print(f"Paper (VCUT) claims, for a {CLAIM_FRAMES}-frame video: 50M fewer parameters, up to 322T fewer MACs per"
          " video, 20% lower latency (here: >= 20% of the original's UNet MACs, a proxy; latency is not measured).")
    print(f"  paper's parameter framing: the 16 temporal attn2 hold {paper_removed:,} parameters; vcut-temporal "
          f"removes them and adds {(unet_rows[1]['params'] - ref['params'] + paper_removed):,} of folded layers "
          f"(net {ref['params'] - unet_rows[1]['params']:,} fewer).")
    cut_rows = [r for r in unet_rows if r.get("meets_322T_latest")]
    if cut_rows:
        k = cut_rows[0]["guided_evals"]
        print(f"  latest guidance-cut step saving >= 322T: K = {k} ({s - k} of {s} steps conditional-only), "
              f"saves {_t(cut_rows[0]['saving_vs_original'])}T; K = {k + 1} would save less.")
    else:
        print("  no guidance-cut step saves 322T at this setting.")
    if (f, s) != (CLAIM_FRAMES, CLAIM_STEPS):
        print(f"  NOTE: the claims refer to {CLAIM_FRAMES} frames x {CLAIM_STEPS} steps; this run uses {f} x {s} "
              f"(use --frames {CLAIM_FRAMES} --steps {CLAIM_STEPS} for the paper's setting).")


def option_plans(args) -> list[tuple[str, RunSpec]]:
    """(row name, RunSpec) for --cache rows, --speed levels (a level's own step count where it sets one, else the
    counted one), the F3 ratios, and each F3 ratio with each explicit --cut-steps K."""
    plans = [(f"vcut+cache@{n}/{d}", RunSpec(cache_interval=n, cache_depth=d)) for n, d in getattr(args, "cache", [])]
    if getattr(args, "speed", False):
        plans += [(f"speed {level}", RunSpec(speed=level)) for level in SPEED_LEVELS]
    if args.f3_ratio and not args.f3_schedule:
        raise ValueError("--f3-ratio needs --f3-schedule")
    if not args.f3_schedule:
        return plans
    schedule = ranking_only(F3Schedule.load(args.f3_schedule))
    for r in args.f3_ratio:
        f3 = dict(f3_schedule=schedule, f3_ratio=r, f3_statistic=args.f3_statistic)
        plans.append((f"vcut+f3@{r:g}", RunSpec(**f3)))
        plans += [(f"{CUT_PREFIX}{k}+f3@{r:g}", RunSpec(guidance_cut_step=k, **f3)) for k in args.cut_steps or []]
    return plans


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="prints a table (or --json rows) on stdout; writes no file")
    parser.add_argument("--preset", default="svd-xt", choices=sorted(PRESETS))
    parser.add_argument("--frames", type=int)
    parser.add_argument("--steps", type=int, help="denoising steps (default: the preset's; the paper uses 25)")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--cut-steps", type=int, nargs="*", help="guidance-cut steps K (default: a few + the 322T one)")
    parser.add_argument("--f3-schedule", help="an F3 schedule (svdlite calibrate) for vcut+f3@R rows; its step count "
                                              "must equal --steps, any frame count or size is fine")
    parser.add_argument("--f3-ratio", type=float, nargs="*", default=[], help="F3 ratios R (e.g. 0.1 0.2 0.3 0.5)")
    parser.add_argument("--f3-statistic", choices=("attention", "contribution"), default="attention")
    parser.add_argument("--cache", type=int, nargs=2, action="append", default=[], metavar=("N", "D"),
                        help="a step-caching row: cache interval N, depth D (repeatable)")
    parser.add_argument("--speed", action="store_true", help="rows for the speed levels (generate --speed)")
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    parser.add_argument("--ops", action="store_true", help="also list every aten op seen, per component")
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rows = count(args.preset, args.frames, args.steps, args.height, args.width, args.cut_steps,
                     plans=option_plans(args))
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        source = "--steps" if args.steps is not None else f"preset {args.preset}'s default"
        print_table(rows, args.preset, source)
    if args.ops:
        for component, ops in OPS_SEEN.items():
            print(f"\nops seen in {component}:", file=sys.stderr if args.json else sys.stdout)
            for op, n in sorted(ops.items()):
                print(f"  {op:<45}{n:>8}", file=sys.stderr if args.json else sys.stdout)


if __name__ == "__main__":
    main()
