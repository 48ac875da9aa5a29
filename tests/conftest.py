"""Shared fixtures. Reference data: tests/reference (described by its README.md), or the folder named by
SVDLITE_REFERENCE_DIR, laid out alike. Its weight files are not stored: the folder's own materialize.py writes them
from the manifests into a cache outside the repository (SVDLITE_TEST_CACHE, default ~/.cache/svdlite-tests), keyed
by the manifests' and materialize.py's content, so a changed folder is rebuilt. A missing or incomplete folder is a
test failure, never a skip.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


DEFAULT_REFERENCE_DIR = Path(__file__).resolve().parent / "reference"


class Reference:
    """Read access to one reference folder: JSON configs, tensor files and materialized weight files."""

    def __init__(self, folder: Path, weights: Path):
        self.folder, self.weights_dir = folder, weights

    def json(self, name: str) -> dict:
        return json.loads((self.folder / name).read_text())

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.folder / name))

    def tensors_at(self, path: Path) -> dict[str, torch.Tensor]:
        return load_file(str(path))

    def weights(self, name: str) -> Path:
        path = self.weights_dir / name
        assert path.is_file(), f"materialize.py did not write {path}"
        return path


def _materialize(folder: Path) -> Path:
    manifests = sorted(folder.glob("*.weights.json"))
    assert manifests, f"{folder} has no *.weights.json manifests"
    digest = hashlib.sha256()
    for m in manifests + [folder / "materialize.py"]:
        digest.update(m.name.encode() + m.read_bytes())
    cache_root = Path(os.environ.get("SVDLITE_TEST_CACHE", Path.home() / ".cache" / "svdlite-tests"))
    out = cache_root / f"reference-{digest.hexdigest()[:16]}"
    done = out / ".complete"
    if not done.exists():
        out.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(folder / "materialize.py"), str(out)], check=True, capture_output=True)
        done.write_text("ok")
    return out


@pytest.fixture(scope="session")
def reference() -> Reference:
    folder = Path(os.environ.get("SVDLITE_REFERENCE_DIR", DEFAULT_REFERENCE_DIR)).resolve()
    if not (folder / "materialize.py").is_file():
        pytest.fail(f"reference folder {folder} not found or incomplete (no materialize.py); "
                    f"set SVDLITE_REFERENCE_DIR to a folder laid out like {DEFAULT_REFERENCE_DIR}")
    return Reference(folder, _materialize(folder))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute difference divided by the reference's max magnitude."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()




@pytest.fixture
def fail_open_clip_import(monkeypatch):
    """fail(message): from then on, importing open_clip raises RuntimeError(message), as it does when the installed
    torchvision was built for another torch ("operator torchvision::nms does not exist")."""
    import builtins

    real_import = builtins.__import__

    def fail(message: str) -> None:
        def failing_import(name, *args, **kwargs):
            if name.split(".")[0] == "open_clip":
                raise RuntimeError(message)
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", failing_import)

    return fail
