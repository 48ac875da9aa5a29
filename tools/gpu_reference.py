"""The GPU check's fidelity comparisons (tools/gpu_check.py, part `fidelity`): the reference checks of tests/ against
the stored sgm tensors of a reference folder (tests/reference), run on a device in float32.

A library module, not a command: tools/gpu_check.py imports it as `import gpu_reference`.
  materialize_reference  the reference weights, written once into the tests' cache
  reference_checks       one row per comparison: the tiny UNet's three cases and every block, the temporal VAE
                         decoder's two cases, every block and decode_latents, the encoder and quant_conv, the whole
                         5-step sampling run (each step's state, network output and denoised estimate, the final
                         latent and decoded video)
  default_tf32_unet      the UNet's main case with torch's default float32 settings (TF32 convolutions on a GPU)
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from gpu_measure import finite, rel_err
from svdlite.testing import block_outputs, encoder_outputs

# The tests' tolerances (tests/test_unet_reference.py, test_vae.py: atol = rtol = 1e-4; test_pipeline_reference.py:
# max |a - b| / max |ref| < 1e-4), applied here on the device in float32 with TF32 off.
REF_ATOL = REF_RTOL = 1e-4
REF_REL = 1e-4


def close_ratio(a: torch.Tensor, ref: torch.Tensor, atol: float = REF_ATOL, rtol: float = REF_RTOL) -> float:
    """max |a - ref| / (atol + rtol |ref|): torch.testing.assert_close passes exactly when this is <= 1."""
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    if a.shape != ref.shape:
        raise ValueError(f"shape {tuple(a.shape)} against the reference's {tuple(ref.shape)}")
    return ((a - ref).abs() / (atol + rtol * ref.abs())).max().item()


def materialize_reference(folder: Path) -> Path:
    """The reference weights, written by the folder's materialize.py into the tests' cache (tests/conftest.py:
    SVDLITE_TEST_CACHE or ~/.cache/svdlite-tests, keyed by the manifests' and materialize.py's content)."""
    manifests = sorted(folder.glob("*.weights.json"))
    if not manifests or not (folder / "materialize.py").is_file():
        raise FileNotFoundError(f"{folder} is not a reference folder (no materialize.py or *.weights.json)")
    digest = hashlib.sha256()
    for m in manifests + [folder / "materialize.py"]:
        digest.update(m.name.encode() + m.read_bytes())
    root = Path(os.environ.get("SVDLITE_TEST_CACHE", Path.home() / ".cache" / "svdlite-tests"))
    out = root / f"reference-{digest.hexdigest()[:16]}"
    if not (out / ".complete").exists():
        out.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(folder / "materialize.py"), str(out)], check=True, capture_output=True)
        (out / ".complete").write_text("ok")
    return out


class Reference:
    """A reference folder read for one device: its stored tensors and configs, and its materialized weights."""

    def __init__(self, folder: Path, device: torch.device):
        self.folder, self.device = folder, device
        self.weights = materialize_reference(folder)

    def tensors(self, name: str, on_device: bool = True) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        tensors = load_file(str(self.folder / name))
        return {k: v.to(self.device) for k, v in tensors.items()} if on_device else tensors

    def config(self, name: str) -> dict:
        return json.loads((self.folder / name).read_text())

    def unet(self):
        """The tiny UNet of the reference, loaded on the device in float32."""
        from svdlite.loading import load_unet
        from svdlite.unet import UNetConfig

        config = UNetConfig.from_dict(self.config("unet_tiny_config.json")["params"])
        return load_unet(self.weights / "unet_tiny_sgm.safetensors", config, device=self.device)

    def vae_config(self, section: str):
        from svdlite.vae import VAEConfig

        part = self.config("vae_tiny_config.json")[section]
        return VAEConfig.from_dict({**part.get("implicit_defaults", {}), **part["params"]})


class Rows(list):
    """The comparison rows, one dict each: name, kind ("close": the assert_close ratio, limit 1; "rel": max |a - b| /
    max |ref|, limit REF_REL), value, limit, rel_err, finite, passed."""

    def compare(self, name: str, got, ref, kind: str = "close") -> None:
        if kind == "close":
            value, limit = close_ratio(got, ref), 1.0
        else:
            value, limit = rel_err(got, ref), REF_REL
        r = {"name": name, "kind": kind, "value": value, "limit": limit, "rel_err": rel_err(got, ref),
             "finite": finite(got)}
        r["passed"] = (value <= limit if kind == "close" else value < limit) and r["finite"]
        self.append(r)

    def worst_block(self, name: str, got: dict, refs: dict) -> None:
        """One row for every hooked block, summarised by the block furthest from its reference."""
        if set(got) != set(refs):
            raise AssertionError(f"{name}: hooked {len(got)} modules, the reference has {len(refs)}")
        per = {k: close_ratio(got[k], refs[k]) for k in refs}
        key = max(per, key=per.get)
        self.append({"name": f"{name} ({len(per)}, worst {key})", "kind": "close", "value": per[key], "limit": 1.0,
                     "rel_err": max(rel_err(got[k], refs[k]) for k in refs),
                     "finite": all(finite(v) for v in got.values()), "passed": per[key] <= 1.0})

    def worst_step(self, what: str, got: list, refs: dict) -> None:
        """One row for a sampling run's per-step trace `what`, summarised by its worst step."""
        per = [rel_err(g, refs[f"step{k}.{what}"]) for k, g in enumerate(got)]
        k = max(range(len(per)), key=per.__getitem__)
        ok = all(finite(g) for g in got)
        self.append({"name": f"sampling every step's {what} (worst step {k})", "kind": "rel", "value": per[k],
                     "limit": REF_REL, "rel_err": per[k], "finite": ok, "passed": per[k] < REF_REL and ok})


