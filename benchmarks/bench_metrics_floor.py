"""The floor of FID and FVD16 on the phantom world: real TRAIN phantoms against real TEST ones.

    python export.py detectors                                   # the real weights, once
    python benchmarks/bench_metrics_floor.py --phantom demo/phantom --out demo/floor --runs 3

A generated set can only be judged against what two real sets of the same size score against
each other. This writes StyleGAN-V reference folders (`data.py reference`: 32 fps, gray as 3
channels, 112x112) of the TEST phantoms (16 frames each: the "fake" side, FVD clips from frame
0) and of as many TRAIN phantoms (`--real-frames` each: the real side, FVD clips at seeded
offsets, so --runs K draws K offset sets), then runs evaluate.py on them: FID over every frame,
FVD16 over one clip per video. With few videos both are dominated by their small-sample bias
(covariances of rank n - 1 in 2048 or 400 dimensions): compare only numbers of the same size.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import data  # noqa: E402
import evaluate  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--phantom", default="demo/phantom", help="phantom dataset (made if absent)")
parser.add_argument("--num-phantoms", type=int, default=80, help="videos, if it is made")
parser.add_argument("--out", default="demo/floor", help="reference folders and results.jsonl")
parser.add_argument("--videos", type=int, default=0, help="videos per side (0: all TEST ones)")
parser.add_argument("--real-frames", type=int, default=32, help="frames per TRAIN folder")
parser.add_argument("--runs", type=int, default=3, help="real clip-offset draws (FVD spread)")
parser.add_argument("--detectors", default="models/detectors", help="evaluate.py --detectors")
parser.add_argument("--workers", type=int, default=0, help="evaluate.py --workers")


def reference(root, split, out, frames, videos):
    """data.make_reference on the `split` videos of `root` (it reads TRAIN rows only: a FileList
    calling `split` TRAIN, beside links to the videos). Returns the folder count."""
    view = out + "-filelist"
    os.makedirs(view, exist_ok=True)
    rows = [dict(r, Split="TRAIN") for r in data.read_filelist(root) if r["Split"] == split]
    data.write_filelist(os.path.join(view, "FileList.csv"), rows)
    if not os.path.exists(os.path.join(view, "Videos")):
        os.symlink(os.path.abspath(os.path.join(root, "Videos")), os.path.join(view, "Videos"))
    return data.make_reference(view, out, frames=frames, fps=32.0, num_videos=videos)


def main(args):
    if not os.path.isfile(os.path.join(args.phantom, "FileList.csv")):
        data.make_phantom(args.phantom, args.num_phantoms, seed=0, workers=os.cpu_count() or 1)
    test = sum(r["Split"] == "TEST" for r in data.read_filelist(args.phantom, probe=False))
    n = args.videos or test
    fake = os.path.join(args.out, "test16")
    real = os.path.join(args.out, f"train{args.real_frames}")
    n = min(reference(args.phantom, "TEST", fake, 16, n),
            reference(args.phantom, "TRAIN", real, args.real_frames, n))
    print(f"{n} TEST videos (16 frames) against {n} TRAIN videos ({args.real_frames} frames)")
    evaluate.main(["--real", real, "--fake", fake, "--metrics", f"fid{16 * n}_full,fvd{n}_16f",
                   "--runs", str(args.runs), "--detectors", args.detectors, "--no-cache",
                   "--workers", str(args.workers), "--out", os.path.join(args.out,
                                                                         "results.jsonl")])


if __name__ == "__main__":
    main(parser.parse_args())
