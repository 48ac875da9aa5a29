"""Preset downloads: which files are fetched (fp16 first, only the three components) and the error messages.

No network is used: offline mode is forced, and the Hub client is replaced by a stub that records requests."""
from pathlib import Path

import pytest

from svdlite import hub
from svdlite.components import load_model


class Recorder:
    def __init__(self, root: Path, missing=(), error=None):
        self.root, self.missing, self.error, self.calls = root, set(missing), error, []

    def __call__(self, repo_id, filename, token=None, cache_dir=None):
        from huggingface_hub.errors import EntryNotFoundError

        self.calls.append((repo_id, filename, token))
        if self.error is not None:
            raise self.error
        if filename in self.missing:
            raise EntryNotFoundError(f"{filename} not found")
        path = self.root / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        return str(path)


def test_downloads_only_the_needed_files_fp16_first(tmp_path, monkeypatch):
    rec = Recorder(tmp_path, missing={"image_encoder/model.fp16.safetensors"})
    monkeypatch.setattr("huggingface_hub.hf_hub_download", rec)
    root = hub.download_preset("svd-xt", token="tok")
    assert root == tmp_path
    assert [c[1] for c in rec.calls] == [
        "unet/diffusion_pytorch_model.fp16.safetensors", "unet/config.json",
        "vae/diffusion_pytorch_model.fp16.safetensors", "vae/config.json",
        "image_encoder/model.fp16.safetensors", "image_encoder/model.safetensors", "image_encoder/config.json"]
    assert {c[0] for c in rec.calls} == {"stabilityai/stable-video-diffusion-img2vid-xt"}
    assert {c[2] for c in rec.calls} == {"tok"}


def test_gated_repo_message(tmp_path, monkeypatch):
    from huggingface_hub.errors import GatedRepoError

    class Response:  # the minimal response object huggingface_hub's HTTP errors carry
        status_code, headers, request, url = 401, {}, None, "https://huggingface.co"

    try:
        err = GatedRepoError("gated", response=Response())
    except TypeError:
        err = GatedRepoError("gated")
    monkeypatch.setattr("huggingface_hub.hf_hub_download", Recorder(tmp_path, error=err))
    with pytest.raises(hub.DownloadError, match="gated: accept its license"):
        hub.download_preset("svd-xt-1.1")


def test_offline_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setattr("huggingface_hub.hf_hub_download", Recorder(tmp_path, error=LocalEntryNotFoundError("offline")))
    with pytest.raises(hub.DownloadError, match="unreachable .* not in the local Hugging Face cache"):
        load_model("svd")


def test_real_client_offline_gives_the_clear_message(monkeypatch, tmp_path):
    """The real huggingface_hub in offline mode with an empty cache: no network, one clear error."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read once at import
    with pytest.raises(hub.DownloadError, match=r"unet/diffusion_pytorch_model.fp16.safetensors or .*unreachable"):
        hub.download_preset("svd", cache_dir=tmp_path)


def test_unknown_preset():
    with pytest.raises(ValueError, match="no downloadable preset 'tiny'"):
        hub.download_preset("tiny")
