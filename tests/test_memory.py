"""The decode chunk chosen from the memory accounting when none is given: the preset's when the GPU has room, fewer
frames (and a warning) when it has not, never fewer than 1, and never a change when the user gave a chunk size. The
machine has no GPU: the free memory is faked through `svdlite.pipeline.gpu_free_bytes`."""
import pytest
import torch

from svdlite import generate, load_model
from svdlite.memory import HEADROOM, decode_bytes, decode_chunk_for

from helpers import load_tool

SMALL = dict(num_frames=6, num_inference_steps=1, height=64, width=64)
PER_FRAME = decode_bytes(1, 64, 64)


def test_chunk_arithmetic():
    gib = 2**30
    # SVD-XT at 1024x576 (docs/memory.md): 1.58 GiB for one frame, 12.6 for 14 (counted: 1.57, 11.82)
    assert decode_chunk_for(None, 576, 1024, 14) == 14  # the CPU: the preset's
    assert decode_chunk_for(80 * gib, 576, 1024, 14) == 14
    assert decode_bytes(7, 576, 1024) <= 8 * gib * HEADROOM < decode_bytes(8, 576, 1024)
    assert decode_chunk_for(8 * gib, 576, 1024, 14) == 7
    assert decode_chunk_for(1, 576, 1024, 14) == 1
    assert 1.55 < decode_bytes(1, 576, 1024) / gib < 1.6 and 12.5 < decode_bytes(14, 576, 1024) / gib < 12.6


@pytest.mark.parametrize("chunk", [1, 4, 14])
def test_decode_bytes_bound_the_count(chunk):
    """The figure is an upper bound within 20% of tools/count_memory.py's count of the decoder on the GPU's path."""
    counted = load_tool("count_memory").count_decode("svdlite", 14, 320, 512, chunk, torch.float16)["peak"]
    assert counted <= decode_bytes(chunk, 320, 512) <= 1.2 * counted


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu", dtype=torch.float32)


def decoded_chunks(monkeypatch, tiny, free, **options):
    chunks = []
    original = tiny.vae_decoder.forward
    monkeypatch.setattr(tiny.vae_decoder, "forward", lambda z, n: (chunks.append(n), original(z, n))[1])
    monkeypatch.setattr("svdlite.pipeline.gpu_free_bytes", lambda device: free)
    video = generate("svdlite/assets/example.png", model=tiny, seed=0, progress=False, **SMALL, **options)
    return chunks, video


def test_decode_chunk_follows_free_memory(monkeypatch, tiny):
    chunks, plain = decoded_chunks(monkeypatch, tiny, None)  # the preset's chunk (tiny: 6 frames at once)
    assert chunks == [6]
    with pytest.warns(UserWarning, match="decoding 2 frame\\(s\\) at a time instead of 6"):
        chunks, small = decoded_chunks(monkeypatch, tiny, int(2.5 * PER_FRAME / HEADROOM))
    assert chunks == [2, 2, 2] and torch.equal(plain.latents, small.latents)
    chunks, given = decoded_chunks(monkeypatch, tiny, 1, decode_chunk_size=3)  # given: kept, whatever is free
    assert chunks == [3, 3]
