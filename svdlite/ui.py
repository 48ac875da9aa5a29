"""The web page, `svdlite ui`: image-to-video with the same settings, checks and messages as the command line.

Gradio (the optional extra `ui`: pip install 'svdlite[ui]') is imported only here, by the `ui` subcommand; importing
svdlite never imports it. The model is loaded once, before the page starts. One run at a time works on it: the
others wait in Gradio's queue, which shows each its place. A run's settings become a `RunSpec` exactly as the CLI's
do, so a bad setting or image is refused with the words `svdlite generate` prints, shown on the page (which keeps
working). The same run is one named HTTP endpoint, `/generate`, for scripts (gradio_client).

What is written, all inside the output folder (--output-dir, by default a new temporary folder removed at exit):
  DIR/videos/   the finished videos (mp4, and webm/gif when asked), under unique names; the newest KEEP_RUNS runs
                are kept, older ones deleted after each run
  DIR/gradio-*/ Gradio's uploads and the copies it serves (its GRADIO_TEMP_DIR, a new folder each start); files
                older than a day are deleted while the page runs, the folder at exit
Only DIR/videos and Gradio's own folder are served. The page listens on 127.0.0.1 unless --host says otherwise,
makes no share link, sends no analytics, and takes uploads up to MAX_UPLOAD bytes and `image.MAX_PIXELS` pixels
(`image.open_image`, the CLI's limit).
"""
import asyncio
import importlib.util
import math
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

from .errors import Terminated, error_line
from .image import open_image, resize_cover

INSTALL_HINT = "pip install 'svdlite[ui]'"
KEEP_RUNS = 20  # finished runs kept in DIR/videos
MAX_UPLOAD = "256mb"  # per uploaded file; the pixel limit is open_image's
QUEUE_SIZE = 32  # runs waiting at most; more are refused with Gradio's "queue full"
CACHE_CLEANUP = (3600, 86400)  # Gradio's delete_cache: every hour, files older than a day
EXTRA_FORMATS = ("webm", "gif")  # besides the mp4 the page plays
# the settings the CLI reads as ints (the others as floats): the page's numbers are read alike, for the same messages
INT_SETTINGS = ("seed", "num_frames", "num_inference_steps", "fps", "motion_bucket_id", "height", "width",
                "guidance_cut_step", "cache_interval", "cache_depth")
VIDEO_NAME = "svdlite-????????-??????-seed*-??????.*"  # the page's videos, the only files its clean-up deletes
# the measured cost of each speed level (docs/acceleration.md: UNet work per SVD-XT video at its 30 steps, wall
# time at full width, 25 steps; the PSNR of the frames against exact, random weights)
SPEED_CHOICES = [
    ("exact: the reference computation", "exact"),
    ("balanced: about 0.6x the time (step caching: every other step reuses the deep features; 54% of the UNet's "
     "work)", "balanced"),
    ("fast: about 0.4x the time (Align Your Steps, 10 steps unless Steps is set; 33% of the UNet's work)", "fast"),
]
SPEED_INFO = ("Measured on random weights (docs/acceleration.md): balanced kept the frames within 37 dB PSNR of "
              "exact, fast within 44 dB. Only real weights say how they look.")


class MissingExtra(ImportError, ValueError):
    """An optional dependency is not installed (a ValueError too: refused before any work, exit code 2)."""


class Cancelled(Exception):
    """The run was stopped: the page's Cancel button, or Gradio cancelled its request."""


def require_gradio() -> None:
    """Refuse, naming the extra, when Gradio is not installed (checked without importing it)."""
    if importlib.util.find_spec("gradio") is None:
        raise MissingExtra(f"`svdlite ui` needs Gradio, an optional extra: {INSTALL_HINT}")


def check_address(host: str, port: int) -> None:
    """Refuse a port out of range or already taken, before the model loads."""
    if not 0 < port < 65536:
        raise ValueError(f"--port must be in [1, 65535], got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ValueError(f"--host {host!r} is not an address of this machine ({err.strerror})") from err
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            raise ValueError(f"cannot listen on {host}:{port} ({err.strerror}); pass another --port or --host") \
                from err


def prepare_output_dir(path) -> tuple[Path, bool]:
    """(the output folder, whether it is a new temporary one to remove at exit); a given folder is made if its
    parent exists, and must be writable."""
    if path is None:
        return Path(tempfile.mkdtemp(prefix="svdlite-ui-")).resolve(), True
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--output-dir {path} is a file; expected a folder (made if missing)")
    if not path.exists():
        if not path.parent.is_dir():
            raise FileNotFoundError(f"cannot make --output-dir {path}: {path.parent} does not exist")
        path.mkdir()
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"--output-dir {path} is not writable")
    return path.resolve(), False


