"""docs/errors.md "Inputs and what svdlite says": every row is run here through `svdlite generate` / `svdlite info`
(in-process `cli.main`), and must be refused with exit code 2 and its message before any model is loaded.
A last test checks that each row's message is the one the docs table shows."""
import json
import pickle
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import svdlite
from svdlite import cli, errors

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = Path(svdlite.__file__).parent / "assets" / "example.png"
TINY = Path(svdlite.__file__).parent / "assets" / "tiny.safetensors"


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels but holds no image data (nothing to decode)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def tiny_without(prefix: str):
    """The bundled tiny model's tensors and metadata, minus the tensors under `prefix`."""
    with safe_open(str(TINY), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if not k.startswith(prefix)}, f.metadata()


def make(kind: str, tmp: Path) -> Path:
    """Write the bad input of one row; returns its path."""
    path = tmp / kind
    if kind == "text.png":
        path.write_text("not an image")
    elif kind == "photo.jpg":
        Image.open(EXAMPLE).convert("RGB").save(path, format="JPEG")
    elif kind == "empty.png":
        path.write_bytes(b"")
    elif kind == "truncated.png":
        path.write_bytes(EXAMPLE.read_bytes()[:2000])
    elif kind == "huge.png":
        path.write_bytes(png_claiming(12000, 12000))
    elif kind == "float.tiff":
        Image.fromarray(torch.full((64, 64), 3.0).numpy(), mode="F").save(path)
    elif kind == "model.ckpt":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    elif kind == "model.pkl.bin":
        path.write_bytes(pickle.dumps({"w": [0.0]}, protocol=4))
    elif kind == "half.safetensors":
        data = TINY.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "header.safetensors":
        data = TINY.read_bytes()
        path.write_bytes(data[:8] + b"#" + data[9:])
    elif kind == "sizes.safetensors":  # header entry whose offsets disagree with dtype x shape
        header = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}
        raw = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    elif kind == "ints.safetensors":
        tensors, meta = tiny_without("-")  # nothing left out
        tensors["unet.out.2.bias"] = tensors["unet.out.2.bias"].to(torch.int32)
        save_file(tensors, str(path), metadata=meta)
    elif kind == "noclip.safetensors":
        tensors, meta = tiny_without("image_encoder.")
        save_file(tensors, str(path), metadata={**meta, "components": "unet,vae_encoder,vae_decoder"})
    elif kind == "lora.safetensors":
        save_file({"lora_unet_down.alpha": torch.ones(1)}, str(path))
    elif kind == "sd15.safetensors":
        save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
                   "model.diffusion_model.out.2.weight": torch.zeros(4, 320, 3, 3)}, str(path))
    elif kind == "diffusers":
        (path / "unet").mkdir(parents=True)
        save_file({"conv_in.weight": torch.zeros(1), "down_blocks.0.temporal_x": torch.zeros(1)},
                  str(path / "unet" / "diffusion_pytorch_model.safetensors"))
    elif kind == "exists.mp4":
        path.write_bytes(b"precious")
    elif kind == "folder.mp4":
        path.mkdir()
    elif kind == "nofolder":
        path = tmp / "nofolder" / "out.mp4"
    else:
        raise AssertionError(kind)
    return path