def unet_rows(ref: Reference, unet, rows: Rows) -> None:
    """tests/test_unet_reference.py: the three cases, the context vectors precomputed, every block."""
    io = ref.tensors("unet_tiny_io.safetensors")
    t = int(io["num_video_frames"])
    with torch.no_grad():
        for case in ("main", "varctx", "ioi"):
            pre = "" if case == "main" else case + "."
            inp = {n: io.get(pre + n, io[n]) for n in ("context", "y", "image_only_indicator")}
            out = unet(io["x"], io["timesteps"], inp["context"], inp["y"], t, inp["image_only_indicator"])
            rows.compare(f"unet {case} out", out, io[pre + "out"])
        vectors = unet.context_vectors(io["context"], t)
        out = unet(io["x"], io["timesteps"], None, io["y"], t, io["image_only_indicator"], context_vectors=vectors)
        rows.compare("unet main out, context vectors precomputed", out, io["out"])
    blocks = ref.tensors("unet_tiny_blocks.safetensors", on_device=False)
    got = block_outputs(unet, blocks, lambda: unet(io["x"], io["timesteps"], io["context"], io["y"], t,
                                                    io["image_only_indicator"]))
    rows.worst_block("unet blocks", got, blocks)


def load_decoder(ref: Reference):
    """The reference's temporal VAE decoder on the device in float32."""
    from safetensors.torch import load_file

    from svdlite.vae import VideoDecoder
    from svdlite.vae_keymap import DECODER_PREFIX

    decoder = VideoDecoder(ref.vae_config("decoder"))
    sd = load_file(str(ref.weights / "vae_decoder_tiny_sgm.safetensors"))
    decoder.load_state_dict({k[len(DECODER_PREFIX):]: v for k, v in sd.items()}, strict=True)
    return decoder.eval().to(ref.device)


def decoder_rows(ref: Reference, decoder, sio: dict, rows: Rows) -> None:
    """tests/test_vae.py's decoder cases and blocks, and decode_latents on the sampling run's final latent."""
    from svdlite.vae import decode_latents

    dio = ref.tensors("vae_decoder_tiny_io.safetensors")
    td = int(dio["timesteps"])
    with torch.no_grad():
        for case in ("", "b2."):
            rows.compare(f"vae decoder {case or '1 video '}out".replace("b2.", "2 videos "),
                         decoder(dio[case + "z"], td), dio[case + "out"])
    blocks = ref.tensors("vae_decoder_tiny_blocks.safetensors", on_device=False)
    got = block_outputs(decoder, blocks, lambda: decoder(dio["z"], td))
    rows.worst_block("vae decoder blocks", got, blocks)
    tn = ref.config("sample_tiny_config.json")["guider"]["num_frames"]
    scale = ref.config("vae_tiny_config.json")["scale_factor"]
    with torch.no_grad():
        decoded = decode_latents(decoder, sio["samples"], tn, tn, scale)
    rows.compare("vae decode_latents (sampling run's decoded)", decoded, sio["decoded"])


def encoder_rows(ref: Reference, rows: Rows) -> None:
    """tests/test_vae.py's encoder: the moments, their mode, both through quant_conv."""
    from safetensors.torch import load_file

    from svdlite.vae import Encoder, make_quant_conv
    from svdlite.vae_keymap import FIRST_STAGE_ENCODER_PREFIX, QUANT_CONV_PREFIX

    enc_cfg = ref.vae_config("encoder")
    sd = load_file(str(ref.weights / "vae_encoder_tiny_sgm.safetensors"))
    encoder, quant_conv = Encoder(enc_cfg), make_quant_conv(enc_cfg)
    encoder.load_state_dict({k[len(FIRST_STAGE_ENCODER_PREFIX):]: v for k, v in sd.items()
                             if k.startswith(FIRST_STAGE_ENCODER_PREFIX)}, strict=True)
    quant_conv.load_state_dict({k[len(QUANT_CONV_PREFIX):]: v for k, v in sd.items()
                                if k.startswith(QUANT_CONV_PREFIX)}, strict=True)
    encoder, quant_conv = encoder.eval().to(ref.device), quant_conv.eval().to(ref.device)
    eio = ref.tensors("vae_encoder_tiny_io.safetensors")
    for key, value in encoder_outputs(encoder, quant_conv, eio["x"]).items():
        rows.compare(f"vae encoder {key}", value, eio[key])


