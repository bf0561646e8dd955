"""Speed of evaluate.py's parts: Inception-v3 frames/s, I3D clips/s, jpg decoding, sqrtm.

    python export.py detectors                               # the real weights, once
    python benchmarks/bench_evaluate.py                      # CPU, all threads
    python benchmarks/bench_evaluate.py --device cuda        # TF32 off, as the metrics run
    python benchmarks/bench_evaluate.py --threads 1 --clock cpu   # a shared machine: see below

A measurement, not a test. Inputs are what the metrics feed the detectors [metrics.md 4]:
uint8 112x112 frames (Inception resizes them to 299x299, features for FID), uint8
[B, 3, n, 112, 112] clips (I3D rescales and resizes them to 224x224, logits for FVD), and
[B, 3, 16, 224, 224] clips straight into the I3D. The weights are the real ones from
--detectors (random ones, said so, if that folder is empty; the speed does not depend on
them). No reference implementation runs here; the numbers are in docs/evaluate.md. On a
machine shared with other jobs wall time measures the others: `--threads 1 --clock cpu` times
this process's CPU seconds on one thread instead (throughput per core).
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import PIL.Image
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import detectors  # noqa: E402
import evaluate as E  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--device", default="cpu", help="torch device")
parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
parser.add_argument("--repeats", type=int, default=3, help="timed calls per case (best kept)")
parser.add_argument("--inception-batch", type=int, default=16,
                    help="frames per Inception call (StyleGAN-V: 64 real / 32 fake)")
parser.add_argument("--clips", type=int, default=1, help="clips per I3D call (StyleGAN-V: "
                    "128 // n, i.e. 8 for 16 frames, 1 for 128)")
parser.add_argument("--lengths", default="16,128", help="I3D clip lengths to time")
parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: time.perf_counter; cpu: this process's CPU time (process_time)")
parser.add_argument("--detectors", default="models/detectors",
                    help="folder written by `python export.py detectors`")
args = parser.parse_args()


def best_time(fn, repeats, sync):
    """Seconds of the fastest of `repeats` calls of fn(), after one warm-up call."""
    fn()
    sync()
    times, clock = [], time.process_time if args.clock == "cpu" else time.perf_counter
    for _ in range(repeats):
        start = clock()
        fn()
        sync()
        times.append(clock() - start)
    return min(times)


def main():
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} CPU threads, "
          f"{os.cpu_count()} cores visible, load average {os.getloadavg()[0]:.1f}")
    print(f"command: python benchmarks/bench_evaluate.py {' '.join(sys.argv[1:])}".rstrip())
    gen = torch.Generator().manual_seed(0)
    print(f"clock: {args.clock}\n\n{'case':<58s} {'throughput':>12s}  {'per call':>10s}")

    def row(name, rate, unit, t):               # printed as measured (a slow machine shows some)
        print(f"{name:<58s} {rate:8.2f} {unit:<9s} {t * 1000:7.0f} ms", flush=True)

    def detector(name):
        if os.path.isfile(os.path.join(args.detectors, detectors.FILES[name])):
            return detectors.load_detector(name, args.detectors, device)
        print(f"note: no {detectors.FILES[name]} in {args.detectors}: random weights")
        net = detectors.InceptionV3() if name == "inception" else detectors.I3D()
        return net.eval().to(device)

    with torch.inference_mode():
        inception = detector("inception")
        b = args.inception_batch
        x = torch.randint(0, 256, (b, 3, 112, 112), generator=gen, dtype=torch.uint8).to(device)
        t = best_time(lambda: inception(x, return_features=True), args.repeats, sync)
        row(f"Inception-v3, {b} frames 112->299, features", b / t, "frames/s", t)

        i3d = detector("i3d")
        x = torch.rand(args.clips, 3, 16, 224, 224, generator=gen).to(device) * 2 - 1
        t = best_time(lambda: i3d(x, return_features=True), args.repeats, sync)
        row(f"I3D, {args.clips} clip(s) of 16 frames 224x224, logits", args.clips / t,
                     "clips/s", t)
        for n in [int(v) for v in args.lengths.split(",")]:
            clip = torch.randint(0, 256, (args.clips, 3, n, 112, 112), generator=gen,
                                 dtype=torch.uint8).to(device)
            t = best_time(lambda c=clip: i3d(c, rescale=True, resize=True,
                                             return_features=True), args.repeats, sync)
            row(f"I3D, {args.clips} clip(s) of {n} frames 112->224, logits",
                         args.clips / t, "clips/s", t)

    # The reader: Pillow decoding 112x112 quality-100 jpgs (EchoNet's), one process.
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        for i in range(64):
            img = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
            PIL.Image.fromarray(img).save(os.path.join(tmp, f"{i:04d}.jpg"), quality=100)
        files = E.list_images(tmp)
        frames = E.FrameDataset(tmp, files, 112)
        t = best_time(lambda: [frames[i] for i in range(len(frames))], args.repeats, sync)
        row("jpg decoding (Pillow), 64 frames 112x112, 1 process", 64 / t,
                     "frames/s", t)

    # The Frechet distance of two 2048-d Gaussians (FID): one scipy sqrtm, timed once.
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4096, 2048)), rng.normal(size=(4096, 2048)) * 1.1
    stats = [(x.mean(0), np.cov(x, rowvar=False, bias=True)) for x in (a, b)]
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    start = clock()
    E.frechet_distance(*stats[0], *stats[1])
    t = clock() - start
    row("Frechet distance, 2048-d (scipy.linalg.sqrtm), once", 1 / t, "calls/s", t)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
