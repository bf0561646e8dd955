"""The EF estimator's own bar (data.measure_ef): Pearson r and MAE against the phantoms' true EF,
on whole videos and on the clips the models make (frames at a lower fps, as sample.py writes
them), clean and degraded (blur, gray offset and contrast, a tint, noise).

    python benchmarks/ef_estimator.py --num-videos 200 --seed 0

The bar the demo relies on: r >= 0.99 and MAE <= 1 on clean videos in every format it scores
(tests/test_data.py asserts it for 16-frame 12-fps clips). Two windows per video for clips.
"""

import argparse
import os
import sys
import tempfile

import numpy as np
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402

FORMATS = [("whole video", 0, 0), ("16 frames @ 12 fps", 16, 12), ("24 frames @ 16 fps", 24, 16),
           ("64 frames @ 32 fps", 64, 32)]


def degrade(video, rng):
    """Blur 1.5 px, gray offset 15, contrast 0.8, a tint, noise sigma 10 (as tests/test_data.py)."""
    worse = 15 + 0.8 * ndimage.gaussian_filter(video.astype(np.float32), (0, 1.5, 1.5, 0))
    worse = worse * np.array([1.0, 0.9, 0.8]) + rng.normal(0, 10, video.shape)
    return np.clip(worse, 0, 255).astype(np.uint8)


def clips(video, native, frames, fps, rng):
    """The whole video, or two windows of `frames` frames at `fps` from random starts."""
    if not frames:
        return [video]
    idx = np.round(np.arange(frames) * native / fps).astype(int)
    return [video[idx + int(rng.integers(0, len(video) - idx[-1]))] for _ in range(2)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-videos", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as root:
        rows = data.make_phantom(root, num_videos=args.num_videos, seed=args.seed)
        scores = {}
        for row in rows:
            video, native = data.read_video(os.path.join(root, "Videos", row["FileName"] + ".avi"))
            for name, frames, fps in FORMATS:
                for clip in clips(video, native, frames, fps, rng):
                    for kind, x in (("clean", clip), ("degraded", degrade(clip, rng))):
                        pairs = scores.setdefault((name, kind), ([], []))
                        pairs[0].append(row["EF"])
                        pairs[1].append(data.measure_ef(x)["ef"])
    print(f"{args.num_videos} phantoms, seed {args.seed}\n")
    print("| format | videos | Pearson r | MAE | bias | worst |\n|---|---|---|---|---|---|")
    for (name, kind), (true, measured) in scores.items():
        error = np.asarray(measured) - np.asarray(true)
        r = data.ef_adherence(true, measured)["pearson_r"]
        print(f"| {name} | {kind} | {r:.4f} | {np.abs(error).mean():.2f} | {error.mean():+.2f} "
              f"| {np.abs(error).max():.2f} |")


if __name__ == "__main__":
    main()