def serve(args, *, check, load) -> int:
    """`svdlite ui`: check everything, load the model (`load(args)`, with its line), serve the page until Ctrl-C
    or SIGTERM (raised on, with where the videos are, for the CLI's exit codes 130 and 143). `check(args)`: the
    CLI's checks of the model name, device and threads."""
    require_gradio()
    check_address(args.host, args.port)
    check(args)
    folder, temporary = prepare_output_dir(args.output_dir)
    gradio_dir = Path(tempfile.mkdtemp(prefix="gradio-", dir=folder))  # never a folder of the user's
    try:
        # before Gradio is imported: it reads these once, at import
        os.environ["GRADIO_TEMP_DIR"] = str(gradio_dir)
        os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
        model = load(args)
        page = Page(model, args.model, folder)
        app = page.build()
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"listening on {args.host}: anyone who can reach this machine on port {args.port} can use the "
                  "page")
        print(f"videos are kept in {page.videos}" + (" (a temporary folder, removed at exit)" if temporary else ""))
        app.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE).launch(
            server_name=args.host, server_port=args.port, share=False, inbrowser=False, show_error=True,
            max_file_size=MAX_UPLOAD, allowed_paths=[str(page.videos)], footer_links=["api"], ssr_mode=False,
            mcp_server=False, quiet=True, prevent_thread_lock=True)
        stopped = "the page stopped; " + ("its temporary folder was removed" if temporary
                                          else f"its videos are in {page.videos}")
        try:
            print(f"the page: {_url(args.host, args.port)} (Ctrl-C stops it)", flush=True)
            while app.is_running:
                time.sleep(0.2)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(stopped) from None
        except Terminated:
            raise Terminated(stopped) from None
        finally:
            app.close()
    finally:
        shutil.rmtree(folder if temporary else gradio_dir, ignore_errors=True)
    return 0


def _url(host: str, port: int) -> str:
    host = "localhost" if host in ("0.0.0.0", "::", "") else host
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _time_left(seconds: float) -> str:
    if seconds < 60:
        return f"{max(1, math.ceil(seconds))} s"
    return f"{seconds / 60:.1f} min"


def _number(value, name: str = "value"):
    """A value from the page as the CLI would take it: None when blank; a setting the CLI reads as an int is an int
    when whole (else the float, refused by the same check as the CLI's), the others a float. Text (the optional
    fields) is parsed."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {text!r}") from None
    if value is None:
        return None
    if name not in INT_SETTINGS:
        return float(value)
    return int(value) if float(value).is_integer() else float(value)


def _message(err: BaseException, *uploads: str | None) -> str:
    """The CLI's one-line message, with an uploaded file's server path shortened to the name the user gave it."""
    text = error_line(err)
    for upload in uploads:
        if upload:
            text = text.replace(str(upload), Path(upload).name)
    return text


def _refuse(err: BaseException, *uploads: str | None):
    """A refusal as a message on the page (kept until closed) and as the endpoint's error."""
    import gradio as gr

    return gr.Error(_message(err, *uploads), duration=None, print_exception=False)


