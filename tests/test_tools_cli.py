"""The tools' command lines (tools/*.py): `--help` prints and writes nothing, an existing output is refused with exit
code 2 unless `--force` and left as it was, nothing half-written is left behind, and tools/make_tiny_model.py
writes the bundled tiny model byte for byte.

Most checks call each tool's `main(argv)` in this process (the refusals come before any heavy work); two tools
also run as scripts, as a user runs them.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import svdlite
from svdlite import outputs as output  # the helper the tools write through

from helpers import TOOLS, load_tool

BUNDLED = Path(svdlite.__file__).parent / "assets" / "tiny.safetensors"
TOOL_NAMES = ("make_tiny_model", "convert_weights", "count_macs", "make_diffusers_unet_reference", "measure_options",
              "benchmark", "bench_generate", "bench_loading", "output_digest")


def exit_code(tool, argv) -> int:
    """What `python tools/<tool>.py ARGV` exits with: main's return value, or the SystemExit argparse raises."""
    try:
        return tool.main(argv)
    except SystemExit as stop:
        return stop.code


def listing(folder: Path) -> dict[str, bytes | None]:
    """Every file and folder under `folder` (hidden ones too) with a file's bytes."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("name", TOOL_NAMES)
def test_help_prints_and_writes_nothing(name, tmp_path, monkeypatch, capsys):
    tool = load_tool(name)
    monkeypatch.chdir(tmp_path)
    assert exit_code(tool, ["--help"]) == 0
    text = capsys.readouterr().out
    description = " ".join(tool.build_parser().description.split())
    assert text.startswith("usage: ") and description and description in " ".join(text.split())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["make_tiny_model", "bench_generate"])
def test_help_as_a_script_writes_nothing(name, tmp_path):
    """The reported failure: `make_tiny_model.py --help` wrote a checkpoint named `--help`."""
    done = subprocess.run([sys.executable, str(TOOLS / f"{name}.py"), "--help"], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: ") and "--force" in done.stdout
    assert list(tmp_path.iterdir()) == []


def test_the_tools_import_each_other_as_plain_modules():
    """The benchmark scripts share tools/benchlib.py and tools/benchmark.py runs tools/bench_*.py by plain imports
    (Python looks in a script's own folder first): no tool edits the import path."""
    for path in sorted(TOOLS.glob("*.py")):
        assert "sys.path" not in path.read_text(), f"{path.name} edits sys.path"


# (tool, argv with {out} for the output that exists, what exists there: "file" or "folder")
REFUSALS = [
    ("make_tiny_model", ["{out}"], "file"),
    ("convert_weights", ["{tmp}/svd_xt.safetensors", "{out}"], "file"),
    ("make_diffusers_unet_reference", ["{tmp}"], "diffusers_unet_tiny_io.safetensors"),
    ("measure_options", ["--f3-save", "{out}", "--calibrate-only"], "file"),
    ("benchmark", ["--json", "{out}", "--width", "tiny"], "file"),
    ("bench_generate", ["--write", "{out}", "--width", "tiny"], "folder"),
    ("bench_generate", ["--child", "svdlite", "{tmp}/pipeline", "{out}"], "file"),
    ("bench_loading", ["--write-files", "{tmp}"], "svd.svdlite.safetensors"),
    ("output_digest", ["--json", "{out}"], "file"),
]


@pytest.mark.parametrize("name, argv, existing", REFUSALS, ids=[f"{r[0]} {r[1][0]}" for r in REFUSALS])
def test_an_existing_output_is_refused_without_force(name, argv, existing, tmp_path, capsys):
    if existing == "file":
        out = tmp_path / "out.bin"
        out.write_bytes(b"precious")
    elif existing == "folder":
        out = tmp_path / "out"
        out.mkdir()
        (out / "kept.txt").write_bytes(b"precious")
    else:  # one of the several outputs the tool writes in the folder it is given
        out = tmp_path / existing
        out.write_bytes(b"precious")
    before = listing(tmp_path)
    code = exit_code(load_tool(name), [a.format(out=out, tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert str(out) in err and "--force" in err
    assert listing(tmp_path) == before  # the output untouched, no temporary file left


def test_an_output_in_a_missing_folder_is_refused(tmp_path, capsys):
    tool = load_tool("make_tiny_model")
    assert exit_code(tool, [str(tmp_path / "missing" / "tiny.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err and list(tmp_path.iterdir()) == []
    assert exit_code(tool, []) == 2  # no default output: the bundled file is never written unless named
    assert "required: OUT" in capsys.readouterr().err


def test_make_tiny_model_writes_the_bundled_file_byte_for_byte(tmp_path, capsys):
    """Also with --force over an existing file, which is replaced whole (no temporary file left)."""
    out = tmp_path / "tiny.safetensors"
    out.write_bytes(b"old")
    assert exit_code(load_tool("make_tiny_model"), [str(out), "--force"]) == 0
    assert "2,949,193 parameters" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.safetensors"]
    assert out.read_bytes() == BUNDLED.read_bytes(), (
        "tools/make_tiny_model.py no longer writes svdlite/assets/tiny.safetensors; if the change is meant (a new "
        "svdlite version is recorded in its metadata), write it again: python tools/make_tiny_model.py "
        "svdlite/assets/tiny.safetensors --force")


# --- the helper the tools write through (svdlite/outputs.py) ---------------------------------------------------

def test_atomic_file_replaces_only_when_complete(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with output.atomic_file(path) as tmp:
            tmp.write_text("half")
            assert tmp.parent == tmp_path and tmp.name.startswith(".result.json.")
            raise RuntimeError("interrupted")
    assert listing(tmp_path) == {"result.json": b"old"}
    output.write_text(path, "new")
    assert listing(tmp_path) == {"result.json": b"new"}
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_atomic_folder_replaces_only_when_complete(tmp_path):
    path = tmp_path / "pipeline"
    path.mkdir()
    (path / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with output.atomic_folder(path) as tmp:
            (tmp / "new.txt").write_text("half")
            raise KeyboardInterrupt
    assert listing(tmp_path) == {"pipeline": None, "pipeline/old.txt": b"old"}
    with output.atomic_folder(path) as tmp:
        (tmp / "new.txt").write_text("new")
    assert listing(tmp_path) == {"pipeline": None, "pipeline/new.txt": b"new"}
    with output.atomic_folder(tmp_path / "fresh") as tmp:
        (tmp / "a").write_text("a")
    assert listing(tmp_path / "fresh") == {"a": b"a"}
    assert (tmp_path / "fresh").stat().st_mode & 0o777 == 0o777 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
