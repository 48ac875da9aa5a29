"""The web page, `svdlite ui`, driven in a real browser (headless Debian Chromium through Playwright), and its HTTP
endpoint through gradio_client, on the bundled tiny model (3 frames, 2 steps, 64x64).

The page runs as the real command in a subprocess; its videos are read back with PyAV and compared with
`svdlite generate` run with the same settings. Needs the `ui` extra, Playwright and Chromium (skipped with the reason
when one is missing; .ci/run installs them):

    pip install -e '.[ui]' playwright && apt-get install -y chromium chromium-driver
    OMP_NUM_THREADS=1 python -m pytest tests/test_ui.py

SVDLITE_UI_SCREENSHOT=docs/ui.png (same command) also writes the README's screenshot of the page after a run.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from svdlite.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "svdlite" / "assets" / "example.png"
SETTINGS = {"seed": 7, "frames": 3, "steps": 2, "width": 64, "height": 64, "speed": "balanced"}
CLI_SETTINGS = ["--seed", "7", "--num-frames", "3", "--steps", "2", "--width", "64", "--height", "64",
                "--speed", "balanced"]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # the page and the CLI on one thread: the same arithmetic


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_video(path) -> tuple[np.ndarray, float]:
    """(frames (T, H, W, 3) uint8, fps) of a video file, decoded by PyAV."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return frames, float(stream.average_rate)


def _cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "svdlite", *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=120)


# --- without Gradio: nothing imports it, and the command names the extra ---

def test_importing_svdlite_does_not_import_gradio():
    code = "import sys, svdlite, svdlite.cli, svdlite.ui; sys.exit('gradio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], env=ENV, timeout=120).returncode == 0


def test_ui_without_gradio_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if not installed
    assert main(["ui", "--model", "tiny"]) == 2
    assert capsys.readouterr().err.strip() == ("svdlite: error: `svdlite ui` needs Gradio, an optional extra: "
                                               "pip install 'svdlite[ui]'")


def test_clean_up_keeps_the_newest_runs_and_nothing_else_is_touched(tmp_path):
    from svdlite import ui

    page = object.__new__(ui.Page)  # clean_up needs only the videos folder
    page.videos = tmp_path
    names = [f"svdlite-20260101-0000{k:02d}-seed{k}-abcdef" for k in range(ui.KEEP_RUNS + 3)]
    for k, name in enumerate(names):
        for suffix in (".mp4", ".gif"):
            (tmp_path / (name + suffix)).write_bytes(b"")
            os.utime(tmp_path / (name + suffix), (1_000_000 + k, 1_000_000 + k))
    theirs = ["svdlite-mine.mp4", "notes.txt"]  # files of the folder's owner, not the page's
    for name in theirs:
        (tmp_path / name).write_bytes(b"")
        os.utime(tmp_path / name, (0, 0))
    page.clean_up()
    kept = {p.name for p in tmp_path.iterdir()}
    assert kept == {n + s for n in names[3:] for s in (".mp4", ".gif")} | set(theirs)


