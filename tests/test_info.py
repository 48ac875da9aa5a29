"""`svdlite info` and the checks every checkpoint goes through before a tensor is read: a file that is not
safetensors (an image, a text file, a web page, a Git LFS pointer, random bytes), an empty, truncated or corrupt
one, each refused with a CheckpointError (exit code 2) saying what it is and what was expected; `info`'s lines as a
person reads them (sampling defaults, where a converted file comes from); `load_model`'s dtype rule and progress bar.
"""
import json
import struct
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import svdlite
from svdlite import cli, errors
from svdlite.checkpoint_file import EXPECTED, CheckpointError, read_header
from svdlite.checks import resolve_dtype
from svdlite.components import load_model
from svdlite.formats import open_model_source
from svdlite.info import describe, describe_sampling
from svdlite.read_plans import component_bytes
from svdlite.tensor_source import TensorSource
from svdlite.presets import PRESETS

TINY_FILE = Path(svdlite.__file__).parent / "assets" / "tiny.safetensors"
EXAMPLE = Path(svdlite.__file__).parent / "assets" / "example.png"


def write_jpeg(path: Path) -> Path:
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path, format="JPEG")
    return path


# (file name, its bytes (or a writer), what the refusal says it looks like)
NOT_SAFETENSORS = [
    ("photo.jpg", write_jpeg, "a JPEG image, first bytes ff d8 ff"),
    ("image.png", lambda p: p.write_bytes(EXAMPLE.read_bytes()), "a PNG image, first bytes 89 50 4e 47"),
    ("notes.txt", lambda p: p.write_text("these are the weights, I promise\n"),
     "a text file, starting 'these are the weights, I promise'"),
    ("model.safetensors", lambda p: p.write_text("<!DOCTYPE html>\n<html><head><title>Sign in</title>"),
     "an HTML page, starting '<!DOCTYPE html> <html><head><title>Sign': a web page"),
    ("svd_xt.safetensors", lambda p: p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\n"
                                                  "size 9559625880\n"),
     "a Git LFS pointer, a small text file standing for the weights"),
    ("model_index.json", lambda p: p.write_text(json.dumps({"_class_name": "StableVideoDiffusionPipeline"})),
     "a JSON or other text file, starting '{\"_class_name\""),
    ("noise.safetensors", lambda p: p.write_bytes(bytes(range(255, 155, -1))),
     "its first 8 bytes, ff fe fd fc fb fa f9 f8, read as a header length give 17,940,646,550,795,321,087 bytes, "
     "more than the file's 100"),
    ("hi.safetensors", lambda p: p.write_bytes(b"hi\n"), "a text file, starting 'hi'"),
    ("three.safetensors", lambda p: p.write_bytes(b"\x00\x01\x02"), "3 bytes long, too short for the 8-byte header"),
]


def make(tmp_path: Path, name: str, writer) -> Path:
    path = tmp_path / name
    writer(path)
    return path


@pytest.mark.parametrize("name,writer,looks", NOT_SAFETENSORS, ids=[row[0] for row in NOT_SAFETENSORS])
def test_a_file_that_is_not_safetensors_is_refused_with_what_it_looks_like(tmp_path, name, writer, looks):
    path = make(tmp_path, name, writer)
    with pytest.raises(CheckpointError) as info:
        read_header(path)
    message = str(info.value)
    assert message.startswith(f"{path} is not a safetensors checkpoint (") and f"({looks}" in message, message
    assert f"); {EXPECTED}" in message, message
    for opener in (TensorSource, describe, load_model):  # the one header check every way in goes through
        with pytest.raises(CheckpointError, match="is not a safetensors checkpoint"):
            opener([path] if opener is TensorSource else path)


def test_the_refusal_says_what_was_expected():
    assert EXPECTED == ("expected an original SVD .safetensors file, a diffusers folder or an svdlite converted "
                        "file")


def test_a_json_file_is_told_to_pass_the_folder(tmp_path):
    path = make(tmp_path, "model_index.json", lambda p: p.write_text('{"_class_name": "x"}'))
    with pytest.raises(CheckpointError, match="; for a diffusers model, pass its folder$"):
        read_header(path)


