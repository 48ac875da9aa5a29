#!/usr/bin/env python3
"""Peak memory of the live tensors of SVD's networks, counted without allocating them (meta device / fake tensors).

    python tools/count_memory.py [--size WxH ...] [--frames N ...] [--dtype fp16 bf16 ...] [--chunks C ...]
                                 [--network full|tiny] [--target cuda|cpu] [--no-diffusers] [--top N]
                                 [--allowance GIB] [--json OUT [--force]]
    python tools/count_memory.py --measure [same options]   real runs (random weights) beside the count

Rows, for svdlite and for diffusers under the same tracker, at every size (width x height in pixels), frame count
and UNet dtype:
  weights   parameters and buffers of every network the pipeline holds loaded: UNet and CLIP image encoder in the
            dtype; VAE encoder and decoder in float32 for svdlite (`load_model`), in the dtype for diffusers (its
            pipeline decodes with the VAE in the pipeline's dtype)
  unet      one guided UNet evaluation as each pipeline runs a denoising step: svdlite's `make_denoiser` step on
            [uncond; cond] (2 x frames rows) with the folded context vectors, diffusers' loop body (latents doubled,
            scaled, concatenated with the image latents, `unet(...)`, guidance, the Euler update)
  decode    the final latents to frames in chunks of C frames: svdlite's `pipeline.decode`, diffusers'
            `StableVideoDiffusionPipeline.decode_latents`
  encode    the conditioning image through the VAE encoder (svdlite: float32 `ConditionEncoder`; diffusers: float32
            for fp16, its `force_upcast`, else the dtype); the CLIP encoder's run on one 224 x 224 image is not
            counted (a few MiB)
A peak is the largest sum of live tensors from the start of the call (its inputs included: latents, conditioning,
context vectors) to its end; weights are counted apart and never in a peak.

How it is counted: `LiveTensors`, a TorchDispatchMode, sees every aten op. An op output whose storage is neither a
storage of one of the op's inputs nor one already tracked is a new allocation of the storage's nbytes; it is freed
when the storage dies, seen through a weakref callback on the storage's Python object (torch keeps one Python object
per storage for the storage's whole life, so the callback fires at the storage's death, not when a wrapper goes).
The peak can only rise when something is allocated, so checking at each allocation finds it exactly. Storages made
before the mode (weights) are never counted. What it cannot see: buffers a kernel allocates and frees inside one op
(cuDNN / cuBLAS / oneDNN workspaces, weight reorders), the allocator's rounding beyond `granularity`, its cache and
fragmentation, the CUDA context. torch's own `torch.distributed._tools.mem_tracker.MemTracker` rests on the same
mechanism (storage weakrefs from a dispatch mode) but attributes memory per module and training phase; this tool
needs the peak of one call, the op and module that made each tensor live at it, and exact bytes, which a small
mode of its own gives directly.

Targets:
  cuda (default)  meta tensors: the code path a CUDA device takes (the device type is not "cpu": svdlite's
                  F.linear, and the memory choices of `svdlite.kernels`: the feed-forward and half-precision group
                  norms in chunks above their byte budgets, the VAE decoder's per-frame work in frame
                  sub-batches), each storage rounded up to 512 bytes as the CUDA caching allocator rounds, and
                  `F.scaled_dot_product_attention` as the fused kernel a CUDA GPU runs (meta tensors would take the
                  math path and materialise every attention map): `FusedAttention`
  cpu             fake CPU tensors (FakeTensorMode): the CPU code path (svdlite's 1x1-convolution `linear`, the
                  feed-forward in cache-sized chunks, the decoder without frame sub-batches, the CPU flash
                  attention), exact bytes; what `--measure` checks against peak RSS
--measure runs the same calls for real with random weights on this machine's device (cuda: in process, against
torch.cuda.max_memory_allocated; cpu: each case in a fresh process, against the rise of VmHWM, the peak resident
set, over the resident set before the call) and prints them beside the count. On the GPU, --scratch lists the ops
whose kernels take memory of their own (`KernelScratch`) and --cap-gib runs under an allocator cap, as on a smaller
GPU.
"""
import argparse
import contextlib
import functools
import json
import math
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import svdlite
from benchlib import GIB, log
from svdlite.conditioning import CFGBatch
from svdlite.pipeline import decode as svdlite_decode
from svdlite.denoiser import make_denoiser
from svdlite.outputs import add_force, check_outputs, write_text
from svdlite.plan import Step
from svdlite.unet import UNetConfig, VideoUNet
from svdlite.unet_keymap import diffusers_unet_params
from svdlite.vae import ConditionEncoder, VAEConfig, VideoDecoder

CUDA_ROUNDING = 512  # the CUDA caching allocator rounds every block up to a multiple of 512 bytes
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SIDES = ("svdlite", "diffusers")
SIGMA = 700.0  # the first step's noise level (the EDM schedule's sigma_max); memory does not depend on it
DEFAULT_SIZES = ("1024x576", "768x448", "512x320")
# GiB beyond weights + peak, measured on an H200 (torch 2.11, CUDA 13) for SVD-XT at 1024x576 x 25 frames, fp16
# (docs/memory.md): 0.69 outside the allocator (CUDA context, cuDNN/cuBLAS modules) + at most 1.9 that the allocator
# needed beyond the live tensors (a 1.1 GiB cuDNN workspace it did not give up under a cap, and fragmentation)
DEFAULT_ALLOWANCE = 2.6


# ---------------------------------------------------------------------------------------------------- the tracker

