"""generate() on a list of images: batch_size videos per UNet evaluation, per-image seeds, and the same videos as
one at a time."""
from pathlib import Path

import pytest
import torch
from PIL import Image

import svdlite
from svdlite.components import load_model
from svdlite.pipeline import generate

EXAMPLE = Path(svdlite.__file__).parent / "assets" / "example.png"
# 128x128 keeps the deepest feature map at 2x2: at 64x64 it is 1x1, where a GroupNorm group holds one value and
# divides rounding noise by sqrt(eps) (batched vs single then differ by 1.7e-4 relative instead of ~3e-6)
SETTINGS = dict(num_frames=3, num_inference_steps=3, height=128, width=128, progress=False)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.fixture(scope="module")
def images():
    ex = Image.open(EXAMPLE).convert("RGB")
    return [ex, ex.transpose(Image.FLIP_LEFT_RIGHT), ex.rotate(90)]


def unet_rows(model):
    """Record the rows of every UNet call (a test-only hook)."""
    rows = []
    handle = model.unet.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    return rows, handle


def test_batched_equals_one_at_a_time(tiny, images):
    """Same seeds, batch_size 2 (batches of 2 + 1) vs three single runs. Measured on the tiny model (3 frames,
    128x128, 3 steps): final latents 3.1e-6 relative (max |diff| / max |single|; up to 3.4e-6 for batch sizes 2-4,
    also with the guidance cut or step caching), frames off by at most one uint8 level."""
    rows, handle = unet_rows(tiny)
    try:
        batched = generate(images, model=tiny, seed=[4, 9, 2], batch_size=2, **SETTINGS)
    finally:
        handle.remove()
    single = [generate(im, model=tiny, seed=s, **SETTINGS) for im, s in zip(images, (4, 9, 2))]
    assert rows == [2 * 2 * 3] * 3 + [2 * 1 * 3] * 3  # 2 videos, then 1, both guidance halves, 3 frames, 3 steps
    assert [v.seed for v in batched] == [4, 9, 2] and [v.seed for v in single] == [4, 9, 2]
    for b, s in zip(batched, single):
        rel = ((b.latents - s.latents).abs().max() / s.latents.abs().max()).item()
        assert rel < 2e-5, rel
        assert (b.frames.int() - s.frames.int()).abs().max() <= 1
        assert b.frames.shape == s.frames.shape == (3, 128, 128, 3)


def test_a_list_of_one_is_the_single_run_bit_for_bit(tiny, images):
    single = generate(images[0], model=tiny, seed=3, **SETTINGS)
    listed = generate(images[:1], model=tiny, seed=3, **SETTINGS)
    assert isinstance(single, svdlite.Video) and isinstance(listed, list) and len(listed) == 1
    assert torch.equal(single.frames, listed[0].frames) and torch.equal(single.latents, listed[0].latents)


def test_seeds_are_per_image(tiny, images):
    """One seed s gives image k the seed s + k; the same image with two seeds gives two videos; a video's seed,
    not its place in the batch, decides it."""
    same = [images[0], images[0]]
    videos = generate(same, model=tiny, seed=7, batch_size=2, **SETTINGS)
    assert [v.seed for v in videos] == [7, 8]
    assert not torch.allclose(videos[0].latents, videos[1].latents, atol=1e-2)
    alone = generate(images[0], model=tiny, seed=8, **SETTINGS)
    assert torch.allclose(videos[1].latents, alone.latents, rtol=0, atol=2e-5 * alone.latents.abs().max().item())
    twice = generate(same, model=tiny, seed=[5, 5], batch_size=2, **SETTINGS)
    assert torch.allclose(twice[0].latents, twice[1].latents, rtol=0, atol=1e-6 * twice[0].latents.abs().max())


def test_batch_arguments_are_checked(tiny, images):
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        generate(images, model=tiny, batch_size=0, **SETTINGS)
    with pytest.raises(ValueError, match="seed for a list of 3 images must be a list of 3"):
        generate(images, model=tiny, seed=[1, 2], **SETTINGS)
    with pytest.raises(ValueError, match="latents for a list of 3 images"):
        generate(images, model=tiny, latents=torch.zeros(3, 4, 16, 16), **SETTINGS)
    with pytest.raises(ValueError, match="seed must be an int"):
        generate(images[:1], model=tiny, seed=["1"], **SETTINGS)
