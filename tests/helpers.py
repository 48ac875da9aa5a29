"""Test helpers: synthetic checkpoints in the original sgm layout, made from a config (nothing downloaded), the
tools/ scripts as modules, and where the full-size key tables live (tests/keymaps)."""
import importlib.util
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from svdlite import UNetConfig
from svdlite.testing import original_unet_shapes, random_tensors
from svdlite.unet_keymap import ORIGINAL_PREFIX

__all__ = ["KEYMAPS", "TINY", "load_tool", "original_unet_shapes", "random_tensors", "write_original_unet"]

TOOLS = Path(__file__).resolve().parents[1] / "tools"
# Full-size key tables of SVD, one row per tensor of the original file: sgm key, shape (and the diffusers key)
KEYMAPS = Path(__file__).resolve().parent / "keymaps"


def load_tool(name: str):
    """tools/<name>.py as a module (the tools are scripts, not a package). Its plain imports of the tools' shared
    modules (`import benchlib`, `import bench_unet`) resolve as when it runs as `python tools/<name>.py`, where
    Python looks in tools/ first: tools/ is put on the import path (last, so it shadows nothing)."""
    if str(TOOLS) not in sys.path:
        sys.path.append(str(TOOLS))
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_original_unet(path, config: UNetConfig, seed: int = 0, dtype=torch.float32, edit=None) -> dict:
    """Write an original-layout single file (`model.diffusion_model.*`); `edit(dict)` may alter it first."""
    tensors = {ORIGINAL_PREFIX + k: v for k, v in random_tensors(original_unet_shapes(config), seed, dtype).items()}
    if edit is not None:
        edit(tensors)
    save_file(tensors, str(path))
    return tensors


TINY = UNetConfig(model_channels=32, channel_mult=(1, 2), num_head_channels=16, context_dim=24, adm_in_channels=12,
                  attention_resolutions=(1,))