# (row id, what is tried, command line with {bad} for the made input, message fragment). Message fragments appear
# verbatim in the docs/errors.md table.
ROWS = [
    ("missing image", "a missing image file", "generate {tmp}/none.png -o {out}", "not found"),
    ("not an image", "a text file named .png", "generate {bad} -o {out}", "is not an image PIL can read"),
    ("empty image", "a zero-byte image", "generate {bad} -o {out}", "is empty (0 bytes)"),
    ("truncated image", "a truncated PNG", "generate {bad} -o {out}", "is corrupt or truncated"),
    ("huge image", "a PNG of 12000x12000 pixels", "generate {bad} -o {out}", "svdlite reads images of at most"),
    ("float image", "a float (F) image with values above 1", "generate {bad} -o {out}", "values must lie in [0, 1]"),
    ("output exists", "an output file that exists", "generate {example} -o {bad}", "exists; pass overwrite=True (CLI: --force)"),
    ("output folder", "an output path that is a folder", "generate {example} -o {bad}", "is a folder; expected a file"),
    ("no folder", "an output folder that does not exist", "generate {example} -o {bad}", "does not exist; create it first"),
    ("avi", "an unknown output suffix", "generate {example} -o {tmp}/x.avi", "unknown video suffix '.avi'"),
    ("fps 0", "--fps 0", "generate {example} -o {out} --fps 0", "fps must be a positive int, got 0"),
    ("frames 0", "--num-frames 0", "generate {example} -o {out} --num-frames 0", "num_frames must be a positive int"),
    ("steps -3", "--steps -3", "generate {example} -o {out} --steps -3", "num_inference_steps must be a positive int"),
    ("chunk 0", "--decode-chunk-size 0", "generate {example} -o {out} --decode-chunk-size 0", "decode_chunk_size must be a positive int"),
    ("aug nan", "--noise-aug-strength nan", "generate {example} -o {out} --noise-aug-strength nan", "noise_aug_strength must be a finite number, got nan"),
    ("aug negative", "--noise-aug-strength -1", "generate {example} -o {out} --noise-aug-strength -1", "noise_aug_strength must be >= 0"),
    ("guidance nan", "--max-guidance nan", "generate {example} -o {out} --max-guidance nan", "max_guidance_scale must be a finite number"),
    ("guidance order", "--min-guidance 3 --max-guidance 1", "generate {example} -o {out} --min-guidance 3 --max-guidance 1", "is above max_guidance_scale"),
    ("motion negative", "--motion-bucket-id -5", "generate {example} -o {out} --motion-bucket-id -5", "motion_bucket_id must be >= 0"),
    ("height 100", "--height 100", "generate {example} -o {out} --height 100", "height must be a positive multiple of 64, got 100"),
    ("width 0", "--width 0", "generate {example} -o {out} --width 0", "width must be a positive multiple of 64, got 0"),
    ("seed negative", "--seed -1", "generate {example} -o {out} --seed -1", "seed must be an int in [0, 2**64)"),
    ("seed huge", "--seed 2**64", "generate {example} -o {out} --seed 18446744073709551616", "seed must be an int in [0, 2**64)"),
    ("cut > steps", "--guidance-cut-step 9 --steps 4", "generate {example} -o {out} --steps 4 --guidance-cut-step 9", "guidance_cut_step must be in [0, 4]"),
    ("device foo", "--device foo", "generate {example} -o {out} --device foo", "unknown device 'foo'"),
    ("device cuda:7", "--device cuda:7 (no such GPU)", "generate {example} -o {out} --device cuda:7", "device 'cuda:7' asked, but"),
    ("zip pickle", "a torch.save .ckpt", "info {bad}", "is a PyTorch zip/pickle checkpoint (torch.save), not safetensors"),
    ("raw pickle", "a raw pickle .bin", "info {bad}", "is a pickle file, not safetensors"),
    ("truncated ckpt", "a half-downloaded .safetensors", "info {bad}", "is truncated: its tensors end at byte"),
    ("corrupt header", "a corrupted header", "info {bad}", "has a corrupt safetensors header (not valid JSON"),
    ("bad offsets", "header offsets that disagree with the shapes", "info {bad}", "would take 16 bytes, its offsets give 8"),
    ("int tensors", "an integer tensor where a weight belongs", "generate {example} -o {out} --model {bad}", "are not floating point, expected F32, F16 or BF16"),
    ("no clip", "an svdlite file without the image encoder", "generate {example} -o {out} --model {bad}", "without image_encoder"),
    ("unrelated", "a file of unrelated tensors (a LoRA)", "info {bad}", "no SVD UNet found"),
    ("sd15", "a Stable Diffusion image checkpoint", "info {bad}", "it is a Stable Diffusion image UNet, not Stable Video Diffusion"),
    ("diffusers", "a diffusers folder without vae/ and image_encoder/", "generate {example} -o {out} --model {bad}", "is not a complete diffusers SVD folder: no weights in vae/, image_encoder/"),
    ("image as model", "a photo passed as --model", "generate {example} -o {out} --model {bad}", "is not a safetensors checkpoint (a JPEG image, first bytes ff d8 ff"),
    ("image info", "svdlite info on a photo", "info {bad}", "is not a safetensors checkpoint (a JPEG image"),
    ("no model", "a model that is neither a file nor a preset", "generate {example} -o {out} --model nope", "no such file or folder, and not a preset"),
]
BAD = {"not an image": "text.png", "empty image": "empty.png", "truncated image": "truncated.png",
       "huge image": "huge.png", "float image": "float.tiff", "output exists": "exists.mp4",
       "output folder": "folder.mp4", "no folder": "nofolder", "zip pickle": "model.ckpt",
       "raw pickle": "model.pkl.bin", "truncated ckpt": "half.safetensors", "corrupt header": "header.safetensors",
       "bad offsets": "sizes.safetensors", "int tensors": "ints.safetensors", "no clip": "noclip.safetensors",
       "unrelated": "lora.safetensors", "sd15": "sd15.safetensors", "diffusers": "diffusers",
       "image as model": "photo.jpg", "image info": "photo.jpg"}
LOADS_CHECKPOINT = {"int tensors"}  # refused while loading (tensor dtypes are read from the header), before sampling


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_row(row, tmp_path, monkeypatch, capsys):
    name, _, command, message = row
    bad = make(BAD[name], tmp_path) if name in BAD else None
    argv = command.format(tmp=tmp_path, bad=bad, out=tmp_path / "out.mp4", example=EXAMPLE).split()
    if "--model" not in argv and argv[0] == "generate":
        argv += ["--model", "tiny"]
    if name not in LOADS_CHECKPOINT:
        monkeypatch.setattr("svdlite.components.load_component",
                            lambda *a, **k: pytest.fail("a model component was loaded before the error"))
    monkeypatch.setattr("svdlite.pipeline.make_denoiser", lambda *a, **k: pytest.fail("sampling started"))
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == errors.EXIT_REFUSED, err
    assert message in err and err.startswith("svdlite: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "out.mp4").exists()


def test_docs_table_shows_every_row():
    table = (REPO / "docs" / "errors.md").read_text()
    lines = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| ")}
    for name, tried, _, message in ROWS:
        assert f"| {tried}" in lines, f"docs/errors.md has no row | {tried} | for {name!r}"
        assert message in lines[f"| {tried}"], f"docs/errors.md row | {tried} | does not show {message!r}"