# --- the page, served by the real command ---

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`svdlite ui --model tiny` on a free port: (its URL, its output folder). Stopped with SIGTERM at the end,
    which leaves only the videos in the output folder."""
    pytest.importorskip("gradio", reason="the web page needs the ui extra: pip install -e '.[ui]'")
    folder = tmp_path_factory.mktemp("ui") / "out"
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "svdlite", "ui", "--model", "tiny", "--port", str(port),
                             "--threads", "1", "--output-dir", str(folder), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                assert r.status == 200
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"svdlite ui did not start:\n{proc.communicate()[0]}")
            time.sleep(0.3)
    yield url, folder
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 143, out
    assert "loading tiny (bundled" in out and f"the page: http://127.0.0.1:{port}" in out, out
    assert f"svdlite: terminated; the page stopped; its videos are in {folder / 'videos'}" in out, out
    assert [p.name for p in folder.iterdir()] == ["videos"], out  # Gradio's uploads and copies removed


@pytest.fixture(scope="module")
def cli_video(tmp_path_factory):
    """`svdlite generate` with the settings the tests give the page: (frames, fps)."""
    out = tmp_path_factory.mktemp("cli") / "cli.mp4"
    done = _cli("generate", EXAMPLE, "-o", out, "--model", "tiny", *CLI_SETTINGS, "--threads", "1", "-q")
    assert done.returncode == 0, done.stderr
    return _read_video(out)


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("playwright.sync_api", reason="the browser tests need Playwright: pip install playwright")
    if not (shutil.which("chromium") and Path(CHROMIUM).exists()):
        pytest.skip("the browser tests need Debian's Chromium: apt-get install -y chromium chromium-driver")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def open_page(browser, server):
    """Opens a fresh page (its own session, as another user would) on the running server."""
    contexts = []

    def open_page():
        contexts.append(browser.new_context(viewport={"width": 1280, "height": 1000}))
        page = contexts[-1].new_page()
        page.set_default_timeout(30_000)
        page.goto(server[0])
        page.wait_for_selector("#generate")
        return page

    yield open_page
    for context in contexts:
        context.close()


@pytest.fixture
def page(open_page):
    return open_page()


def _field(page, name):
    return page.locator(f"#{name} :is(input, textarea)").first


def _upload(page, path):
    clear = page.locator("#image button[aria-label=Clear]")
    if clear.count():
        clear.click()
    page.locator("#image input[type=file]").set_input_files(str(path))


def _settings(page, seed=SETTINGS["seed"], steps=SETTINGS["steps"], frames=SETTINGS["frames"]):
    page.locator("#randomize input").uncheck()
    _field(page, "seed").fill(str(seed))
    page.locator(f"#speed input[value={SETTINGS['speed']}]").check()
    for name, value in (("frames", frames), ("steps", steps), ("width", SETTINGS["width"]),
                        ("height", SETTINGS["height"])):
        _field(page, name).fill(str(value))
    _field(page, "height").blur()


def _generate(page, server, tmp_path, name="page.mp4"):
    """Click Generate, wait for the video to play in the page, fetch it as the browser does: its path here."""
    old = page.locator("#video video").get_attribute("src") if page.locator("#video video").count() else None
    page.locator("#generate").click()
    page.wait_for_function("old => { const v = document.querySelector('#video video'); "
                           "return v && v.src && v.src !== old; }", arg=old, timeout=60_000)
    src = page.locator("#video video").get_attribute("src")
    assert src.startswith(server[0]), src
    path = tmp_path / name
    path.write_bytes(page.request.get(src).body())
    return path


def _shows_error(page, message: str) -> None:
    """Wait for the page to show `message` as an error (Gradio's toast), check it shows no other, then close them."""
    page.wait_for_function("m => [...document.querySelectorAll('[data-testid=toast-text]')]"
                           ".some(e => e.innerText.trim() === m)", arg=message)
    shown = {t.inner_text().strip() for t in page.locator("[data-testid=toast-text]").all()}
    assert shown == {message}
    for close in page.locator("[data-testid=toast-close]").all():
        close.click()
    page.wait_for_function("() => !document.querySelector('[data-testid=toast-text]')")


def test_page_makes_the_same_video_as_the_cli(page, server, cli_video, tmp_path):
    from playwright.sync_api import expect

    header = page.locator("body").inner_text()
    assert "Model tiny" in header and "on cpu, float32" in header  # the model, device and dtype it runs on
    _upload(page, EXAMPLE)
    page.wait_for_selector("#crop img")  # the crop to the output size, before generating
    _settings(page)
    expect(page.locator("#crop")).to_contain_text("example.png: 1024x576, scaled and cropped to 64x64")
    path = _generate(page, server, tmp_path)
    frames, fps = _read_video(path)
    assert frames.shape == (3, 64, 64, 3) and fps == 7.0
    assert np.array_equal(frames, cli_video[0]) and fps == cli_video[1]
    assert _field(page, "seed").input_value() == "7"  # the seed used, shown after the run
    info = page.locator("#info").inner_text()
    assert "3 frames, 64x64 (width x height), 7 fps, seed 7" in info, info
    downloads = page.locator("#files a[download]")
    assert downloads.count() == 1 and downloads.first.get_attribute("download").endswith(".mp4")
    assert "scaled and cropped to 64x64" in page.locator("#crop").inner_text()  # the last size's crop stays
    kept = sorted((server[1] / "videos").glob("*.mp4"))
    assert kept and np.array_equal(_read_video(kept[-1])[0], frames)  # kept under its name in the output folder
    if os.environ.get("SVDLITE_UI_SCREENSHOT"):
        page.wait_for_timeout(500)  # a frame of the video on screen
        page.screenshot(path=os.environ["SVDLITE_UI_SCREENSHOT"], full_page=True)


def test_bad_input_shows_the_cli_message_and_the_page_keeps_working(page, server, cli_video, tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("not an image\n")
    refused = _cli("generate", "fake.png", "-o", "out.mp4", "--model", "tiny", cwd=tmp_path)
    assert refused.returncode == 2
    cli_message = refused.stderr.strip().removeprefix("svdlite: error: ")
    assert cli_message == "input image fake.png is not an image PIL can read (PNG, JPEG, WebP, ...)"

    _upload(page, fake)
    _shows_error(page, cli_message)  # from the crop preview
    _settings(page)
    page.locator("#generate").click()
    _shows_error(page, cli_message)  # from Generate

    _upload(page, EXAMPLE)
    page.wait_for_selector("#crop img")
    _field(page, "frames").fill("0")  # a bad setting: the CLI's words for --num-frames 0
    refused = _cli("generate", EXAMPLE, "-o", tmp_path / "x.mp4", "--model", "tiny", "--num-frames", "0")
    assert refused.returncode == 2
    page.locator("#generate").click()
    _shows_error(page, refused.stderr.strip().removeprefix("svdlite: error: "))

    _field(page, "frames").fill("3")
    frames, _ = _read_video(_generate(page, server, tmp_path))
    assert np.array_equal(frames, cli_video[0])


def test_one_run_at_a_time_and_cancel_frees_the_model(open_page, server, cli_video, tmp_path):
    videos = server[1] / "videos"
    before = len(list(videos.iterdir()))
    first, second = open_page(), open_page()
    for page in (first, second):
        _upload(page, EXAMPLE)
        page.wait_for_selector("#crop img")
    _settings(first, steps=5000)  # minutes of work, unless cancelled
    first.locator("#generate").click()
    first.wait_for_function("() => /denoising: about .* left/.test(document.querySelector('#video').innerText)")
    _settings(second)
    second.locator("#generate").click()  # waits in the queue, its place shown
    second.wait_for_function("() => /queue: 1\\/1/.test(document.querySelector('#video').innerText)")
    first.locator("#cancel").click()
    first.wait_for_function("() => document.querySelector('#info').innerText.includes('Cancelled')")
    started = time.monotonic()
    second.wait_for_selector("#video video")  # the model is free again at once
    assert time.monotonic() - started < 20
    path = tmp_path / "second.mp4"
    path.write_bytes(second.request.get(second.locator("#video video").get_attribute("src")).body())
    assert np.array_equal(_read_video(path)[0], cli_video[0])
    assert len(list(videos.iterdir())) == before + 1  # the second run's video; nothing from the cancelled one
    _field(first, "steps").fill("2")
    assert np.array_equal(_read_video(_generate(first, server, tmp_path))[0], cli_video[0])


def test_http_endpoint(server, cli_video, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(server[0], verbose=False, download_files=str(tmp_path))
    api = client.view_api(return_format="dict", print_info=False)
    assert list(api["named_endpoints"]) == ["/generate"] and not api["unnamed_endpoints"]
    video, files, seed, info = client.predict(
        image=handle_file(EXAMPLE), seed=7, randomize_seed=False, speed="balanced", num_frames=3,
        num_inference_steps="2", width=64, height=64, also_save_as=["gif"], api_name="/generate")
    frames, fps = _read_video(video if isinstance(video, str) else video["video"])
    assert np.array_equal(frames, cli_video[0]) and fps == 7.0 and seed == 7
    assert sorted(Path(f).suffix for f in files) == [".gif", ".mp4"] and "seed 7" in info
    # the advanced options: step caching given by hand is the balanced level's
    video, _, _, _ = client.predict(
        image=handle_file(EXAMPLE), seed=7, randomize_seed=False, speed="exact", cache_interval="2",
        cache_depth="0", num_frames=3, num_inference_steps="2", width=64, height=64, api_name="/generate")
    assert np.array_equal(_read_video(video if isinstance(video, str) else video["video"])[0], cli_video[0])
    # a script's cancel stops its run at the next step: the model is free again at once
    long = client.submit(image=handle_file(EXAMPLE), num_frames=3, num_inference_steps="5000", width=64, height=64,
                         api_name="/generate")
    deadline = time.monotonic() + 30
    while long.status().code.name != "PROGRESS" and time.monotonic() < deadline:
        time.sleep(0.1)
    long.cancel()
    started = time.monotonic()
    client.predict(image=handle_file(EXAMPLE), num_frames=3, num_inference_steps="2", width=64, height=64,
                   api_name="/generate")
    assert time.monotonic() - started < 20
    with pytest.raises(AppError, match=r"^min_guidance_scale=3.0 is above max_guidance_scale=2.0; guidance rises"):
        client.predict(image=handle_file(EXAMPLE), min_guidance_scale=3, max_guidance_scale=2, api_name="/generate")
    from PIL import Image

    huge = tmp_path / "huge.png"  # above the CLI's pixel limit, refused before it is decoded
    Image.new("1", (12000, 12000)).save(huge)
    with pytest.raises(AppError, match=r"^input image huge.png is 12000x12000 pixels; svdlite reads images of at most"):
        client.predict(image=handle_file(huge), api_name="/generate")
    with pytest.raises(AppError, match=r"^f3_ratio=0.3 needs an f3_schedule \(make one with svdlite calibrate\)$"):
        client.predict(image=handle_file(EXAMPLE), f3_ratio=0.3, api_name="/generate")


def test_ui_refuses_a_port_in_use(capsys):
    pytest.importorskip("gradio", reason="the web page needs the ui extra: pip install -e '.[ui]'")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["ui", "--model", "tiny", "--port", str(taken.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err