def test_info_on_an_image_exits_2_with_one_line(tmp_path, capsys):
    path = write_jpeg(tmp_path / "photo.jpg")
    for argv in (["info", str(path)], ["generate", str(EXAMPLE), "-o", str(tmp_path / "out.mp4"), "--model",
                                       str(path), "--seed", "0"]):
        assert cli.main(argv) == errors.EXIT_REFUSED
        err = capsys.readouterr().err
        line = (f"svdlite: error: {path} is not a safetensors checkpoint (a JPEG image, first bytes ff d8 ff e0 00 10 "
                f"4a 46); {EXPECTED}\n")
        assert err.endswith(line) and err.count("svdlite: error") == 1, err
        assert "header length" not in err
    assert not (tmp_path / "out.mp4").exists()


def tiny_tensors() -> tuple[dict, dict]:
    with safe_open(str(TINY_FILE), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_empty_truncated_and_corrupt_files_say_what_is_wrong(tmp_path):
    data = TINY_FILE.read_bytes()
    length = int.from_bytes(data[:8], "little")
    cases = {
        "empty.safetensors": (b"", "is empty (0 bytes), not a safetensors checkpoint (an incomplete download or "
                                   f"copy?); {EXPECTED}"),
        "head.safetensors": (data[:100], f"is truncated: its header needs {8 + length:,} bytes, the file has 100 "
                                         "(incomplete download or copy?); download or copy it again"),
        "eight.safetensors": (data[:8], f"is truncated: its header needs {8 + length:,} bytes, the file has 8"),
        "half.safetensors": (data[:len(data) // 2], "is truncated: its tensors end at byte"),
        "notjson.safetensors": (struct.pack("<Q", 10) + b"not json!!" + bytes(16),
                                "has a corrupt safetensors header (not valid JSON: Expecting value: line 1 column 1 "
                                "(char 0)); download or copy it again"),
        "list.safetensors": (struct.pack("<Q", 2) + b"[]", "has a corrupt safetensors header (a JSON list, expected "
                                                           "an object)"),
        "meta.safetensors": (struct.pack("<Q", 24) + b'{"__metadata__": {"a":1}}'[:24],
                             "has a corrupt safetensors header"),
    }
    for name, (content, said) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CheckpointError) as info:
            TensorSource([path])
        assert str(info.value).startswith(f"{path} ") and said in str(info.value), (name, str(info.value))
    path = tmp_path / "meta2.safetensors"
    header = b'{"__metadata__":{"a":1}}'
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match=r"__metadata__ is not a table of strings"):
        read_header(path)


def test_a_pickle_suffix_with_unknown_bytes_gets_the_conversion_advice(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(bytes(range(200, 100, -1)))
    with pytest.raises(CheckpointError, match="is not a safetensors checkpoint .*; convert it once, if you trust it"):
        read_header(path)


def test_a_good_file_gives_its_header_and_where_its_data_starts():
    header, base = read_header(TINY_FILE)
    assert base == 8 + int.from_bytes(TINY_FILE.read_bytes()[:8], "little")
    with safe_open(str(TINY_FILE), "pt") as f:
        assert set(header) - {"__metadata__"} == set(f.keys()) and header["__metadata__"] == f.metadata()


def test_sampling_defaults_read_as_words():
    s = PRESETS["svd-xt"].sampling
    assert describe_sampling(s) == ("25 frames, 30 steps, guidance 1.5 -> 3.0, 1024x576 (width x height), 7 fps, "
                                    "motion bucket 127, noise augmentation 0.02, decode chunk 14")


@pytest.mark.parametrize("preset", ["svd", "svd-xt", "svd-xt-1.1"])
def test_info_on_a_preset_prints_its_values(preset, monkeypatch, capsys):
    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda *a, **k: pytest.fail("info downloaded"))
    assert cli.main(["info", preset]) == 0
    out = capsys.readouterr().out
    s = PRESETS[preset].sampling
    line = next(line for line in out.splitlines() if line.startswith("sampling defaults: "))
    for value in (f"{s.num_frames} frames", f"{s.num_inference_steps} steps",
                  f"guidance {s.min_guidance_scale:.1f} -> {s.max_guidance_scale:.1f}",
                  f"{s.width}x{s.height} (width x height)", f"{s.fps} fps", f"motion bucket {s.motion_bucket_id}",
                  f"noise augmentation {s.noise_aug_strength}", f"decode chunk {s.decode_chunk_size}"):
        assert value in line, (value, line)
    assert "SamplingConfig(" not in out and PRESETS[preset].repo_id in out and PRESETS[preset].single_file in out
    assert ("gated: accept its license there, then set HF_TOKEN" in out) == PRESETS[preset].gated


def test_info_on_a_file_prints_its_sampling_defaults_and_no_empty_field(tmp_path, capsys):
    tensors, meta = tiny_tensors()
    save_file(tensors, str(tmp_path / "unhashed.safetensors"), metadata={**meta, "source_sha256": ""})
    save_file(tensors, str(tmp_path / "hashed.safetensors"), metadata={**meta, "source_sha256": "ab" * 32})
    assert cli.main(["info", str(tmp_path / "unhashed.safetensors")]) == 0
    lines = capsys.readouterr().out.splitlines()
    s = PRESETS["tiny"].sampling
    assert f"sampling defaults: {describe_sampling(s)}" in lines and "preset: tiny" in lines
    assert f"{s.width}x{s.height} (width x height)" in describe_sampling(s)
    assert not any("SamplingConfig(" in line or line.rstrip().endswith(":") for line in lines), lines
    assert "source sha256: (not recorded)" in lines
    assert f"converted by: svdlite {meta['svdlite_version']}, file format version {meta['format_version']}" in lines
    assert lines[1] == "format: svdlite (svdlite's own file, as tools/convert_weights.py writes it)"
    assert any(line.startswith("unet: 1328 tensors (float16), ") for line in lines), lines
    assert f"source sha256: {'ab' * 32}" in describe(tmp_path / "hashed.safetensors")


def test_auto_dtype_is_float32_on_the_cpu_and_float16_on_a_gpu():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.float16 and resolve_dtype("auto", "cuda:1") == torch.float16
    assert resolve_dtype("auto", "mps") == torch.float16
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert resolve_dtype(dtype, "cpu") is dtype and resolve_dtype(dtype, "cuda") is dtype
    for bad in ("fp16", "float16", torch.float64, torch.int8, None):
        with pytest.raises(ValueError, match="dtype must be one of torch.float32, torch.float16, torch.bfloat16"):
            resolve_dtype(bad, "cpu")


def test_load_model_defaults_to_auto_device_and_dtype(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = load_model("tiny")
    weight = next(model.unet.parameters())
    assert weight.device.type == "cpu" and weight.dtype == torch.float32
    assert next(model.vae_decoder.parameters()).dtype == torch.float32


def test_load_model_progress_bar_counts_the_bytes_read(capsys):
    quiet = load_model("tiny", device="cpu", dtype=torch.float32)
    assert capsys.readouterr().err == ""
    model = load_model("tiny", device="cpu", dtype=torch.float32, progress=True)
    err = capsys.readouterr().err
    ms = open_model_source(TINY_FILE)
    total = sum(component_bytes(ms, c) for c in ("unet", "vae_encoder", "vae_decoder", "image_encoder"))
    header, _ = read_header(TINY_FILE)  # an svdlite file holds the four components' tensors and nothing else
    assert total == sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    assert err.startswith("\r") and "loading: 100%" in err and f"{total / 1e6:.2f}M/{total / 1e6:.2f}M" in err, err
    for a, b in zip(quiet.unet.state_dict().values(), model.unet.state_dict().values()):
        assert torch.equal(a, b)


def test_a_mismatched_torchvision_ends_info_with_one_line_and_exit_1(fail_open_clip_import, capsys):
    fail_open_clip_import("operator torchvision::nms does not exist")
    assert cli.main(["info", str(TINY_FILE)]) == errors.EXIT_FAILED
    err = capsys.readouterr().err
    assert err.startswith("svdlite: error: cannot import open_clip (svdlite builds the CLIP image encoder with it): "
                          "the installed torchvision ") and err.count("\n") == 1, err