class Page:
    """The page's state (the model, its lock, the output folder, each session's cancel flag) and its handlers."""

    def __init__(self, model, model_name: str, folder: Path):
        from .checks import model_device_dtype

        self.model, self.model_name, self.folder = model, model_name, Path(folder)
        self.videos = self.folder / "videos"
        self.videos.mkdir(exist_ok=True)
        self.device, self.dtype = model_device_dtype(model.unet)
        self.size_multiple = model.vae_config.downscale * model.unet.config.latent_downscale
        self.lock = threading.Lock()  # one run on the model at a time, also while a cancelled run winds down
        self.cancel_flags: dict[str, threading.Event] = {}

    def header(self) -> str:
        device = str(self.device)
        if self.device.type == "cuda":
            import torch

            device += f" ({torch.cuda.get_device_name(self.device)})"
        note = " (bundled random weights: it makes noise, not video)" if self.model_name == "tiny" else ""
        return (f"# svdlite: image to video\nModel **{self.model_name}**{note} on **{device}**, "
                f"**{str(self.dtype).removeprefix('torch.')}** (the VAE in float32). One run at a time; others "
                "wait in the queue, their place shown.")

    # --- what the page's events run (plain methods of its values; the Gradio wiring is in build) ---

    def preview(self, image, width, height):
        """The image as it will condition the video: scaled to cover the output size and centre-cropped."""
        import gradio as gr

        if not image:
            return gr.update(value=None, label="Crop to the output size")
        from .checks import check_settings

        s = self.model.sampling
        width, height = width or s.width, height or s.height
        try:
            width, height = _number(width, "width"), _number(height, "height")
            check_settings(height=height, width=width, size_multiple=self.size_multiple)
            img = open_image(image)
        except Exception as err:  # noqa: BLE001 - every refusal is a message on the page
            raise _refuse(err, image) from err
        return gr.update(value=resize_cover(img, height, width),
                         label=f"{Path(image).name}: {img.width}x{img.height}, scaled and cropped to "
                               f"{width}x{height} (width x height)")

    def cancel(self, request=None) -> str:
        """Stop the run of this page's user (Gradio's session) at its next step (a queued one Gradio drops from the
        queue): the line to show."""
        flag = self.cancel_flags.get(getattr(request, "session_hash", None) or "")
        if flag is None or flag.is_set():
            return "Cancelled."
        flag.set()
        return "Cancelled; nothing was written."

    def generate(self, image, speed, seed, randomize_seed, motion_bucket_id, fps, num_frames, num_inference_steps,
                 min_guidance_scale, max_guidance_scale, noise_aug_strength, width, height, f3_schedule, f3_ratio,
                 cache_interval, cache_depth, guidance_cut_step, also_save_as, request=None, progress=None,
                 cancel: threading.Event | None = None):
        """One run: (the mp4 to play, the files to download, the seed used, a line saying what was made). The run
        stops at its next step once `cancel` is set (by `Page.cancel`, or the caller)."""
        from .checks import check_settings
        from .run import RunSpec
        from .seeds import random_seed

        given = dict(num_frames=num_frames, num_inference_steps=num_inference_steps, fps=fps,
                     motion_bucket_id=motion_bucket_id, noise_aug_strength=noise_aug_strength,
                     min_guidance_scale=min_guidance_scale, max_guidance_scale=max_guidance_scale, height=height,
                     width=width, guidance_cut_step=guidance_cut_step, f3_ratio=f3_ratio,
                     cache_interval=cache_interval, cache_depth=cache_depth)
        formats = ["mp4"] + [f for f in EXTRA_FORMATS if f in (also_save_as or [])]
        try:
            given = {k: _number(v, k) for k, v in given.items()}
            if not f3_schedule and not given["f3_ratio"]:
                given["f3_ratio"] = None  # 0 without a schedule: the option's off-position, as when not given
            if not image:
                raise ValueError("no input image: upload one first")
            seed = random_seed() if randomize_seed or seed is None or seed == "" else _number(seed, "seed")
            check_settings(seed=seed)
            spec = RunSpec.from_options(**given, speed=speed or "exact", f3_schedule=f3_schedule or None)
            spec.check_fit(self.model)
            picture = open_image(image)
        except Exception as err:  # noqa: BLE001 - refused before any work: a message on the page
            raise _refuse(err, image, f3_schedule) from err
        session = getattr(request, "session_hash", None) or ""
        flag = self.cancel_flags[session] = cancel or threading.Event()  # this run's: Page.cancel sets it
        try:
            return self._run(picture, spec, seed, formats, flag, progress)
        finally:
            if self.cancel_flags.get(session) is flag:
                del self.cancel_flags[session]

    def _run(self, picture, spec, seed: int, formats: list[str], flag: threading.Event, progress):
        import gradio as gr

        from .pipeline import generate

        if progress is not None:
            progress(0, desc="waiting for the model")
        with self.lock:
            if progress is not None:
                _track(progress, flag)
                progress(0, desc="conditioning on the image")
            started = time.monotonic()
            try:
                if flag.is_set():
                    raise Cancelled()
                video = generate(picture, model=self.model, spec=spec, seed=seed, progress=progress is not None)
                if flag.is_set():
                    raise Cancelled()
                if progress is not None:
                    progress(1.0, desc="writing the video")
                stem = f"svdlite-{time.strftime('%Y%m%d-%H%M%S')}-seed{seed}-{secrets.token_hex(3)}"
                paths = [video.save(self.videos / f"{stem}.{fmt}") for fmt in formats]
            except Cancelled:
                return None, None, gr.update(), "Cancelled; nothing was written."
            except Exception as err:  # noqa: BLE001 - failed while working: the message, and the page goes on
                raise gr.Error(_message(err), duration=None, print_exception=True) from err
            seconds = time.monotonic() - started
        self.clean_up()
        info = (f"{len(video)} frames, {video.width}x{video.height} (width x height), {video.fps:g} fps, seed {seed}, "
                f"made in {seconds:.1f} s. Saved as {', '.join(p.name for p in paths)}.")
        return str(paths[0]), [str(p) for p in paths], seed, info

    def clean_up(self) -> None:
        """Keep the newest KEEP_RUNS runs' videos in DIR/videos, delete the older ones."""
        runs: dict[str, list[Path]] = {}
        for path in self.videos.glob(VIDEO_NAME):
            runs.setdefault(path.stem, []).append(path)
        old = sorted(runs, key=lambda stem: max(p.stat().st_mtime for p in runs[stem]), reverse=True)[KEEP_RUNS:]
        for stem in old:
            for path in runs[stem]:
                path.unlink(missing_ok=True)

    # --- the page ---

    def build(self):
        import gradio as gr

        with gr.Blocks(title="svdlite", delete_cache=CACHE_CLEANUP, analytics_enabled=False) as app:
            gr.Markdown(self.header())
            with gr.Row():
                with gr.Column():
                    inputs = self._settings(gr)
                    inputs |= self._advanced(gr)
                    inputs["also"] = gr.CheckboxGroup(list(EXTRA_FORMATS), value=[], label="Also save as (mp4 always)",
                                                      elem_id="also")
                with gr.Column():
                    outputs = self._outputs(gr)
            self._connect(gr, inputs, outputs)
        return app

    def _settings(self, gr) -> dict:
        """The image, its crop preview, the speed level, the seed and the sampling settings (preset defaults)."""
        s = self.model.sampling
        c = {"image": gr.File(label="Image (drop or click; PNG, JPEG, WebP, ...)", file_types=["image"],
                              type="filepath", elem_id="image"),
             "crop": gr.Image(label="Crop to the output size", interactive=False, height=260, buttons=["fullscreen"],
                              elem_id="crop"),
             "speed": gr.Radio(SPEED_CHOICES, value="exact", label="Speed", info=SPEED_INFO, elem_id="speed")}
        with gr.Row():
            c["seed"] = gr.Number(label="Seed", value=0, precision=0, minimum=None, elem_id="seed")
            c["randomize"] = gr.Checkbox(label="Random seed", value=True, elem_id="randomize",
                                         info="the seed used is shown after the run")
        with gr.Row():
            c["motion"] = gr.Number(label="Motion bucket", value=s.motion_bucket_id, elem_id="motion",
                                    info="more motion when higher (trained on 0..255)")
            c["fps"] = gr.Number(label="FPS", value=s.fps, elem_id="fps", info="the model is conditioned on fps - 1")
        with gr.Row():
            c["frames"] = gr.Number(label="Frames", value=s.num_frames, elem_id="frames")
            c["steps"] = gr.Textbox(label="Steps", value="", elem_id="steps", max_lines=1,
                                    placeholder=f"{s.num_inference_steps} (fast: 10)",
                                    info="blank: the model's, or the speed level's")
        with gr.Row():
            c["min_guidance"] = gr.Number(label="Min guidance", value=s.min_guidance_scale, elem_id="min_guidance",
                                          info="first frame")
            c["max_guidance"] = gr.Number(label="Max guidance", value=s.max_guidance_scale, elem_id="max_guidance",
                                          info="last frame")
            c["noise_aug"] = gr.Number(label="Noise augmentation", value=s.noise_aug_strength, elem_id="noise_aug")
        with gr.Row():
            c["width"] = gr.Number(label="Width", value=s.width, step=self.size_multiple, elem_id="width",
                                   info=f"a multiple of {self.size_multiple}")
            c["height"] = gr.Number(label="Height", value=s.height, step=self.size_multiple, elem_id="height",
                                    info=f"a multiple of {self.size_multiple}")
        return c

    @staticmethod
    def _advanced(gr) -> dict:
        """The approximate options, folded away and off by default."""
        c = {}
        with gr.Accordion("Advanced: approximate options (off by default)", open=False):
            c["f3_schedule"] = gr.File(label="F3 schedule (.json from svdlite calibrate)", file_types=[".json"],
                                       type="filepath", elem_id="f3_schedule")
            c["f3_ratio"] = gr.Number(label="F3 ratio", value=0, elem_id="f3_ratio",
                                      info="skip this ratio [0, 1) of the lowest-ranked temporal units")
            with gr.Row():
                c["cache_interval"] = gr.Textbox(label="Cache interval", value="", max_lines=1,
                                                 elem_id="cache_interval", placeholder="1 (off)",
                                                 info="every N-th step runs the whole UNet")
                c["cache_depth"] = gr.Textbox(label="Cache depth", value="", elem_id="cache_depth", max_lines=1,
                                              placeholder="0", info="the branch recomputed, 0 = shallowest")
            c["guidance_cut"] = gr.Textbox(label="Guidance cut step", value="", elem_id="guidance_cut", max_lines=1,
                                           placeholder="off",
                                           info="from this step on run only the conditional branch")
        return c

    @staticmethod
    def _outputs(gr) -> dict:
        c = {}
        with gr.Row():
            c["run"] = gr.Button("Generate", variant="primary", elem_id="generate")
            c["stop"] = gr.Button("Cancel", variant="stop", elem_id="cancel")
        c["video"] = gr.Video(label="Video", interactive=False, elem_id="video", autoplay=True, loop=True,
                              buttons=["download"])
        c["files"] = gr.File(label="Download", file_count="multiple", interactive=False, elem_id="files")
        c["info"] = gr.Markdown(elem_id="info")
        return c

    def _connect(self, gr, i: dict, o: dict) -> None:
        """The events: the crop preview follows the image and size; Generate runs one video at a time; Cancel."""
        def preview(image, width, height):
            return self.preview(image, width, height)

        # the HTTP endpoint's parameters: these names; those a script leaves out take the page's first values
        # (None here: blank, the preset's or the option's off-position). The run works in a thread of its own;
        # when Gradio cancels the event (the Cancel button, a script's job.cancel()), it stops at its next step.
        async def generate(image, speed="exact", seed=None, randomize_seed=True, motion_bucket_id=None,
                           fps=None, num_frames=None, num_inference_steps=None, min_guidance_scale=None,
                           max_guidance_scale=None, noise_aug_strength=None, width=None, height=None,
                           f3_schedule=None, f3_ratio=None, cache_interval=None, cache_depth=None,
                           guidance_cut_step=None, also_save_as=None, request: gr.Request = None,
                           progress=gr.Progress(track_tqdm=True)):
            flag = threading.Event()
            try:
                return await asyncio.to_thread(  # the context too: Gradio's progress tracking is in it
                    self.generate, image, speed, seed, randomize_seed, motion_bucket_id, fps, num_frames,
                    num_inference_steps, min_guidance_scale, max_guidance_scale, noise_aug_strength, width,
                    height, f3_schedule, f3_ratio, cache_interval, cache_depth, guidance_cut_step,
                    also_save_as, request=request, progress=progress, cancel=flag)
            except asyncio.CancelledError:
                flag.set()
                raise

        def cancel(request: gr.Request):
            return self.cancel(request)

        sizing = [i["image"], i["width"], i["height"]]
        for source in (i["image"].change, i["width"].change, i["height"].change):
            source(preview, sizing, i["crop"], api_visibility="private", concurrency_limit=1,
                   concurrency_id="preview", show_progress="minimal",
                   trigger_mode="always_last")  # one at a time, and the last values always shown
        names = ("image", "speed", "seed", "randomize", "motion", "fps", "frames", "steps", "min_guidance",
                 "max_guidance", "noise_aug", "width", "height", "f3_schedule", "f3_ratio", "cache_interval",
                 "cache_depth", "guidance_cut", "also")  # in `generate`'s order
        event = o["run"].click(generate, [i[n] for n in names], [o["video"], o["files"], i["seed"], o["info"]],
                               api_name="generate", concurrency_limit=1, concurrency_id="model",
                               show_progress_on=[o["video"]])
        o["stop"].click(cancel, None, o["info"], cancels=[event], queue=False, api_visibility="private")


def _track(progress, flag: threading.Event) -> None:
    """Gradio's progress follows svdlite's tqdm bars (track_tqdm; sampling, then decoding): name each with its
    place and the time left, estimated from the bar's own rate, and stop the run when the cancel flag is set (the
    run raises `Cancelled` from its next step, so the model is freed, not left working for nobody)."""
    plain = progress.update

    def update(n=1):
        if flag.is_set():
            raise Cancelled()
        bar = progress.iterables[-1] if progress.iterables else None
        if bar is not None and bar._tqdm is not None and bar.length:
            stage = getattr(bar, "stage", None) or bar.desc or "working"
            bar.stage = stage
            done = (bar.index or 0) + n
            elapsed = bar._tqdm.format_dict.get("elapsed", 0.0)
            left = elapsed / done * (bar.length - done) if done else float("nan")
            bar.desc = (f"{stage}: about {_time_left(left)} left" if done < bar.length and math.isfinite(left)
                        else stage)
        return plain(n)

    progress.update = update