class LiveTensors(TorchDispatchMode):
    """Bytes of the storages ops create while the mode is active, each alive until its storage dies.

    granularity: every storage is rounded up to a multiple of it (1: exact bytes; 512: CUDA's caching allocator).
    names: {module: name} for the modules whose forward calls label the allocations (the innermost running).
    After the run: `peak` (bytes), `at_peak` (one `(nbytes, op, module, shape, dtype)` per live storage at the
    peak), `current`, `allocations`. `reset_peak()` starts a new peak from what is live now."""

    def __init__(self, granularity: int = 1, names: dict | None = None):
        super().__init__()
        self.granularity = granularity
        self.names = {id(m): n for m, n in (names or {}).items()}
        self.live: dict[int, list] = {}  # storage address -> [nbytes, op, module, shape, dtype]
        self.current = self.peak = self.allocations = 0
        self.at_peak: list[tuple] = []
        self._stack: list[str] = []
        self._refs: dict[int, weakref.ref] = {}
        self._hooks = []
        self.ops: dict[str, int] = {}  # op name -> calls

    def rounded(self, nbytes: int) -> int:
        return -(-nbytes // self.granularity) * self.granularity

    def reset_peak(self) -> None:
        self.peak = self.current
        self.at_peak = [tuple(a) for a in self.live.values()]

    def _free(self, key: int, ref) -> None:
        if self._refs.get(key) is ref:  # the storage at this address that we track died
            self.current -= self.live.pop(key)[0]
            del self._refs[key]

    def _raise(self) -> None:
        if self.current > self.peak:
            self.peak = self.current
            self.at_peak = [tuple(a) for a in self.live.values()]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops[str(func)] = self.ops.get(str(func), 0) + 1
        inputs = {t.untyped_storage()._cdata for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and not t.is_sparse}
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.is_sparse:
                continue
            storage = t.untyped_storage()
            key, nbytes = storage._cdata, self.rounded(storage.nbytes())
            if key in self.live:  # grown in place (resize_, out=)
                self.current += nbytes - self.live[key][0]
                self.live[key][0] = nbytes
            elif key in inputs:
                continue
            else:
                ref = weakref.ref(storage, lambda r, key=key: self._free(key, r))
                self._refs[key] = ref
                self.live[key] = [nbytes, str(func), self._stack[-1] if self._stack else "",
                                  tuple(t.shape), str(t.dtype).replace("torch.", "")]
                self.current += nbytes
                self.allocations += 1
            self._raise()
        return out

    def __enter__(self):
        def pre(module, args):
            self._stack.append(self.names.get(id(module), type(module).__name__))

        def post(module, args, output):
            if self._stack:
                self._stack.pop()

        if self.names:
            self._hooks = [torch.nn.modules.module.register_module_forward_pre_hook(pre),
                           torch.nn.modules.module.register_module_forward_hook(post)]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return super().__exit__(*exc)


def attention_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The fused kernel PyTorch picks for F.scaled_dot_product_attention (no mask, no dropout) on an sm80+ GPU:
    flash for fp16/bf16 with head widths <= 256 that are multiples of 8, else memory-efficient attention; the math
    path (q k^T materialised) where an input's last dimension is not contiguous, which neither fused kernel takes.
    (PyTorch 2.11 on an H200 runs some of these flash calls through cuDNN's fused attention, which keeps the same
    output and a float32 row statistic: the same bytes.)"""
    d, dv = q.shape[-1], v.shape[-1]
    if any(t.stride(-1) != 1 for t in (q, k, v)):  # both fused kernels need a unit last-dim stride
        return "math"
    if q.dtype in (torch.float16, torch.bfloat16) and d == dv and d <= 256 and d % 8 == 0:
        return "flash"
    return "efficient"


class FusedAttention(TorchFunctionMode):
    """F.scaled_dot_product_attention on meta tensors as a CUDA GPU runs it: the fused op `attention_backend`
    names, through its own meta kernel (output in the query's layout, flash's float32 log-sum-exp; no attention
    map). Without this mode meta tensors take the math path, which materialises q k^T. `backends` counts calls."""

    def __init__(self):
        super().__init__()
        self.backends: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        extra = dict(zip(("attn_mask", "dropout_p", "is_causal"), args[3:])) | kwargs
        if extra.get("attn_mask") is not None or extra.get("dropout_p", 0.0) or extra.get("is_causal", False):
            raise NotImplementedError("FusedAttention models attention without mask, dropout or causality only")
        backend = attention_backend(q, k, v)
        self.backends[backend] = self.backends.get(backend, 0) + 1
        scale = extra.get("scale")
        if backend == "math":  # meta tensors decompose it as the GPU's math path does
            return func(*args, **kwargs)
        if backend == "flash":
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)[0]
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, False, scale=scale)[0]


@functools.lru_cache(maxsize=None)
def fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


def device_context(target: str):
    """Where `target`'s tensors are made: the meta device (cuda) or fake CPU tensors (cpu); a real device name
    ("cuda:0", "cpu-real") makes real tensors there."""
    if target == "cuda":
        return torch.device("meta")
    if target == "cpu":
        return fake_mode()
    return torch.device("cpu" if target == "cpu-real" else target)


def track(fn, target: str, names: dict | None = None):
    """Run fn(mark) under a tracker for `target`; fn calls mark() where the counted call starts (the peak is reset
    there and the live bytes recorded as `inputs`). Returns (tracker, inputs bytes, fn's result)."""
    tracker = LiveTensors(CUDA_ROUNDING if target.startswith("cuda") else 1, names)
    attention = FusedAttention() if target == "cuda" else contextlib.nullcontext()
    marked = {}

    def mark():
        marked["inputs"] = tracker.current
        tracker.reset_peak()

    with torch.no_grad(), device_context(target), attention, tracker:
        result = fn(mark)
    if isinstance(attention, FusedAttention):
        tracker.backends = attention.backends
    return tracker, marked.get("inputs", 0), result


# ---------------------------------------------------------------------------------------------------- networks

def tiny_configs() -> tuple[UNetConfig, VAEConfig]:
    """The bundled tiny model's UNet and VAE configs, read from its file's metadata."""
    from safetensors import safe_open

    with safe_open(str(Path(svdlite.__file__).parent / "assets" / "tiny.safetensors"), "pt") as f:
        meta = f.metadata()
    return UNetConfig.from_dict(json.loads(meta["unet_config"])), VAEConfig(**json.loads(meta["vae_config"]))


def configs(network: str) -> tuple[UNetConfig, VAEConfig]:
    if network == "full":
        return UNetConfig(), VAEConfig()
    if network == "tiny":
        return tiny_configs()
    raise ValueError(f"network must be 'full' or 'tiny', got {network!r}")


def diffusers_vae_kwargs(config: VAEConfig) -> dict:
    """`AutoencoderKLTemporalDecoder` keyword arguments (SVD's vae/config.json for the full network)."""
    levels = len(config.ch_mult)
    return dict(in_channels=config.in_channels, out_channels=config.out_ch,
                down_block_types=("DownEncoderBlock2D",) * levels,
                block_out_channels=tuple(config.ch * m for m in config.ch_mult),
                layers_per_block=config.num_res_blocks, latent_channels=config.z_channels,
                scaling_factor=config.scale_factor)


def build(side: str, part: str, network: str, dtype: torch.dtype, target: str, frames: int = 14):
    """One network, in eval mode and `dtype`, built where `target`'s tensors live (real ones hold random values).
    part: "unet", "decoder" (for diffusers the whole AutoencoderKLTemporalDecoder) or "encoder" (svdlite's)."""
    unet_cfg, vae_cfg = configs(network)
    real = target not in ("cuda", "cpu")
    # real tensors: built on the meta device and given memory once, in the final dtype (as svdlite's loader does:
    # building in float32 and casting would leave the allocator's segments fragmented)
    with torch.device("meta") if real else device_context(target):
        if side == "svdlite":
            module = {"unet": lambda: VideoUNet(unet_cfg), "decoder": lambda: VideoDecoder(vae_cfg),
                      "encoder": lambda: ConditionEncoder(vae_cfg)}[part]()
        elif part == "unet":
            from diffusers import UNetSpatioTemporalConditionModel

            module = UNetSpatioTemporalConditionModel(**diffusers_unet_params(unet_cfg, frames))
        else:
            from diffusers import AutoencoderKLTemporalDecoder

            module = AutoencoderKLTemporalDecoder(**diffusers_vae_kwargs(vae_cfg))
    if target == "cuda":  # tensors made by legacy constructors (diffusers' mix factors) ignore the device context
        module = module.to("meta").to(dtype)
    elif target == "cpu":  # module.to() cannot swap fake parameters: replaced one by one
        from torch._subclasses.fake_tensor import FakeTensor

        with fake_mode():
            for m in module.modules():
                for name, t in list(m._parameters.items()) + list(m._buffers.items()):
                    if t is None:
                        continue
                    t = t if isinstance(t, FakeTensor) else fake_mode().from_tensor(t)
                    t = t.to(dtype) if t.is_floating_point() else t
                    setattr(m, name, torch.nn.Parameter(t, requires_grad=False) if name in m._parameters else t)
    else:  # legacy constructors (diffusers' mix factors) ignore the device context: to meta first
        device = torch.device("cpu" if target == "cpu-real" else target)
        module = module.to("meta").to(dtype).to_empty(device=device)
    module = module.eval().requires_grad_(False)
    if real:  # small random values (the memory does not depend on them)
        with torch.no_grad():
            generator = torch.Generator(device=device).manual_seed(0)
            for t in list(module.parameters()) + list(module.buffers()):
                if t.is_floating_point():
                    t.normal_(0.0, 0.02, generator=generator)  # in place: no temporaries
    return module


def weight_bytes(module: torch.nn.Module, granularity: int = 1) -> int:
    """Bytes of the distinct storages of a module's parameters and buffers."""
    storages = {}
    for t in list(module.parameters()) + list(module.buffers()):
        s = t.untyped_storage()
        storages[s._cdata] = s.nbytes()
    return sum(-(-n // granularity) * granularity for n in storages.values())


def clip_weight_bytes(side: str, network: str, dtype: torch.dtype, granularity: int) -> int:
    """The CLIP image encoder's weights (ViT-H/14 for the full network, the tiny model's for tiny)."""
    with torch.device("meta"):
        if side == "svdlite" and _has_open_clip():
            from svdlite.clip import build_image_encoder

            module = build_image_encoder(_svdlite_clip_config(network))
        else:  # transformers' tower of the same shape (1,280 parameters more than open_clip's, 2.5 KiB in fp16)
            from transformers import CLIPVisionConfig as HFConfig
            from transformers import CLIPVisionModelWithProjection

            c = _svdlite_clip_config(network)
            module = CLIPVisionModelWithProjection(HFConfig(
                hidden_size=c.width, intermediate_size=int(c.width * c.mlp_ratio), projection_dim=c.output_dim,
                num_hidden_layers=c.layers, num_attention_heads=c.heads, image_size=c.image_size,
                patch_size=c.patch_size, hidden_act="gelu", layer_norm_eps=1e-5))
    return weight_bytes(module.to(dtype), granularity)


def _has_open_clip() -> bool:
    try:
        import open_clip  # noqa: F401
    except ImportError:
        return False
    return True


def _tiny_clip_config():
    from safetensors import safe_open

    from svdlite.clip import CLIPVisionConfig

    with safe_open(str(Path(svdlite.__file__).parent / "assets" / "tiny.safetensors"), "pt") as f:
        return CLIPVisionConfig(**json.loads(f.metadata()["clip_config"]))


def _svdlite_clip_config(network: str):
    from svdlite.clip import CLIPVisionConfig

    return CLIPVisionConfig() if network == "full" else _tiny_clip_config()


# ---------------------------------------------------------------------------------------------------- the calls

def _check(frames: int, height: int, width: int, network: str) -> None:
    unet_cfg, vae_cfg = configs(network)
    multiple = vae_cfg.downscale * unet_cfg.latent_downscale
    if frames < 1 or height < multiple or width < multiple or height % multiple or width % multiple:
        raise ValueError(f"frames must be >= 1 and width, height positive multiples of {multiple}; got {frames} "
                         f"frames at {width}x{height}")


def unet_call(side: str, net, frames: int, height: int, width: int, dtype: torch.dtype):
    """fn(mark) making the inputs of one guided denoising step, then running the step as the pipeline does."""
    vae_down = 8
    h, w = height // vae_down, width // vae_down

    if side == "svdlite":
        cfg = net.config

        def fn(mark):
            rows = 2 * frames
            batch = CFGBatch(context=torch.randn(rows, 1, cfg.context_dim), concat=torch.randn(rows, 4, h, w),
                             vector=torch.randn(rows, cfg.adm_in_channels))
            x = torch.randn(frames, 4, h, w)  # the sampler's float32 latents
            denoise = make_denoiser(SimpleNamespace(unet=net), batch, frames, 1.0, 2.5, None, dtype)
            sigma = torch.full((), SIGMA)
            mark()
            denoised, _ = denoise(x, sigma, Step(0, SIGMA, True), None)
            d = (x - denoised) / sigma  # the Euler update of sampling.sample_euler_edm
            return x + (0.0 - sigma) * d
        return fn

    def fn(mark):  # StableVideoDiffusionPipeline.__call__'s loop body, one step
        cross = net.config.cross_attention_dim
        latents = torch.randn(1, frames, 4, h, w, dtype=dtype)
        image_latents = torch.randn(2, frames, 4, h, w, dtype=dtype)
        embeddings = torch.randn(2, 1, cross, dtype=dtype)
        added_time_ids = torch.randn(2, 3, dtype=dtype)
        guidance = torch.randn(1, frames, 1, 1, 1, dtype=dtype)
        sigma, sigma_next = SIGMA, 600.0
        t = torch.full((), 0.25 * math.log(sigma))
        mark()
        model_input = torch.cat([latents] * 2) / ((sigma ** 2 + 1) ** 0.5)  # scheduler.scale_model_input
        model_input = torch.cat([model_input, image_latents], dim=2)
        noise_pred = net(model_input, t, encoder_hidden_states=embeddings, added_time_ids=added_time_ids,
                         return_dict=False)[0]
        uncond, cond = noise_pred.chunk(2)
        noise_pred = uncond + guidance * (cond - uncond)
        sample = latents.to(torch.float32)  # EulerDiscreteScheduler.step, v-prediction
        original = noise_pred * (-sigma / (sigma ** 2 + 1) ** 0.5) + sample / (sigma ** 2 + 1)
        return (sample + (sample - original) / sigma * (sigma_next - sigma)).to(noise_pred.dtype)
    return fn


def decode_call(side: str, net, frames: int, height: int, width: int, chunk: int, dtype: torch.dtype):
    """fn(mark) making the final latents, then decoding them in chunks as the pipeline does."""
    h, w = height // 8, width // 8
    if side == "svdlite":
        def fn(mark):
            latents = torch.randn(frames, 4, h, w)  # float32, as sampling returns them
            mark()
            model = SimpleNamespace(vae_decoder=net, vae_config=VAEConfig())  # the pipeline reads scale_factor
            return svdlite_decode(model, latents, frames, chunk, progress=False)
        return fn

    def fn(mark):
        from diffusers import StableVideoDiffusionPipeline

        latents = torch.randn(1, frames, 4, h, w, dtype=dtype)
        mark()
        return StableVideoDiffusionPipeline.decode_latents(SimpleNamespace(vae=net), latents, frames, chunk)
    return fn


def encode_call(side: str, net, height: int, width: int, dtype: torch.dtype):
    """fn(mark): the conditioning image (float32, as preprocessing leaves it) through the VAE encoder."""
    def fn(mark):
        image = torch.randn(1, 3, height, width)
        mark()
        if side == "svdlite":
            return net(image)
        return net.encode(image.to(dtype)).latent_dist.mode()
    return fn


# ---------------------------------------------------------------------------------------------------- counting

@functools.lru_cache(maxsize=None)
def _network(side: str, part: str, network: str, dtype: torch.dtype, target: str):
    return build(side, part, network, dtype, target)


def _result(tracker, inputs: int, top: int) -> dict:
    row = {"peak": tracker.peak, "inputs": inputs, "allocations": tracker.allocations}
    if top:
        largest = sorted(tracker.at_peak, key=lambda a: -a[0])[:top]
        row["at_peak"] = [{"bytes": n, "op": op, "module": mod, "shape": list(shape), "dtype": dt}
                          for n, op, mod, shape, dt in largest]
    if hasattr(tracker, "backends"):
        row["attention"] = dict(tracker.backends)
    return row


def _names(net) -> dict:
    return {m: n or type(net).__name__ for n, m in net.named_modules()}


def count_unet(side: str, frames: int, height: int, width: int, dtype: torch.dtype, network: str = "full",
               target: str = "cuda", top: int = 0) -> dict:
    """Peak bytes of one guided denoising step (2 x frames UNet rows); `weights` the UNet's own."""
    _check(frames, height, width, network)
    net = _network(side, "unet", network, dtype, target)
    tracker, inputs, _ = track(unet_call(side, net, frames, height, width, dtype), target, _names(net))
    return {"part": "unet", "side": side, "frames": frames, "width": width, "height": height,
            "dtype": str(dtype).replace("torch.", ""), "weights": weight_bytes(net, tracker.granularity),
            **_result(tracker, inputs, top)}


def decoder_dtype(side: str, dtype: torch.dtype) -> torch.dtype:
    """svdlite decodes in float32 whatever the UNet's dtype; diffusers in the pipeline's dtype."""
    return torch.float32 if side == "svdlite" else dtype


def encoder_dtype(side: str, dtype: torch.dtype) -> torch.dtype:
    """svdlite encodes in float32; diffusers upcasts a float16 VAE (force_upcast), else keeps the dtype."""
    return torch.float32 if side == "svdlite" or dtype == torch.float16 else dtype


def count_decode(side: str, frames: int, height: int, width: int, chunk: int, dtype: torch.dtype,
                 network: str = "full", target: str = "cuda", top: int = 0) -> dict:
    """Peak bytes of decoding `frames` latents in chunks of `chunk` frames; `weights` the decoder's."""
    _check(frames, height, width, network)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    vae_dtype = decoder_dtype(side, dtype)
    net = _network(side, "decoder", network, vae_dtype, target)
    part = net if side == "svdlite" else net.decoder
    tracker, inputs, _ = track(decode_call(side, net, frames, height, width, chunk, vae_dtype), target, _names(net))
    return {"part": "decode", "side": side, "frames": frames, "width": width, "height": height, "chunk": chunk,
            "dtype": str(vae_dtype).replace("torch.", ""), "weights": weight_bytes(part, tracker.granularity),
            **_result(tracker, inputs, top)}


def count_encode(side: str, height: int, width: int, dtype: torch.dtype, network: str = "full",
                 target: str = "cuda") -> dict:
    """Peak bytes of encoding the conditioning image (one image at width x height) with the VAE encoder."""
    vae_dtype = encoder_dtype(side, dtype)
    net = _network(side, "encoder" if side == "svdlite" else "decoder", network, vae_dtype, target)
    tracker, inputs, _ = track(encode_call(side, net, height, width, vae_dtype), target, _names(net))
    return {"part": "encode", "side": side, "width": width, "height": height,
            "dtype": str(vae_dtype).replace("torch.", ""), **_result(tracker, inputs, 0)}


def pipeline_weights(side: str, dtype: torch.dtype, network: str = "full", granularity: int = CUDA_ROUNDING) -> dict:
    """{component: bytes} of what each pipeline holds loaded while it runs."""
    unet = _network(side, "unet", network, dtype, "cuda")
    out = {"unet": weight_bytes(unet, granularity), "clip": clip_weight_bytes(side, network, dtype, granularity)}
    if side == "svdlite":
        out["vae_encoder"] = weight_bytes(_network(side, "encoder", network, torch.float32, "cuda"), granularity)
        out["vae_decoder"] = weight_bytes(_network(side, "decoder", network, torch.float32, "cuda"), granularity)
    else:
        out["vae"] = weight_bytes(_network(side, "decoder", network, dtype, "cuda"), granularity)
    return out


def table_rows(sizes, frame_counts, dtypes, chunks, sides=SIDES, network: str = "full", target: str = "cuda",
               allowance: float = DEFAULT_ALLOWANCE, top: int = 0, log=None) -> list[dict]:
    """One row per (frames, size, dtype, side): weights, UNet peak, decode peaks per chunk, encode peak, totals."""
    rows = []
    for frames in frame_counts:
        for width, height in sizes:
            for dtype in dtypes:
                for side in sides:
                    start = time.perf_counter()
                    weights = pipeline_weights(side, dtype, network, CUDA_ROUNDING if target == "cuda" else 1)
                    unet = count_unet(side, frames, height, width, dtype, network, target, top)
                    decode = {c: count_decode(side, frames, height, width, c, dtype, network, target, top)
                              for c in chunks}
                    encode = count_encode(side, height, width, dtype, network, target)
                    total_weights = sum(weights.values())
                    row = {"side": side, "frames": frames, "width": width, "height": height,
                           "dtype": str(dtype).replace("torch.", ""), "network": network, "target": target,
                           "weights": weights, "weights_total": total_weights, "unet": unet,
                           "decode": {str(c): d for c, d in decode.items()}, "encode": encode,
                           "allowance_gib": allowance}
                    row["total"] = {str(c): total_weights + max(unet["peak"], d["peak"], encode["peak"])
                                    for c, d in decode.items()}
                    row["gpu_gib"] = {c: t / GIB + allowance for c, t in row["total"].items()}
                    rows.append(row)
                    if log:
                        log(f"  {side:<9} {frames:>2} frames {width}x{height} {row['dtype']}: "
                            f"{time.perf_counter() - start:.1f} s")
    return rows


def _g(n: int) -> str:
    return f"{n / GIB:.2f}"


def markdown_table(rows: list[dict], chunks) -> str:
    """The rows as a markdown table (GiB); totals at the largest and the smallest chunk."""
    ends = sorted({max(chunks), min(chunks)}, reverse=True)
    head = (["frames", "size (WxH)", "dtype", "side", "weights", "UNet step"] + [f"decode c{c}" for c in chunks]
            + ["encode"] + [f"total c{c}" for c in ends])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * (len(head) - 4)) + "|"]
    for r in rows:
        cells = ([str(r["frames"]), f"{r['width']}x{r['height']}", r["dtype"], r["side"], _g(r["weights_total"]),
                  _g(r["unet"]["peak"])] + [_g(r["decode"][str(c)]["peak"]) for c in chunks]
                 + [_g(r["encode"]["peak"])] + [_g(r["total"][str(c)]) for c in ends])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def top_report(row: dict, n: int) -> str:
    lines = []
    for what, part in [("UNet step", row["unet"])] + [(f"decode chunk {c}", d) for c, d in row["decode"].items()]:
        lines.append(f"  {what}: peak {_g(part['peak'])} GiB; largest live tensors at the peak:")
        for a in part.get("at_peak", [])[:n]:
            lines.append(f"    {a['bytes'] / 2**20:9.1f} MiB  {a['dtype']:<8} {str(tuple(a['shape'])):<26} "
                         f"{a['op']:<44} {a['module']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- measuring

def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_cpu_case(case: dict) -> dict:
    """In this (fresh) process: build the network with random weights on the CPU, run the call once to warm up,
    then again with VmHWM reset (/proc/self/clear_refs 5); the rise of VmHWM over VmRSS before the call, beside the
    tracker's peak on the same real tensors."""
    torch.set_num_threads(case.get("threads", 1))
    dtype = DTYPES[case["dtype"]]
    side, part = case["side"], case["part"]
    fd, fh, fw = case["frames"], case["height"], case["width"]
    if part == "unet":
        net = build(side, "unet", case["network"], dtype, "cpu-real", fd)
        fn = unet_call(side, net, fd, fh, fw, dtype)
    else:
        net = build(side, "decoder", case["network"], decoder_dtype(side, dtype), "cpu-real")
        fn = decode_call(side, net, fd, fh, fw, case["chunk"], decoder_dtype(side, dtype))

    track(fn, "cpu-real")  # warm-up, tracked too: thread pools, oneDNN primitives, the tracker's own first use
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    rss_before = _status_kib("VmRSS")
    start = time.perf_counter()
    tracker, inputs, result = track(fn, "cpu-real")
    seconds = time.perf_counter() - start
    hwm = _status_kib("VmHWM")
    del result
    return {**case, "rss_rise": hwm - rss_before, "tracked_real": tracker.peak, "seconds": seconds}


def measure_cpu(cases: list[dict], log) -> list[dict]:
    """Each case in a fresh process (a clean allocator), beside the fake-tensor count."""
    out = []
    for case in cases:
        env = dict(os.environ, OMP_NUM_THREADS=str(case.get("threads", 1)))
        if case.get("mmap_threshold"):  # a fixed threshold: every block above it is mapped alone, unmapped on free
            env["MALLOC_MMAP_THRESHOLD_"] = str(case["mmap_threshold"])
        proc = subprocess.run([sys.executable, __file__, "--measure-case", json.dumps(case)], capture_output=True,
                              text=True, env=env)
        if proc.returncode:
            raise RuntimeError(f"measuring {case} failed:\n{proc.stderr[-3000:]}")
        measured = json.loads(proc.stdout.strip().splitlines()[-1])
        counted = count_case(case, "cpu")
        measured["counted"] = counted["peak"]
        measured["ratio"] = measured["rss_rise"] / counted["peak"]
        out.append(measured)
        log(f"  {_case_name(measured)}: counted {counted['peak'] / 2**20:.1f} MiB, tracked on real tensors "
            f"{measured['tracked_real'] / 2**20:.1f} MiB, peak RSS rise {measured['rss_rise'] / 2**20:.1f} MiB "
            f"(x{measured['ratio']:.3f}), {measured['seconds']:.1f} s")
    return out


class KernelScratch(TorchDispatchMode):
    """On a CUDA device: per op, the bytes the allocator handed out inside the op beyond what is live after it
    (workspaces: cuDNN, cuBLAS, the math attention's temporaries): max_memory_allocated - memory_allocated after
    the op, with the peak reset before it. Resets the peak statistics: run it apart from a measurement."""

    def __init__(self):
        super().__init__()
        self.largest: dict[tuple, int] = {}  # (op, input shapes, dtype) -> largest scratch bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        torch.cuda.reset_peak_memory_stats()
        out = func(*args, **(kwargs or {}))
        scratch = torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()
        if scratch > 0:
            shapes = tuple(tuple(t.shape) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
            dtype = next((str(t.dtype) for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor)), "")
            key = (str(func), shapes[:2], dtype.replace("torch.", ""))
            self.largest[key] = max(self.largest.get(key, 0), scratch)
        return out


def count_case(case: dict, target: str) -> dict:
    """The count (count_unet or count_decode) of a measured case, for `target`."""
    dtype = DTYPES[case["dtype"]]
    if case["part"] == "unet":
        return count_unet(case["side"], case["frames"], case["height"], case["width"], dtype, case["network"], target)
    return count_decode(case["side"], case["frames"], case["height"], case["width"], case["chunk"], dtype,
                        case["network"], target)


def _cuda_network(case: dict, nets: dict):
    """The case's network on the GPU with random weights: the one built last if it serves, else built anew (the old
    one dropped first, so only one is resident)."""
    dtype = DTYPES[case["dtype"]]
    part = case["part"]
    key = (case["side"], part, case["network"], dtype if part == "unet" else decoder_dtype(case["side"], dtype))
    if key not in nets:
        nets.clear()
        torch.cuda.empty_cache()
        nets[key] = build(case["side"], "unet" if part == "unet" else "decoder", case["network"], key[3], "cuda:0",
                          case["frames"])
    return nets[key], key[3]


def _oom_row(case: dict, err, cap_gib, net) -> dict:
    torch.cuda.empty_cache()
    return {**case, "oom": str(err).splitlines()[0], "cap_gib": cap_gib, "weights": weight_bytes(net)}


def _measure_call(fn, net) -> tuple:
    """(tracker, max_memory_allocated's rise over the bytes allocated before the call, those bytes): fn(mark) run
    under the tracker on real tensors, the device's peak statistics reset where the counted call starts."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()  # weights (and library workspaces kept since the warm-up)

    def mark():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    tracker, inputs, result = track(lambda m: fn(lambda: (mark(), m())), "cuda:0", _names(net))
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - before  # the call's inputs are made after `before`
    del result
    return tracker, measured, before


def _scratch(fn, log) -> list[dict]:
    """A third call under KernelScratch: the ops whose kernels take memory inside them, the largest six."""
    probe = KernelScratch()
    with torch.no_grad(), torch.device("cuda:0"), probe:
        fn(lambda: None)
    top = sorted(probe.largest.items(), key=lambda kv: -kv[1])[:6]
    for k, v in top:
        log(f"      scratch {v / 2**20:9.1f} MiB  {k[0]} {k[2]} {k[1]}")
    return [{"op": k[0], "shapes": k[1], "dtype": k[2], "bytes": v} for k, v in top]


def measure_cuda_case(case: dict, net, fn, log, scratch: bool, cap_gib) -> dict:
    """One case on the GPU: a warm-up call, then the measured one beside the tracker and the meta count (or the
    out-of-memory error under a cap)."""
    try:
        track(fn, "cuda:0")  # warm-up: cuBLAS/cuDNN handles and workspaces, the allocator's first segments
    except torch.cuda.OutOfMemoryError as e:
        log(f"  {_case_name(case)}: out of memory under a {cap_gib} GiB cap "
            f"(weights {weight_bytes(net) / GIB:.2f} GiB): {str(e).splitlines()[0][:300]}")
        return _oom_row(case, e, cap_gib, net)
    try:
        tracker, measured, before = _measure_call(fn, net)
    except torch.cuda.OutOfMemoryError as e:
        log(f"  {_case_name(case)}: out of memory under a {cap_gib} GiB cap: {str(e).splitlines()[0][:300]}")
        return _oom_row(case, e, cap_gib, net)
    counted = count_case(case, "cuda")
    row = {**case, "cap_gib": cap_gib, "weights": weight_bytes(net), "measured": measured,
           "tracked_real": tracker.peak, "counted": counted["peak"], "ratio": measured / counted["peak"],
           "before": before,
           "reserved_peak": torch.cuda.max_memory_reserved(),
           "attention_ops": {op: n for op, n in tracker.ops.items() if "attention" in op or "bmm" in op},
           "counted_attention": counted.get("attention", {})}
    log(f"  {_case_name(row)}: counted {counted['peak'] / GIB:.3f} GiB, tracked on the GPU "
        f"{tracker.peak / GIB:.3f}, max_memory_allocated {measured / GIB:.3f} (x{row['ratio']:.3f})")
    if scratch:  # a third call: which ops take memory inside the kernel
        row["scratch"] = _scratch(fn, log)
    return row


def measure_cuda(cases: list[dict], log, scratch: bool = False, cap_gib: float | None = None) -> list[dict]:
    """In this process on the GPU: per case, a warm-up call, then torch.cuda.max_memory_allocated's rise over the
    allocated bytes before the call, beside the tracker on the same real tensors and the meta count.
    cap_gib: the caching allocator may hold at most this much (torch.cuda.set_per_process_memory_fraction), as on a
    smaller GPU; a case that runs out of memory is recorded as such. The last row describes the device."""
    torch.backends.cudnn.benchmark = False
    out, nets, net = [], {}, None
    free0, total = torch.cuda.mem_get_info()  # initialises the context: total - free0 is the context alone
    if cap_gib:
        torch.cuda.set_per_process_memory_fraction(cap_gib * GIB / total)
    key_of = lambda c: (c["side"], c["part"], c["network"], c["dtype"] if c["part"] == "unet" else "")  # noqa: E731
    for case in sorted(cases, key=key_of):
        net = None  # this name's hold on the last network dropped before another is built
        net, net_dtype = _cuda_network(case, nets)
        fd, fh, fw = case["frames"], case["height"], case["width"]
        fn = (unet_call(case["side"], net, fd, fh, fw, DTYPES[case["dtype"]]) if case["part"] == "unet"
              else decode_call(case["side"], net, fd, fh, fw, case["chunk"], net_dtype))
        out.append(measure_cuda_case(case, net, fn, log, scratch, cap_gib))
    free1, _ = torch.cuda.mem_get_info()
    out.append({"part": "device", "total": total, "free_at_start": free0, "free_at_end": free1,
                "reserved": torch.cuda.memory_reserved(), "allocated": torch.cuda.memory_allocated(),
                "outside_allocator": total - free1 - torch.cuda.memory_reserved(),
                "name": torch.cuda.get_device_name(), "torch": torch.__version__})
    return out


def _case_name(c: dict) -> str:
    chunk = f" chunk {c['chunk']}" if c.get("chunk") else ""
    return f"{c['side']} {c['part']} {c['network']} {c['frames']}f {c['width']}x{c['height']} {c['dtype']}{chunk}"


def machine() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


# ---------------------------------------------------------------------------------------------------- CLI

def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is WIDTHxHEIGHT in pixels, e.g. 1024x576; got {text!r}")
    return width, height


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Sizes are width x height in pixels. Nothing is written without --json.")
    parser.add_argument("--size", type=parse_size, action="append", metavar="WxH",
                        help=f"video size (repeatable; default {' '.join(DEFAULT_SIZES)})")
    parser.add_argument("--frames", type=int, nargs="+", default=[14, 25], help="frame counts (default 14 25)")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp16", "bf16"],
                        help="the UNet's (and CLIP's) dtype (default fp16 bf16)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 4, 8, 14],
                        help="decode chunk sizes (default 1 4 8 14)")
    parser.add_argument("--network", choices=("full", "tiny"), default="full",
                        help="SVD's networks, or the bundled tiny model's")
    parser.add_argument("--target", choices=("cuda", "cpu"), default="cuda",
                        help="the code path and allocator counted (default cuda; see Targets above)")
    parser.add_argument("--no-diffusers", action="store_true", help="count svdlite only")
    parser.add_argument("--top", type=int, default=0, metavar="N",
                        help="list the N largest live tensors at each svdlite peak (op, module, shape)")
    parser.add_argument("--allowance", type=float, default=DEFAULT_ALLOWANCE, metavar="GIB",
                        help=f"GiB added for the CUDA context and workspaces (default {DEFAULT_ALLOWANCE})")
    parser.add_argument("--measure", action="store_true",
                        help="also run the UNet step and the decode for real (random weights) and compare: on the "
                             "GPU for --target cuda, in fresh processes on the CPU for --target cpu")
    parser.add_argument("--cap-gib", type=float, metavar="GIB",
                        help="--measure on the GPU: let the caching allocator hold at most GIB (a smaller GPU)")
    parser.add_argument("--scratch", action="store_true",
                        help="--measure on the GPU: also list the ops whose kernels allocate memory of their own")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of a --measure run on the CPU")
    parser.add_argument("--mmap-threshold", type=int, metavar="BYTES",
                        help="--measure on the CPU: run under MALLOC_MMAP_THRESHOLD_=BYTES, so glibc maps every "
                             "block of that size or more alone and unmaps it when freed (the resident set then "
                             "follows the live tensors); default: glibc's adaptive threshold, which keeps freed "
                             "blocks up to 32 MiB for reuse")
    parser.add_argument("--json", metavar="OUT", help="write the rows (and measurements) to this JSON file")
    add_force(parser)
    parser.add_argument("--measure-case", help=argparse.SUPPRESS)
    return parser


def check_args(parser: argparse.ArgumentParser, args) -> list[tuple[int, int]]:
    """The sizes to count (the default ones where none is given); refusals exit with code 2 (parser.error)."""
    if args.json:
        check_outputs(parser, [args.json], args.force)
    sizes = args.size or [parse_size(s) for s in DEFAULT_SIZES]
    try:
        for width, height in sizes:
            for frames in args.frames:
                _check(frames, height, width, args.network)
        if min(args.chunks) < 1:
            raise ValueError(f"chunks must be >= 1, got {args.chunks}")
    except ValueError as e:
        parser.error(str(e))
    return sizes


def print_tables(rows: list[dict], args) -> None:
    """The markdown table, the smallest GPU of each row and, with --top, the largest live tensors at the peaks."""
    print(f"Peak live tensors, GiB (2^30 bytes), {args.network} networks, {args.target} target; weights = every "
          f"network the pipeline holds; total cC = weights + max(UNet step, decode at chunk C, encode)")
    print(markdown_table(rows, args.chunks))
    for r in rows:
        print(f"{r['side']:<9} {r['frames']:>2} frames {r['width']}x{r['height']} {r['dtype']}: smallest GPU "
              + ", ".join(f"chunk {c}: {g:.1f} GiB" for c, g in r["gpu_gib"].items())
              + f" (+{args.allowance} GiB allowance)")
    if args.top:
        for r in rows:
            if r["side"] == "svdlite":
                print(f"\nsvdlite {r['frames']} frames {r['width']}x{r['height']} {r['dtype']}:")
                print(top_report(r, args.top))


def measure_cases(args, sizes, sides) -> list[dict]:
    """The --measure cases: the UNet step at every frame count, size, dtype and side; the decode at every frame
    count, size, chunk and side, in the first dtype."""
    common = {"network": args.network, "threads": args.threads, "mmap_threshold": args.mmap_threshold}
    cases = [{"side": s, "part": "unet", "frames": f, "width": w, "height": h, "dtype": d, **common}
             for f in args.frames for w, h in sizes for d in args.dtype for s in sides]
    cases += [{"side": s, "part": "decode", "frames": f, "width": w, "height": h, "dtype": args.dtype[0],
               "chunk": c, **common} for f in args.frames for w, h in sizes for c in args.chunks for s in sides]
    return cases


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.measure_case:
        print(json.dumps(measure_cpu_case(json.loads(args.measure_case))))
        return
    sizes = check_args(parser, args)
    sides = ("svdlite",) if args.no_diffusers else SIDES
    log(f"counting on {machine()} ({args.target} target, {args.network} networks)")
    rows = table_rows(sizes, args.frames, [DTYPES[d] for d in args.dtype], args.chunks, sides, args.network,
                      args.target, args.allowance, args.top, log)
    print_tables(rows, args)
    result = {"machine": machine(), "rows": rows,
              "command": " ".join(["tools/count_memory.py"] + (sys.argv[1:] if argv is None else list(argv)))}
    if args.measure:
        cases = measure_cases(args, sizes, sides)
        log(f"measuring {len(cases)} cases")
        result["measured"] = (measure_cuda(cases, log, args.scratch, args.cap_gib) if args.target == "cuda"
                              else measure_cpu(cases, log))
    if args.json:
        write_text(args.json, json.dumps(result, indent=1))
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
