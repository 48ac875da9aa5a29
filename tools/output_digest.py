"""Digests of svdlite's outputs on the bundled tiny model, one per option and path, to show that a change of code
leaves every output bit for bit as it was.

    python tools/output_digest.py --json before.json            # before the change
    python tools/output_digest.py --compare before.json         # after it: exit code 1 if any output moved

Each row runs `generate` (or `run_batch`, `calibrate_f3`) with one option or pair of options and records the sha256
of the final latents' bytes and of the uint8 frames. Float results depend on the CPU and the thread count, so
compare digests made on one machine with the same --threads (default 1).
"""
import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch
from svdlite.outputs import add_force, check_outputs, write_text


REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "svdlite" / "assets" / "example.png"
SMALL = dict(num_frames=3, num_inference_steps=4, height=64, width=64)


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def rows(model, schedule) -> dict[str, dict]:
    """Every option's run: {name: {"latents": sha, "frames": sha}}."""
    import svdlite

    variants = {
        "exact": {}, "guidance cut 2": {"guidance_cut_step": 2},
        "cache 2 depth 0": {"cache_interval": 2, "cache_depth": 0}, "cache 2 default depth": {"cache_interval": 2},
        "cache 3 depth 1": {"cache_interval": 3, "cache_depth": 1},
        "f3 0.3": {"f3_schedule": schedule, "f3_ratio": 0.3},
        "f3 0.3 contribution": {"f3_schedule": schedule, "f3_ratio": 0.3, "f3_statistic": "contribution"},
        "ays 4": {"schedule": "ays"}, "speed balanced": {"speed": "balanced"},
        "speed fast": {"speed": "fast", "num_inference_steps": 4},
        "cut x cache": {"guidance_cut_step": 2, "cache_interval": 2, "cache_depth": 0},
        "cut x f3": {"guidance_cut_step": 2, "f3_schedule": schedule, "f3_ratio": 0.3},
        "cache x f3": {"cache_interval": 2, "cache_depth": 0, "f3_schedule": schedule, "f3_ratio": 0.3},
        "ays x cut": {"schedule": "ays", "guidance_cut_step": 2},
        "min = max guidance": {"min_guidance_scale": 2.0, "max_guidance_scale": 2.0},
    }
    out = {}
    for name, options in variants.items():
        try:
            video = svdlite.generate(IMAGE, model=model, seed=7, progress=False, **(SMALL | options))
        except (ValueError, TypeError) as err:  # an option this version refuses: recorded, compared as such
            out[name] = {"refused": str(err)}
            continue
        out[name] = {"latents": digest(video.latents), "frames": digest(video.frames)}
    videos = svdlite.generate([IMAGE, IMAGE], model=model, seed=[3, 4], batch_size=2, progress=False, **SMALL)
    out["two at a time"] = {"latents": digest(torch.cat([v.latents for v in videos])),
                            "frames": digest(torch.cat([v.frames for v in videos]))}
    with tempfile.TemporaryDirectory() as tmp:
        from svdlite.batch import run_batch

        folder = Path(tmp) / "in"
        folder.mkdir()
        for k in range(2):
            (folder / f"{k}.png").write_bytes(IMAGE.read_bytes())
        summary = run_batch([folder], Path(tmp) / "out", model=model, seed=5, progress=False, **SMALL)
        out["batch"] = {"frames": "/".join(sorted(r["frames_sha256"][:16] for r in summary["records"])),
                        "seeds": "/".join(str(r["seed"])
                                          for r in sorted(summary["records"], key=lambda r: r["input"]))}
    stats = schedule.stats["attention"]
    out["calibrate"] = {"attention": digest(torch.tensor(stats, dtype=torch.float64))}
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--json", type=Path, help="write the digests to this file")
    g.add_argument("--compare", type=Path, help="compare with the digests in this file; exit code 1 if any differs")
    add_force(p)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.json is not None:
        check_outputs(p, [args.json], args.force)
    if args.compare is not None and not args.compare.is_file():
        p.error(f"{args.compare} not found")
    torch.set_num_threads(args.threads)
    import svdlite
    from svdlite.calibrate import calibrate_f3

    model = svdlite.load_model("tiny", device="cpu", dtype=torch.float32)
    schedule = calibrate_f3([IMAGE, IMAGE], model=model, seed=1, progress=False,
                            **{k: v for k, v in SMALL.items()})
    result = rows(model, schedule)
    if args.json is not None:
        write_text(args.json, json.dumps(result, indent=1))  # a temporary file renamed into place
        print(f"wrote {args.json} ({len(result)} rows)")
        return 0
    before = json.loads(args.compare.read_text())
    moved = [name for name in sorted(set(before) | set(result)) if before.get(name) != result.get(name)]
    for name in sorted(set(before) | set(result)):
        print(f"{'same ' if name not in moved else 'MOVED'} {name}")
    print(f"{len(result) - len(moved)} of {len(set(before) | set(result))} outputs bit for bit the same")
    return 1 if moved else 0


if __name__ == "__main__":
    sys.exit(main())
