"""The floor of FID and FVD on the phantom world: real TRAIN phantoms against real TEST ones.

    python export.py detectors                                   # the real weights, once
    python benchmarks/bench_metrics_floor.py --phantom demo/phantom --out demo/floor --runs 3
    python benchmarks/bench_metrics_floor.py --phantom demo/phantom640 --out demo/floor640 \
        --fake-frames 128 --real-frames 144 --videos 16 --no-fid --runs 3      # FVD128

A generated set can only be judged against what two real sets of the same size score against
each other. This writes StyleGAN-V reference folders (`data.py reference`: resampled to `--fps`,
gray as 3 channels, 112x112) of N TEST phantoms (`--fake-frames` each: the "fake" side, FVD
clips from frame 0) and of N TRAIN phantoms (`--real-frames` each: the real side, FVD clips at
seeded offsets: --runs K runs evaluate.py with seeds 0..K-1, K offset sets; with as many frames
as a clip there is one offset and no spread): FID over every frame, FVD over one clip of
`--fake-frames` per video (fvd{N}_16f, fvd{N}_128f). A phantom qualifies for a side when it
lasts at least that side's frames / fps seconds (data.make_reference skips shorter ones, as the
original does; phantoms last 2-5.6 s); N is the smaller count, cut to `--videos`. With few
videos both metrics are dominated by their small-sample bias (covariances of rank N - 1 in 2048
or 400 dimensions): compare only numbers of the same N and frame rate. Use a fresh `--out` per
setting: folders already of the right length are kept.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import data  # noqa: E402
import evaluate  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--phantom", default="demo/phantom", help="phantom dataset (made if absent)")
parser.add_argument("--num-phantoms", type=int, default=80, help="videos, if it is made")
parser.add_argument("--out", default="demo/floor", help="reference folders and results.jsonl")
parser.add_argument("--fps", type=float, default=32.0, help="frame rate of both sides' folders")
parser.add_argument("--fake-frames", type=int, default=16, help="frames per TEST folder: the "
                    "FVD clip length (16 or 128)")
parser.add_argument("--real-frames", type=int, default=32, help="frames per TRAIN folder "
                    "(at least --fake-frames)")
parser.add_argument("--videos", type=int, default=0, help="videos per side (0: every TEST "
                    "phantom long enough)")
parser.add_argument("--no-fid", action="store_true", help="FVD only (FID reads every frame)")
parser.add_argument("--runs", type=int, default=3, help="real clip-offset draws (FVD spread)")
parser.add_argument("--detectors", default="models/detectors", help="evaluate.py --detectors")
parser.add_argument("--workers", type=int, default=0, help="evaluate.py --workers")


def fail(msg):
    raise SystemExit(f"bench_metrics_floor.py: error: {msg}")


def reference(root, split, out, frames, fps, videos):
    """data.make_reference on the `split` videos of `root` (it reads TRAIN rows only: a FileList
    calling `split` TRAIN, beside links to the videos). Returns the folder count."""
    view = out + "-filelist"
    os.makedirs(view, exist_ok=True)
    rows = [dict(r, Split="TRAIN") for r in data.read_filelist(root) if r["Split"] == split]
    data.write_filelist(os.path.join(view, "FileList.csv"), rows)
    if not os.path.exists(os.path.join(view, "Videos")):
        os.symlink(os.path.abspath(os.path.join(root, "Videos")), os.path.join(view, "Videos"))
    return data.make_reference(view, out, frames=frames, fps=fps, num_videos=videos)


def main(args):
    if args.real_frames < args.fake_frames:
        fail(f"--real-frames {args.real_frames} is shorter than the --fake-frames "
             f"{args.fake_frames} clips the real side must hold")
    if not os.path.isfile(os.path.join(args.phantom, "FileList.csv")):
        data.make_phantom(args.phantom, args.num_phantoms, seed=0, workers=os.cpu_count() or 1)
    rows = data.read_filelist(args.phantom)
    # Who qualifies: make_reference's rule, a video of at least frames / fps seconds.
    count = {}
    for split, frames in (("TEST", args.fake_frames), ("TRAIN", args.real_frames)):
        long = sum(r["NumberOfFrames"] / r["FPS"] >= frames / args.fps
                   for r in rows if r["Split"] == split)
        count[split] = long
        print(f"{long} of {sum(r['Split'] == split for r in rows)} {split} phantoms last at "
              f"least {frames / args.fps:g} s ({frames} frames at {args.fps:g} fps)")
    n = min(args.videos or count["TEST"], count["TEST"], count["TRAIN"])
    if n == 0:
        fail(f"--phantom {args.phantom}: no TEST or no TRAIN phantom is long enough; make a "
             "bigger world (--num-phantoms) or ask fewer frames")
    tag = f"{args.fps:g}fps"
    fake = os.path.join(args.out, f"test{args.fake_frames}-{tag}")
    real = os.path.join(args.out, f"train{args.real_frames}-{tag}")
    reference(args.phantom, "TEST", fake, args.fake_frames, args.fps, n)
    reference(args.phantom, "TRAIN", real, args.real_frames, args.fps, n)
    print(f"{n} TEST videos ({args.fake_frames} frames) against {n} TRAIN videos "
          f"({args.real_frames} frames), {args.fps:g} fps")
    fvd, values = f"fvd{n}_{args.fake_frames}f", []
    # FID does not depend on the seed; FVD's real clip offsets do: one evaluate.py run per seed.
    for seed in range(args.runs):
        metrics = [fvd] if seed or args.no_fid else [f"fid{args.fake_frames * n}_full", fvd]
        table = evaluate.main(["--real", real, "--fake", fake, "--metrics", ",".join(metrics),
                               "--seed", str(seed), "--detectors", args.detectors, "--no-cache",
                               "--workers", str(args.workers), "--out",
                               os.path.join(args.out, "results.jsonl")])
        values.append(dict(table)[fvd])
    print(f"{fvd} over {args.runs} real-offset draws (seeds 0..{args.runs - 1}): "
          f"{np.mean(values):.1f} +- {np.std(values):.1f}")


if __name__ == "__main__":
    try:
        main(parser.parse_args())
    except data.DataError as err:                     # a FileList or a video, named
        fail(err)