def sampling_rows(ref: Reference, unet, decoder, sio: dict, rows: Rows) -> None:
    """tests/test_pipeline_reference.py: the whole 5-step sampling run, every step traced, and its decoded video."""
    from svdlite.sampling import (edm_sigmas, frame_guidance_scales, initial_latents, make_cfg_denoiser,
                                  sample_euler_edm)
    from svdlite.vae import decode_latents

    run_cfg, dev = ref.config("sample_tiny_config.json"), ref.device
    tn = run_cfg["guider"]["num_frames"]
    context = torch.cat([sio["uc.crossattn"], sio["cond.crossattn"]])
    vector = torch.cat([sio["uc.vector"], sio["cond.vector"]])
    net_out, steps = [], []
    with torch.no_grad():
        vectors = unet.context_vectors(context, tn)

        def network(net_in, c_noise):
            out = unet(net_in, c_noise, None, vector, tn, sio["image_only_indicator"], context_vectors=vectors)
            net_out.append(out)
            return out

        d = run_cfg["discretization"]
        sigmas = edm_sigmas(run_cfg["sampler"]["num_steps"], d["sigma_min"], d["sigma_max"], d["rho"]).to(dev)
        scales = frame_guidance_scales(tn, run_cfg["guider"]["min_scale"], run_cfg["guider"]["max_scale"]).to(dev)
        denoise = make_cfg_denoiser(network, torch.cat([sio["uc.concat"], sio["cond.concat"]]), scales)
        samples = sample_euler_edm(denoise, initial_latents(sio["randn"], sigmas), sigmas,
                                   callback=lambda info: steps.append(info))
        decoded = decode_latents(decoder, samples, tn, tn, ref.config("vae_tiny_config.json")["scale_factor"])
    if len(steps) != run_cfg["sampler"]["num_steps"]:
        raise AssertionError(f"the sampling run took {len(steps)} steps, the reference "
                             f"{run_cfg['sampler']['num_steps']}")
    for what, got in (("x", [s["x"] for s in steps]), ("net_out", net_out),
                      ("denoised", [s["denoised"] for s in steps])):
        rows.worst_step(what, got, sio)
    rows.compare("sampling final latent", samples, sio["samples"], "rel")
    rows.compare("sampling decoded video", decoded, sio["decoded"], "rel")


def reference_checks(folder: Path, device: torch.device) -> list[dict]:
    """The tests' reference comparisons, run on `device` in float32 (the caller turns TF32 off). One row per
    comparison (per-block ones summarised by their worst block)."""
    ref = Reference(Path(folder).resolve(), device)
    rows = Rows()
    unet = ref.unet()
    unet_rows(ref, unet, rows)
    decoder = load_decoder(ref)
    sio = ref.tensors("sample_tiny_io.safetensors")
    decoder_rows(ref, decoder, sio, rows)
    encoder_rows(ref, rows)
    sampling_rows(ref, unet, decoder, sio, rows)
    return list(rows)


def default_tf32_unet(folder: Path, device: torch.device) -> dict:
    """The reference UNet's main case with torch's default float32 settings (on a GPU: cuDNN convolutions in TF32),
    to show what they cost against the reference; on the CPU the same as with TF32 off."""
    ref = Reference(Path(folder).resolve(), device)
    unet = ref.unet()
    io = ref.tensors("unet_tiny_io.safetensors")
    with torch.no_grad():
        o = unet(io["x"], io["timesteps"], io["context"], io["y"], int(io["num_video_frames"]),
                 io["image_only_indicator"])
    try:
        legacy = torch.backends.cudnn.allow_tf32
    except RuntimeError as err:  # torch may refuse the legacy flag once the new API was used
        legacy = f"unreadable: {err}"
    return {"close_ratio": close_ratio(o, io["out"]), "rel_err": rel_err(o, io["out"]),
            "cudnn_conv_fp32_precision": getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None),
            "cudnn_allow_tf32": legacy}


if __name__ == "__main__":
    sys.exit("tools/gpu_reference.py is a module of tools/gpu_check.py, not a command: python tools/gpu_check.py "
             "--help")
