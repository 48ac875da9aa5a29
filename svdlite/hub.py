"""Fetching a preset's weights from the Hugging Face Hub: only the files svdlite reads, fp16 variants first.

The diffusers folders of the Stability repositories hold the three components svdlite needs in float16
(unet 3.05 GB, vae 196 MB, image_encoder 1.26 GB), against 9.56 GB for the original fp32 single file, so
a preset downloads `unet/`, `vae/` and `image_encoder/` (weights + config.json) and nothing else.
"""
from pathlib import Path

from .presets import PRESETS, Preset

# (folder, weight file names in order of preference, config)
COMPONENT_FILES = (
    ("unet", ("diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors"), "config.json"),
    ("vae", ("diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors"), "config.json"),
    ("image_encoder", ("model.fp16.safetensors", "model.safetensors"), "config.json"),
)


class DownloadError(RuntimeError):
    """The Hub could not provide a preset's files (offline, not authorised, not found)."""


def _explain(preset: Preset, filename: str, err: Exception) -> DownloadError:
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    url = f"https://huggingface.co/{preset.repo_id}"
    if isinstance(err, GatedRepoError):
        return DownloadError(f"{preset.repo_id} is gated: accept its license at {url} while logged in, then pass "
                             "token=... (CLI: set HF_TOKEN or run `huggingface-cli login`)")
    if isinstance(err, RepositoryNotFoundError):
        return DownloadError(f"{preset.repo_id} not found or not authorised with the given token ({url})")
    if isinstance(err, LocalEntryNotFoundError):
        return DownloadError(f"cannot download {preset.repo_id}/{filename}: the Hub is unreachable (offline or "
                             "HF_HUB_OFFLINE=1) and the file is not in the local Hugging Face cache. Download it "
                             "elsewhere or pass a local checkpoint path as the model")
    return DownloadError(f"downloading {preset.repo_id}/{filename} failed: {err}")


def download_preset(name: str, *, token: str | None = None, cache_dir=None) -> Path:
    """Download (or find in the cache) a preset's diffusers components; returns the local pipeline folder."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    if name not in PRESETS or not PRESETS[name].repo_id:
        raise ValueError(f"no downloadable preset {name!r}; choose one of "
                         f"{sorted(k for k, p in PRESETS.items() if p.repo_id)}")
    preset = PRESETS[name]
    root = None
    for folder, weight_names, config in COMPONENT_FILES:
        path = None
        for weights in weight_names:  # fp16 first; a missing variant (or one absent from the cache) falls through
            try:
                path = hf_hub_download(preset.repo_id, f"{folder}/{weights}", token=token, cache_dir=cache_dir)
                break
            except EntryNotFoundError as err:
                last = err
            except Exception as err:  # noqa: BLE001 - translated into one clear message
                raise _explain(preset, f"{folder}/{weights}", err) from err
        if path is None:
            raise _explain(preset, " or ".join(f"{folder}/{w}" for w in weight_names), last) from last
        try:
            hf_hub_download(preset.repo_id, f"{folder}/{config}", token=token, cache_dir=cache_dir)
        except Exception as err:  # noqa: BLE001
            raise _explain(preset, f"{folder}/{config}", err) from err
        root = Path(path).parents[1]
    return root
