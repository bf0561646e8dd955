"""Speed of data.py's hot paths on this machine's CPU: the phantom generator, EF measurement (with
its accuracy on the generated videos), video decoding, and the two datasets' items per second.

    python benchmarks/bench_data.py                    # 60 phantom videos, ~1 min on 2 cores
    python benchmarks/bench_data.py --num-videos 200 --workers 2

There is no reference implementation to run beside it: the original reads data with pandas and
decord, which this project does not install, so the figures are absolute, not ratios.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import data  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--num-videos", type=int, default=60, help="phantom videos (default: 60)")
parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="phantom processes and DataLoader workers (default: all CPUs)")
parser.add_argument("--items", type=int, default=2000, help="dataset items timed (default: 2000)")
args = parser.parse_args()


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def items_per_second(dataset, workers):
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(0))
    count, start = 0, time.perf_counter()
    while count < args.items:
        for batch in loader:
            count += len(batch["latents"] if isinstance(batch, dict) else batch)
            if count >= args.items:
                break
    return count / (time.perf_counter() - start)


print(f"command: python benchmarks/bench_data.py --num-videos {args.num_videos} "
      f"--workers {args.workers} --items {args.items}")
torch.set_num_threads(1)
with tempfile.TemporaryDirectory() as tmp:
    # Phantom generation: rendering alone, then whole datasets (render + MJPEG write) on 1 and N
    # processes.
    rng = np.random.default_rng(0)
    _, seconds = timed(lambda: [data.phantom_video(rng, 175, 50) for _ in range(10)])
    print(f"phantom render      : {10 / seconds:6.1f} videos/s (175 frames, no file)")
    for workers in sorted({1, args.workers}):
        out = os.path.join(tmp, f"phantom{workers}")
        rows, seconds = timed(lambda out=out, w=workers: data.make_phantom(out, args.num_videos,
                                                                             0, w))
        print(f"phantom dataset     : {args.num_videos / seconds:6.1f} videos/s with {workers} "
              f"process(es), {args.num_videos} videos in {seconds:.1f} s")

    # Decoding and EF measurement, with the measurement's accuracy on these videos.
    paths = [os.path.join(out, "Videos", r["FileName"] + ".avi") for r in rows]
    videos, seconds = timed(lambda: [data.read_video(p)[0] for p in paths])
    frames = sum(len(v) for v in videos)
    print(f"read_video          : {len(paths) / seconds:6.1f} videos/s ({frames / seconds:.0f} "
          "frames/s)")
    results, seconds = timed(lambda: [data.measure_ef(v) for v in videos])
    score = data.ef_adherence([r["EF"] for r in rows], [m["ef"] for m in results])
    print(f"measure_ef          : {len(paths) / seconds:6.1f} videos/s; on these phantoms "
          f"r = {score['pearson_r']:.4f}, MAE = {score['mae']:.2f} EF points (n = {score['n']})")

    # Datasets: FrameDataset on the phantom videos, LatentVideoDataset on random latents of the
    # same lengths (written with torch.save as `data.py encode` does).
    frame_set = data.FrameDataset(out, "TRAIN")
    for workers in sorted({0, args.workers}):
        print(f"FrameDataset        : {items_per_second(frame_set, workers):6.0f} items/s, "
              f"{workers} workers (3 x 112 x 112 frames)")
    os.makedirs(os.path.join(out, "Latents"))
    for r in rows:
        torch.save(torch.randn(r["NumberOfFrames"], 4, 14, 14),
                   os.path.join(out, "Latents", r["FileName"] + ".pt"))
    repeats = -(-args.items // len(rows))          # one root listed k times: no epoch restarts
    latent_set = data.LatentVideoDataset([out] * repeats, ["TRAIN", "VAL", "TEST"])
    for workers in sorted({0, args.workers}):
        print(f"LatentVideoDataset  : {items_per_second(latent_set, workers):6.0f} items/s, "
              f"{workers} workers (64 x 4 x 14 x 14 windows)")
