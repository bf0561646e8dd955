"""EchoNet data for echolvdm: file lists, video I/O, pixels and per-item generators, fps
resampling, the latent video dataset, the phantom echo world (generator + EF measurement) and
three commands (layout, phantom world and differences from the original: docs/data.md).

    python data.py phantom --out data/phantom --num-videos 200 --seed 0     # synthetic EchoNet set
    python data.py encode --root data/phantom --vae models/vae --gray-scale  # Videos/ -> Latents/
    python data.py reference --root data/EchoNet-Dynamic --out data/reference/dynamic --frames 128

Follows EchoNet-Synthetic (Reynaud et al., MICCAI 2024): the `Latent` dataset of
`echosyn/common/datasets.py`, `scripts/encode_video_dataset.py`,
`scripts/create_reference_dataset.py` and `scripts/complete_pediatrics_filelist.py`.
"""

import argparse
import contextlib
import csv
import fcntl
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import sys
import warnings
from fractions import Fraction
from types import SimpleNamespace

import av
import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

import model


# --- file lists ----------------------------------------------------------------------------------
class DataError(Exception):
    """Bad input data; the message names the file and what is wrong (main() exits cleanly)."""

FILELIST_COLUMNS = ["FileName", "EF", "ESV", "EDV", "FrameHeight", "FrameWidth", "FPS",
                    "NumberOfFrames", "Split"]                 # EchoNet-Dynamic's FileList.csv
VIDEO_COLUMNS = ["FrameHeight", "FrameWidth", "FPS", "NumberOfFrames"]  # Pediatric lacks them
NUMBER_COLUMNS = {"EF": float, "ESV": float, "EDV": float, "FrameHeight": int, "FrameWidth": int,
                  "FPS": float, "NumberOfFrames": int, "Fold": int}

def _video_path(root, name):
    return os.path.join(root, "Videos", name + ".avi")

def read_filelist(root, probe=True):
    """Rows of `<root>/FileList.csv` as dicts, numbers parsed, Split in TRAIN/VAL/TEST; Pediatric's
    folds 0..9 mapped as the original's `complete_pediatrics_filelist.py` does (docs/data.md). With
    `probe`, missing frame columns are read from the videos; without it they stay None."""
    path = os.path.join(root, "FileList.csv")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no FileList.csv (expected the EchoNet layout)")
    with open(path, newline="", encoding="utf-8-sig") as f:   # -sig: tolerate a BOM
        reader = csv.DictReader(f)
        missing = [c for c in ("FileName", "EF", "Split") if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
        raw_rows = list(reader)
    folds = bool(raw_rows) and all((r["Split"] or "").strip().isdecimal() for r in raw_rows)
    rows = []
    for line, raw in enumerate(raw_rows, start=2):
        row = dict.fromkeys(FILELIST_COLUMNS)                  # standard columns first, then extras
        row.update({k: (v or "").strip() or None for k, v in raw.items() if k is not None})
        name = row["FileName"] or ""
        row["FileName"] = name[:-4] if name.lower().endswith(".avi") else name
        where = f"{path}, line {line} ({row['FileName']})"
        for column in [c for c in NUMBER_COLUMNS if row.get(c) is not None]:
            try:
                row[column] = NUMBER_COLUMNS[column](float(row[column]))
            except ValueError:
                raise DataError(f"{where}: {column} {row[column]!r} is not a number") from None
            if column in ("FPS", "NumberOfFrames") and not row[column] > 0:
                raise DataError(f"{where}: {column} {row[column]} is not positive")
        if folds:                                              # decimal digits: the fold is >= 0
            row["Fold"] = fold = int(row["Split"])
            if fold > 9:
                raise DataError(f"{where}: fold {fold} outside 0..9")
            row["Split"] = "TRAIN" if fold < 8 else "VAL" if fold == 8 else "TEST"
        elif row["Split"] not in ("TRAIN", "VAL", "TEST"):
            raise DataError(f"{where}: Split {row['Split']!r} is not TRAIN, VAL, TEST or a fold")
        if row["EF"] is None or not 0 <= row["EF"] <= 100:
            raise DataError(f"{where}: EF {row['EF']} outside [0, 100]")
        if probe and any(row[c] is None for c in VIDEO_COLUMNS):
            row.update(probe_video(_video_path(root, row["FileName"])))
        rows.append(row)
    return rows

def write_filelist(path, rows):
    """Rows (dicts with the same keys) as a FileList.csv the way the original's pandas writes
    it: LF line ends, None as an empty cell, an integral FPS as an integer (50, not 50.0)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(list(rows[0]) if rows else FILELIST_COLUMNS)
    writer.writerows([["" if v is None else int(v) if k == "FPS" and float(v).is_integer() else v
                       for k, v in row.items()] for row in rows])
    save(path, text.getvalue())

# --- output folders: files written whole, one run at a time, settings recorded -------------------
def write_whole(path, write):
    """write(tmp) fills `path` under a temporary name, renamed into place when complete (a killed
    run never leaves a half file); a failed write (a full disk, a read-only folder) removes the
    temporary file and raises DataError naming `path`. Files get the umask's permissions."""
    tmp = path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp) if os.path.isdir(tmp) else os.path.lexists(tmp) and os.remove(tmp)
        raise DataError(f"{(e.strerror or str(e)).lower()} while writing {path}") from None

def save(path, value):
    """write_whole for a str (as text) or anything torch.save takes (through a file object, so
    that a full disk is an OSError, not torch's RuntimeError)."""
    def write(tmp):
        with open(tmp, "w" if isinstance(value, str) else "wb") as f:
            f.write(value) if isinstance(value, str) else torch.save(value, f)
    write_whole(path, write)

def check_ranges(values, ranges, dash="-"):
    """Numeric flags checked before any work: values[name] in ranges[name] = (low, high or
    None), NaN and inf refused; the message names the flag --name (with `dash` for _)."""
    for name, (low, high) in ranges.items():
        x = values.get(name)
        if x is not None and not (math.isfinite(x) and low <= x <= (high or math.inf)):
            raise DataError(f"--{name.replace('_', dash)} {x}: must be a finite number "
                            + (f"in [{low}, {high}]" if high else f">= {low}"))

def error_line(e):
    """The one line a command prints for an error: an OSError's file and reason; for an error
    raised in a DataLoader worker (its message ends the worker's traceback), its last line."""
    if isinstance(e, OSError):
        return f"{e.filename}: {e.strerror}" if e.filename else f"{e.strerror or e}"
    lines = str(e).strip().splitlines() or [""]
    return lines[-1].split(": ", 1)[-1] if "Original Traceback" in str(e) else lines[0]

def join_processes(device):
    """(device, rank, world size). Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) a process on
    GPUs takes cuda:LOCAL_RANK, and each joins the process group: nccl on GPUs, gloo on CPUs."""
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", device.index or 0)))
        torch.cuda.set_device(device)
    if "RANK" in os.environ:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

@contextlib.contextmanager
def locked(folder, flag):
    """Hold <folder>/.lock while the block runs: a second run into the folder is refused, naming
    the holder. An flock: the kernel drops it when its process dies, so a killed run's is free."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".lock"), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise DataError(f"{flag} {folder}: in use by another run ({f.read() or 'starting'}; "
                            f"its .lock): wait for it, or use another {flag}") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {os.uname().nodename}")
        f.flush()
        yield

def check_settings(path, settings, done, flag):
    """Refuse to add to results made with other settings: `path` (settings.json) records those
    of the results already in its folder (`done`: there are some). A folder without results
    takes any settings: a run that failed before its first result never blocks the fix."""
    old = None
    if done and os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
    changed = [f"{k} {old.get(k)!r} -> {settings.get(k)!r}" for k in {**settings, **old}
               if old.get(k) != settings.get(k)] if old else []
    if done and (changed or old is None):
        raise DataError(f"{os.path.dirname(path)} holds results made with other settings ("
                        + ("; ".join(changed) or f"not recorded in {os.path.basename(path)}")
                        + f"): use the same settings to resume, or another {flag}")

# --- video I/O (PyAV) ----------------------------------------------------------------------------
@contextlib.contextmanager
def _opened(path):
    """(container, its first video stream) of a video file; FFmpeg's errors -> DataError."""
    try:
        with av.open(path) as container:
            yield container, container.streams.video[0]
    except (av.error.FFmpegError, IndexError, TypeError) as e:
        raise DataError(f"{path}: unreadable video ({e})") from None

def probe_video(path):
    """FrameHeight, FrameWidth, FPS, NumberOfFrames of a video, from its header when it has them."""
    with _opened(path) as (container, stream):
        n = stream.frames or sum(1 for _ in container.decode(stream))
        rate = stream.average_rate or stream.guessed_rate
    if not rate:
        raise DataError(f"{path}: no frame rate in the video")
    return dict(zip(VIDEO_COLUMNS, (stream.height, stream.width, float(rate), n)))

def read_video(path, size=None):
    """Decode all frames of a video. Returns (uint8 [F, H, W, 3] RGB, fps); `size` resizes to
    size x size (ffmpeg's scaler, as decord's `width=height=112` in the original)."""
    resize = {"width": size, "height": size} if size else {}
    with _opened(path) as (container, stream):
        frames = [f.to_ndarray(format="rgb24", **resize) for f in container.decode(stream)]
        expected, fps = stream.frames, float(stream.average_rate or stream.guessed_rate or 0)
    if not frames or len(frames) < expected:
        raise DataError(f"{path}: truncated video ({len(frames)} of {expected} frames decoded)")
    return np.stack(frames), fps

def save_video(path, frames, fps, fmt=None):
    """Write uint8 frames [F, H, W] (gray) or [F, H, W, 3] (RGB) as `avi` (MJPEG, qscale 1, the
    original's imageio quality 10), `mp4` (H.264), `gif`, or a `jpg`/`png` frame folder
    `path/0000.jpg ...` (JPEG quality 100, as the original's `save_as_img`); `fmt` defaults to
    the extension. Through write_whole: a killed run leaves no half file."""
    frames, fmt = np.asarray(frames), fmt or os.path.splitext(path)[1].lstrip(".").lower()

    def write(tmp):
        if fmt in ("jpg", "png"):
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            for i, frame in enumerate(frames):
                Image.fromarray(frame).save(os.path.join(tmp, f"{i:04d}.{fmt}"), quality=100)
            shutil.rmtree(path, ignore_errors=True)
        elif fmt == "gif":
            images = [Image.fromarray(frame) for frame in frames]
            images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                           duration=round(1000 / fps), loop=0)
        else:
            with av.open(tmp, "w", format=fmt) as container:
                codec = "mjpeg" if fmt == "avi" else "libx264"
                stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
                stream.height, stream.width = frames.shape[1:3]
                stream.pix_fmt = "yuvj420p" if fmt == "avi" else "yuv420p"
                if fmt == "avi":
                    stream.options = {"qmin": "1", "qmax": "1"}
                pixel_format = "gray" if frames.ndim == 3 else "rgb24"
                for frame in frames:
                    container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, pixel_format)))
                container.mux(stream.encode())
    write_whole(path, write)

# --- pixels, latents and per-item generators (train.py and sample.py use these too) -------------
def from_pixels(frames, gray=False):
    """uint8 RGB frames [..., H, W, 3] (numpy or torch) -> float [..., 3, H, W] as the original's
    encoder input, x / 128 - 1 (in [-1, 1)); `gray` repeats the RGB mean, as its --gray_scale."""
    x = torch.as_tensor(frames).movedim(-1, -3).float() / 128 - 1
    return (x.mean(-3, keepdim=True).expand_as(x) if gray else x).contiguous()

def to_pixels(x):
    """Images [..., 3, H, W] in [-1, 1] -> uint8 numpy [..., H, W, 3]: (x + 1) * 128, clamped to
    0..255 and truncated, as the original's sampler turns decoded latents into frames."""
    return ((x.float() + 1) * 128).clamp(0, 255).to(torch.uint8).movedim(-3, -1).cpu().numpy()

@torch.no_grad()
def decode(vae, latents, chunk=8):
    """Scaled latents [..., C, h, w] -> uint8 RGB frames [..., 8h, 8w, 3]: the VAE decodes
    latents / scaling_factor in fp32, `chunk` frames per call (memory), then `to_pixels`."""
    z = latents.reshape(-1, *latents.shape[-3:]).float() / vae.config.scaling_factor
    x = torch.cat([vae.decode(part) for part in z.split(chunk)])      # [N, 3, 8h, 8w]
    return to_pixels(x.reshape(*latents.shape[:-3], *x.shape[1:]))

def item_generator(seed, *ids):
    """A CPU generator of its own for one item (a training clip: seed, step, position in the
    global batch; a sampled or encoded video: seed, index), seeded with NumPy's
    SeedSequence([seed, *ids]): the item's draws do not depend on the batch it is in, the
    process count or the device."""
    state = np.random.SeedSequence([seed, *ids]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))

def resample_indices(n, fps, target=32, phase=0):
    """Indices that resample n frames at `fps` to `target` fps, as the original:
    round(linspace(0, n, floor(target / fps * n), endpoint=False)) + phase, NumPy rounding (half
    to even). 10 frames at 50 fps -> 6 indices 0, 2, 3, 5, 7, 8. May exceed n - 1 with a phase."""
    count = int(np.floor(target / fps * n))
    return np.linspace(0, n, count, endpoint=False).round().astype(np.int64) + phase

# --- datasets ------------------------------------------------------------------------------------
class LatentVideoDataset(torch.utils.data.Dataset):
    """Latent echo clips for LVDM training, as the original's `Latent` dataset (docs/data.md):
    the `split` videos with a `Latents/<FileName>.pt` longer than frames / fps seconds. An item:
    {"latents": [frames, 4, 14, 14] (zero-padded), "cond": [4, 14, 14], "ef": EF / 100,
    "n_real", "name"}, drawn from a generator seeded (seed, epoch, index): call `set_epoch`
    before each epoch's iterator (so not with persistent_workers=True)."""
    latent_shape = (4, 14, 14)                                 # [C, h, w] of every latent frame

    def __init__(self, roots, split="TRAIN", frames=64, fps=32, seed=0, cond_frame="random"):
        roots = [roots] if isinstance(roots, (str, os.PathLike)) else list(roots)
        splits = {split} if isinstance(split, str) else set(split)
        self.frames, self.fps, self.seed, self.epoch = frames, fps, seed, 0
        self.cond_frame = cond_frame                           # "random", "first" or "ed"
        self.items = []                                        # (latent path, fps, EF / 100, name)
        for root in roots:
            if not os.path.isdir(os.path.join(root, "Latents")):
                raise DataError(f"{root}: no Latents/ folder (python data.py encode --root {root})")
            missing = 0
            for row in [r for r in read_filelist(root, probe=False) if r["Split"] in splits]:
                path = os.path.join(root, "Latents", row["FileName"] + ".pt")
                if not os.path.isfile(path):
                    missing += 1
                elif row["FPS"] is None or row["NumberOfFrames"] is None:
                    raise DataError(f"{root}/FileList.csv: no FPS/NumberOfFrames for {path}")
                elif row["NumberOfFrames"] / row["FPS"] > frames / fps:
                    self.items.append((path, row["FPS"], row["EF"] / 100, row["FileName"]))
            if missing:
                warnings.warn(f"{root}: {missing} {split} videos have no latent and are left out",
                              stacklevel=2)
        if not self.items:
            raise DataError(f"no {split} video longer than {frames / fps:g} s with a latent in "
                            + ", ".join(map(str, roots)))
        for path, *_ in self.items:      # every latent's header now, not hours into a run
            self.read(path)
        self.diastolic = []  # "ed": [T] bool per video, LV cavity within 10 % of the swing
        for path, *_, name in self.items if cond_frame == "ed" else []:    # from the largest
            volumes = lv_volumes(os.path.dirname(os.path.dirname(path)), name)
            top, low = np.nanmax(volumes), np.nanmin(volumes)
            self.diastolic.append(np.nan_to_num(volumes, nan=-np.inf) >= top - 0.1 * (top - low))

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.items)

    def read(self, path):
        """A latent video [T, C, h, w], memory-mapped (only the frames indexed are read)."""
        try:
            video = model.torch_load(path, mmap=True)
        except model.ModelLoadError as e:
            raise DataError(str(e).replace("unreadable", "unreadable latent", 1)) from None
        shape = tuple(getattr(video, "shape", ()))
        if not isinstance(video, torch.Tensor) or shape[1:] != self.latent_shape or not shape[0]:
            raise DataError(f"{path}: latent of shape {list(shape)}, expected [T, "
                            + ", ".join(map(str, self.latent_shape)) + "]")
        return video

    def __getitem__(self, index):
        path, fps, ef, name = self.items[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        video = self.read(path)
        T = video.shape[0]
        # Draws in the original's order: phase in [0, idx[1]), window start in [0, len - frames),
        # conditioning frame in [0, T).
        idx = resample_indices(T, fps, self.fps)
        if len(idx) > 1 and idx[1] > 1:
            idx = idx + rng.integers(0, idx[1])
        if len(idx) > self.frames:
            start = rng.integers(0, len(idx) - self.frames)
            if self.cond_frame == "ed":  # a start at end-diastole, where sample.py --cond_frame ed
                ed = np.flatnonzero(self.diastolic[index][np.minimum(idx, T - 1)][:-self.frames])
                start = ed[rng.integers(len(ed))] if len(ed) else start
            idx = idx[start:start + self.frames]
        idx = idx[idx < T]                                     # the phase may push the last out
        latents = torch.zeros(self.frames, *self.latent_shape)
        latents[:len(idx)] = video[torch.from_numpy(idx)].float()
        cond = video[int(rng.integers(0, T))].float()
        if self.cond_frame != "random":  # the clip starts at cond: what sample.py asks of it
            cond = latents[0].clone()
        return {"latents": latents, "cond": cond, "ef": torch.tensor(ef, dtype=torch.float32),
                "n_real": torch.tensor(len(idx)), "name": name}

class FrameDataset(torch.utils.data.Dataset):
    """Single frames of `<root>/Videos/*.avi` for VAE training: item -> float [3, size, size] as
    `from_pixels` makes them (x / 128 - 1)."""
    def __init__(self, root, split="TRAIN", size=112):
        splits = {split} if isinstance(split, str) else set(split)
        rows = [r for r in read_filelist(root) if r["Split"] in splits]
        if not rows:
            raise DataError(f"{root}/FileList.csv: no {split} videos")
        self.paths = [_video_path(root, r["FileName"]) for r in rows]
        self.starts = np.cumsum([0] + [r["NumberOfFrames"] for r in rows])  # first item per video
        self.size = size

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, index):
        video = int(np.searchsorted(self.starts, index, side="right")) - 1
        path, index, size = self.paths[video], index - int(self.starts[video]), self.size
        with _opened(path) as (container, stream):  # seek to the frame (fast for MJPEG AVIs)
            step = stream.average_rate * stream.time_base  # frames per pts unit
            target = (stream.start_time or 0) + round(index / step)
            container.seek(target, stream=stream)
            for frame in container.decode(stream):
                if frame.pts is not None and frame.pts >= target:  # -> [3, size, size]
                    return from_pixels(frame.to_ndarray(format="rgb24", width=size, height=size))
        raise DataError(f"{path}: no frame {index}")

# --- the phantom echo world ----------------------------------------------------------------------
# A schematic apical four-chamber echo rendered in three parts: the heart's motion (EF, rate, the
# LV's axes per contraction level), the chambers (wall and blood masks per level) and the echo
# texture (gray levels, blur, speckle, the fan). Every draw comes from one generator per video in
# a fixed order, so a seed gives the same videos byte for byte (tests/test_data.py pins a hash).

SIZE = 112                  # frame side, px (EchoNet)
PX_CM = 0.18                # phantom pixel, cm: 112 px span ~20 cm of depth, like an A4C view
LV_CENTRE = (48.0, 64.0)    # (row, col) of the LV cavity centre, +-2 px per video
LEVELS = 32                 # contraction levels rendered per video; each frame shows one of them
YY, XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)         # pixel rows and columns
# The fan: 80 degrees from a probe 4 px above the top centre, black outside, darker with depth.
DEPTH, ANGLE = np.hypot(YY + 4, XX - 55.5), np.arctan2(XX - 55.5, YY + 4)
FAN = np.clip((np.deg2rad(40) - np.abs(ANGLE)) * DEPTH, 0, 1) * np.clip(110 - DEPTH, 0, 1)
GAIN = (1.1 - 0.35 * DEPTH / SIZE) * FAN

def lv_volume(area, length):
    """Single-plane area-length LV volume V = 8 A^2 / (3 pi L) = 0.85 A^2 / L, mL from cm^2 and
    cm (Sandler & Dodge 1968; ASE chamber quantification). For an ellipse with semi-axes a (long)
    and b: A = pi a b, L = 2 a, so V = 4/3 pi a b^2, the prolate ellipsoid."""
    return 8 * np.asarray(area) ** 2 / (3 * np.pi * np.maximum(length, 1e-6))

def _soft_ellipse(u2, v2, a, b):
    """1 inside the ellipse u^2/a^2 + v^2/b^2 < 1, 0 outside, with a ~1 px ramp (anti-aliased)."""
    q = u2 / (a * a) + v2 / (b * b)
    return np.clip(0.5 + (1 - q) * (np.minimum(a, b) / 2), 0, 1)

def heart_motion(rng, n, fps):
    """One phantom heart's draws and its LV at LEVELS contraction levels s (0 end-diastole .. 1
    end-systole). Returns (heart: the LV's centre cy, cx, tilt th, end-diastolic semi-axes a_ed,
    b_ed and wall w_ed (px), and a, b, w, s [L, 1, 1] per level; level [n]: the level each frame
    shows; volume [n]: the LV's volume in mL)."""
    # EF uniform in 10-90 %, heart rate in 50-100 bpm; the LV's long axis tilted th from vertical.
    ef, bpm = rng.uniform(0.10, 0.90), rng.uniform(50, 100)
    cy, cx = LV_CENTRE[0] + rng.uniform(-2, 2), LV_CENTRE[1] + rng.uniform(-2, 2)
    th = np.deg2rad(rng.uniform(6, 14))
    a_ed, b_ed, w_ed = rng.uniform(24, 28), rng.uniform(11, 14), rng.uniform(4.5, 5.5)
    # A random point of the cycle at frame 0. Contraction: systole a half cosine over 35 % of the
    # cycle, rapid filling a half cosine over the next 30 %, then diastasis at s = 0.
    cycle = (np.arange(n) / fps * bpm / 60 + rng.uniform()) % 1.0
    s = np.where(cycle < 0.35, 0.5 - 0.5 * np.cos(np.pi * cycle / 0.35),
                 np.where(cycle < 0.65, 0.5 + 0.5 * np.cos(np.pi * (cycle - 0.35) / 0.3), 0.0))
    level = np.rint(s * (LEVELS - 1)).astype(np.int64)         # [n] frame -> rendered level
    s = np.linspace(0, 1, LEVELS)[:, None, None]                # [L, 1, 1]
    # Volume (1 - EF)^s * EDV: the long axis takes 1/6 of the log-shortening, the short axis 5/12
    # (twice, V ~ a b^2), so the cavity at s = 1 holds exactly (1 - EF) * EDV.
    a, b = a_ed * (1 - ef) ** (s / 6), b_ed * (1 - ef) ** (5 * s / 12)
    w = w_ed * (1 + 0.4 * s)                                   # the wall thickens in systole
    volume = lv_volume(np.pi * a * b * PX_CM**2, 2 * a * PX_CM).ravel()[level]     # [n] mL
    a, b, w, s = (x.astype(np.float32) for x in (a, b, w, s))
    heart = SimpleNamespace(cy=cy, cx=cx, th=th, a_ed=a_ed, b_ed=b_ed, w_ed=w_ed, a=a, b=b, w=w)
    return heart, s, level, volume

def _axes(h, py, px):
    """Coordinates of every pixel [H, W] around (py, px): u along the LV's long axis, v across
    it, and their squares."""
    dy, dx = YY - py, XX - px
    u, v = dy * np.cos(h.th) + dx * np.sin(h.th), -dy * np.sin(h.th) + dx * np.cos(h.th)
    return u, v, u * u, v * v

def chambers(h, s):
    """Wall and blood masks [L, H, W] in [0, 1]: the LV; the RV to its left (the two walls make
    the septum), shrinking 20 % in systole; the atria below, growing 12 %. The walls are closed
    rings, so the LV cavity is one dark blob surrounded by bright wall."""
    k_rv, k_a = 1 - 0.2 * s, 1 + 0.12 * s
    rv_x = h.cx - (h.b_ed + h.w_ed + 0.8 * h.b_ed + 1)
    base = h.cy + h.a_ed + h.w_ed + 10                          # the atria's top
    # Per chamber: centre, semi-axes along and across the LV's axis, wall thickness (px).
    parts = [((h.cy, h.cx), h.a, h.b, h.w),
             ((h.cy + 4, rv_x), 0.8 * h.a_ed * k_rv, 0.8 * h.b_ed * k_rv, 3.5),
             ((base, h.cx + 5), 9 * k_a, 11 * k_a, 3), ((base + 2, rv_x - 3), 8 * k_a, 9 * k_a, 3)]
    squares = [_axes(h, *centre)[2:] for centre, *_ in parts]  # (u^2, v^2) around each centre
    wall = np.maximum.reduce([_soft_ellipse(*uv2, a + w, b + w)
                              for uv2, (_, a, b, w) in zip(squares, parts)])
    cavity = np.maximum.reduce([_soft_ellipse(*uv2, a, b)
                                for uv2, (_, a, b, _) in zip(squares, parts)])
    return wall, cavity

def echo_texture(rng, h, wall, cavity):
    """Gray levels [L, H, W] of the chambers as an echo shows them: tissue, patchy bright
    myocardium, dark blood, blurred by the scanner's point spread, times a speckle texture that
    moves with the LV wall, times the fan's depth gain."""
    tissue, myo, blood = rng.uniform(35, 55), rng.uniform(140, 190), rng.uniform(4, 12)
    patchy = np.clip(1 + 2 * ndimage.gaussian_filter(rng.standard_normal((SIZE, SIZE)), 6),
                     0.85, 1.15).astype(np.float32)
    img = tissue + (myo * patchy - tissue) * wall
    img += (blood - img) * cavity
    img = ndimage.gaussian_filter(img, (0, 0.7, 0.7))
    # Speckle: a fixed Rayleigh texture (|complex Gaussian|, elongated across the beam) carried
    # along by the LV motion near the heart, so it moves with the wall instead of sliding over it.
    speckle = np.abs(rng.standard_normal((SIZE, SIZE), dtype=np.float32)
                     + 1j * rng.standard_normal((SIZE, SIZE), dtype=np.float32))
    speckle = ndimage.gaussian_filter(speckle, (0.6, 1.2))
    u, v, u2, v2 = _axes(h, h.cy, h.cx)
    near = np.clip(2 - np.sqrt(u2 / (h.a + h.w) ** 2 + v2 / (h.b + h.w) ** 2), 0, 1)
    su, sv = u * (1 + near * (h.a_ed / h.a - 1)), v * (1 + near * (h.b_ed / h.b - 1))
    cos, sin = np.cos(h.th), np.sin(h.th)
    speckle = ndimage.map_coordinates(speckle / speckle.mean(), [h.cy + su * cos - sv * sin,
                                                                 h.cx + su * sin + sv * cos],
                                      order=1, mode="reflect")
    return img * ((0.55 + 0.45 * speckle) * GAIN)

def phantom_video(rng, n, fps):
    """One phantom A4C echo of n frames at fps. Returns uint8 [n, 112, 112] and a dict with EF (%),
    EDV, ESV (mL): the max / min over frames of the rendered cavity's `lv_volume`."""
    heart, s, level, volume = heart_motion(rng, n, fps)
    img = echo_texture(rng, heart, *chambers(heart, s))        # [L, H, W] gray levels
    # Frames pick their level; a little fresh noise in every frame.
    frames = img[level] + rng.standard_normal((n, SIZE, SIZE), dtype=np.float32) * (3 * FAN)
    edv, esv = float(volume.max()), float(volume.min())
    return np.clip(frames, 0, 255).astype(np.uint8), {"EF": 100 * (edv - esv) / edv,
                                                       "ESV": esv, "EDV": edv}

def _phantom_job(job):
    """Render and write phantom video `index`; its generator is seeded with (seed, index)."""
    out, seed, index, split = job
    rng = np.random.default_rng([seed, index])
    n, fps = int(rng.integers(112, 251)), int(rng.integers(45, 56))   # 2.04-5.6 s at ~50 fps:
    # every video outlasts the 2 s (64 frames at 32 fps) that LatentVideoDataset asks for
    frames, truth = phantom_video(rng, n, fps)
    name = f"phantom_{index:05d}"
    save_video(_video_path(out, name), frames, fps)
    return {"FileName": name, "EF": round(truth["EF"], 4), "ESV": round(truth["ESV"], 4),
            "EDV": round(truth["EDV"], 4), "FrameHeight": SIZE, "FrameWidth": SIZE, "FPS": fps,
            "NumberOfFrames": n, "Split": split}  # the FileList's columns, in its order

def make_phantom(out, num_videos=200, seed=0, workers=1):
    """Write an EchoNet-layout phantom dataset (`Videos/*.avi` + `FileList.csv`); 80/10/10 split.
    The same seed gives identical files whatever the worker count. Returns the FileList rows."""
    os.makedirs(os.path.join(out, "Videos"), exist_ok=True)
    n_val = n_test = round(0.1 * num_videos)
    splits = np.array(["TRAIN"] * (num_videos - n_val - n_test) + ["VAL"] * n_val
                      + ["TEST"] * n_test)[np.random.default_rng(seed).permutation(num_videos)]
    jobs = [(out, seed, i, str(split)) for i, split in enumerate(splits)]
    if workers > 1:
        with multiprocessing.Pool(workers) as pool:
            rows = list(tqdm(pool.imap(_phantom_job, jobs), total=num_videos, desc="phantom"))
    else:
        rows = [_phantom_job(job) for job in tqdm(jobs, desc="phantom")]
    write_filelist(os.path.join(out, "FileList.csv"), rows)
    return rows

# --- EF measurement of phantom videos ------------------------------------------------------------
_SLICE = np.zeros((3, 3, 3), bool)                             # 4-connected within a frame,
_SLICE[1] = ndimage.generate_binary_structure(2, 1)            # never across frames
_DISK = (np.hypot(*np.mgrid[-2:3, -2:3]) <= 2)[None]           # [1, 5, 5] radius-2 disk

def measure_ef(frames, centre=LV_CENTRE, px_cm=PX_CM):
    """EF of a phantom-like video from its LV cavity: uint8 [F, H, W] or [F, H, W, 3] ->
    {"ef": %, "edv": mL, "esv": mL, "areas": [F] cm^2, "volumes": [F] mL (NaN: no blob)}. The
    dark blob at `centre` per frame, its volume by `lv_volume` as the generator defines it; the
    steps and their accuracy: docs/data.md ("Measuring EF")."""
    x = np.asarray(frames)
    x = x.mean(-1, dtype=np.float32) if x.ndim == 4 else x.astype(np.float32)
    x = ndimage.gaussian_filter(x, (0, 1, 1))                  # [F, H, W]
    F, H, W = x.shape
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    roi = ((yy - centre[0]) / 34) ** 2 + ((xx - centre[1]) / 22) ** 2 < 1
    seed = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= 36
    lo, hi = np.percentile(x[:, roi], [5, 95])
    dark = x < (lo + hi) / 2
    labels, n = ndimage.label(ndimage.binary_opening(dark, _DISK), _SLICE)  # [F, H, W]
    in_seed = labels[:, seed]                                  # [F, P] labels under the seed disk
    counts = np.bincount(in_seed.ravel(), minlength=n + 1)
    counts[0] = 0
    keep = np.zeros(n + 1, bool)
    keep[in_seed[np.arange(F), counts[in_seed].argmax(1)]] = True     # best blob of each frame
    keep[0] = False
    blob = ndimage.binary_dilation(keep[labels], _DISK) & dark
    blob = np.stack([ndimage.binary_fill_holes(frame) for frame in blob])
    # Area and the long axis of the ellipse of inertia per frame (pixel variance 1/12 removed).
    basis = np.stack([np.ones_like(yy), yy, xx, yy * yy, xx * xx, yy * xx]).reshape(6, -1)
    area, my, mx, myy, mxx, mxy = (blob.reshape(F, -1).astype(np.float64) @ basis.T).T
    with np.errstate(invalid="ignore", divide="ignore"):              # area 0 -> NaN: no blob
        my, mx = my / area, mx / area
        cyy, cxx, cxy = myy / area - my**2, mxx / area - mx**2, mxy / area - my * mx
        top = (cyy + cxx) / 2 + np.sqrt(((cyy - cxx) / 2) ** 2 + cxy**2)
        length = 4 * np.sqrt(np.maximum(top - 1 / 12, 0))
        volumes = lv_volume(area * px_cm**2, length * px_cm)
    found = volumes[np.isfinite(volumes)]
    if not found.size:
        found = np.full(1, np.nan)
    # Only outliers take the median: a median of every frame also clips the end-systolic trough,
    # which a 12-fps video samples in one frame (real 16-frame 12-fps windows: -2.8 EF points).
    # A real trough sits at most 0.43 of the swing off its median at 12 fps, 0.57 at 10 fps.
    median = ndimage.median_filter(found, 3, mode="nearest")
    outlier = np.abs(found - median) > 0.5 * (median.max() - median.min())
    found = np.where(outlier, median, found)
    edv, esv = float(found.max()), float(found.min())
    return {"ef": 100 * (edv - esv) / edv, "edv": edv, "esv": esv, "areas": area * px_cm**2,
            "volumes": volumes}

def lv_volumes(root, name):
    """[F] LV volumes (mL, NaN: no cavity) of phantom-like video `name` (`measure_ef`)."""
    path = _video_path(root, name)
    volumes = measure_ef(read_video(path)[0])["volumes"]
    if not np.isfinite(volumes).any():
        raise DataError(f"{path}: no LV cavity found for its end-diastolic frame")
    return volumes

def end_diastole(root, name):
    """The index of phantom-like video `name`'s end-diastolic frame: its largest LV cavity."""
    return int(np.nanargmax(lv_volumes(root, name)))

def ef_adherence(requested, measured):
    """How well videos follow the EF they were asked for: Pearson r and mean absolute error (EF
    points) over the pairs where both are finite; n = number of such pairs."""
    requested, measured = np.asarray(requested, float), np.asarray(measured, float)
    ok = np.isfinite(requested) & np.isfinite(measured)
    requested, measured = requested[ok], measured[ok]
    r = float(np.corrcoef(requested, measured)[0, 1]) if ok.sum() > 1 else float("nan")
    mae = float(np.abs(requested - measured).mean()) if ok.any() else float("nan")
    return {"pearson_r": r, "mae": mae, "n": int(ok.sum())}

# --- commands ------------------------------------------------------------------------------------
def make_reference(root, out, frames=128, fps=32.0, num_videos=None):
    """Real reference frame folders for the metrics, as the original's
    `create_reference_dataset.py` (reference/metrics.md 10.1). Returns the number of folders."""
    num_videos = num_videos or {16: 3125, 128: 2048}.get(frames)
    if num_videos is None:
        raise DataError(f"--frames {frames}: the original only has 16 and 128; give --num-videos")
    rows = read_filelist(root)
    # The original's order: pandas' sample(frac=1, random_state=42) is RandomState(42).choice(n,
    # n, replace=False), which is RandomState(42).permutation(n); its first num_videos TRAIN
    # videos of at least frames / fps seconds.
    rows = [rows[i] for i in np.random.RandomState(42).permutation(len(rows))]
    rows = [r for r in rows if r["Split"] == "TRAIN" and r["NumberOfFrames"] / r["FPS"] >= frames
            / fps][:num_videos]
    for row in tqdm(rows, desc="reference"):
        folder = os.path.join(out, row["FileName"])
        if os.path.isdir(folder) and len(os.listdir(folder)) == frames:
            continue                                           # done by an earlier run
        idx = resample_indices(row["NumberOfFrames"], row["FPS"], fps)[:frames]
        path = _video_path(root, row["FileName"])
        video, _ = read_video(path, size=SIZE)
        if idx[-1] >= len(video):
            raise DataError(f"{path}: {len(video)} frames, FileList says {row['NumberOfFrames']}")
        # Gray: float32 mean over RGB, clamped, cast to uint8 (truncating), as 3 channels.
        gray = video[idx].astype(np.float32).mean(-1).clip(0, 255).astype(np.uint8)
        save_video(folder, np.repeat(gray[..., None], 3, axis=-1), fps, "jpg")
    if len(rows) < num_videos:
        print(f"WARNING: only {len(rows)} TRAIN videos of at least {frames / fps:g} s in {root}, "
              f"fewer than the target {num_videos}")
    return len(rows)

def encode_videos(root, vae_path, out=None, gray=False, batch_size=32, device="cpu", seed=0,
                  mean=False):
    """Encode `<root>/Videos` to `<out>/Latents/<FileName>.pt` [T, 4, h, w] (scaled latents) and
    write the normalised FileList to `<out>`, as the original's `encode_video_dataset.py`.
    Existing latents are skipped; unreadable videos are skipped and returned as messages.
    `Latents/settings.json` records the flags that determine the latents (the VAE by its
    fingerprint): more latents are added only with the same ones."""
    out, flag = out or root, "--out" if out else "--root"
    rows = read_filelist(root, probe=False)
    try:
        vae = model.load_model(vae_path, expect="AutoencoderKL")
    except model.ModelLoadError as e:
        raise DataError(f"--vae {vae_path}: {e}") from None
    # The VAE's identity wherever its folder lies: sha256 of its config and weights (16 hex).
    h = hashlib.sha256(json.dumps(model.config_to_dict(vae), sort_keys=True).encode())
    for key, value in sorted(vae.state_dict().items()):
        h.update(key.encode() + value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    folder = os.path.join(out, "Latents")
    settings = {"--vae": f"sha256:{h.hexdigest()[:16]}", "--gray-scale": gray, "--seed": seed,
                "--mean": mean}
    vae = vae.to(device)
    failed, recorded = [], False
    with locked(folder, flag):
        check_settings(os.path.join(folder, "settings.json"), settings,
                       any(n.endswith(".pt") for n in os.listdir(folder)), flag)
        for i, row in enumerate(tqdm(rows, desc="encode")):
            src = _video_path(root, row["FileName"])
            dst = os.path.join(folder, row["FileName"] + ".pt")
            try:
                if os.path.exists(dst):                        # finished by an earlier run
                    if any(row[c] is None for c in VIDEO_COLUMNS):
                        row.update(probe_video(src))
                    continue
                video, fps = read_video(src)                   # [T, H, W, 3]
            except DataError as e:
                failed.append(str(e))
                continue
            found = dict(zip(VIDEO_COLUMNS, (*video.shape[1:3], fps, len(video))))
            row.update({c: found[c] for c in VIDEO_COLUMNS if row[c] is None})
            # Frames x / 128 - 1 (gray: the RGB mean repeated), posterior *samples* (from the
            # video's own generator, seeded (seed, index)) times the scaling factor, batch_size
            # frames a call. mean: the posterior means instead (the demo: its small VAE's
            # posterior noise is about as large, in the latents, as a heartbeat's motion).
            x = from_pixels(torch.from_numpy(video).to(device), gray)  # [T, 3, H, W]
            generator = item_generator(seed, i)
            with torch.no_grad():
                latents = [(p.mode() if mean else p.sample(generator=generator)).cpu()
                           for p in map(vae.encode, x.split(batch_size))]
            if not recorded:                                   # with the first latent, not before
                save(os.path.join(folder, "settings.json"), json.dumps(settings, indent=2))
                recorded = True
            save(dst, torch.cat(latents) * vae.config.scaling_factor)
        filelist = os.path.join(out, "FileList.csv")
        backup = os.path.join(root, "FileList_ORIGINAL.csv")
        if os.path.samefile(root, out) and not os.path.exists(backup):
            shutil.copyfile(filelist, backup)                  # as complete_pediatrics_filelist
        write_filelist(filelist, rows)
    return failed

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    def command(name, text):  # its add_argument; --help shows the defaults
        return commands.add_parser(name, help=text, formatter_class=
                                   argparse.ArgumentDefaultsHelpFormatter).add_argument
    a = command("phantom", "write a synthetic EchoNet-layout echo dataset")
    a("--out", default="data/phantom", help="output folder")
    a("--num-videos", type=int, default=200, help="videos")
    a("--seed", type=int, default=0, help="same seed, same files")
    a("--workers", type=int, default=os.cpu_count() or 1, help="processes (all CPUs); the files "
      "do not depend on it")
    a = command("encode", "encode Videos/ to Latents/ with a VAE")
    a("--root", required=True, help="EchoNet-layout folder (FileList.csv + Videos/)")
    a("--vae", default="models/vae", help="VAE model folder")
    a("--out", default=None, help="where Latents/ and FileList.csv go (None: root)")
    a("--gray-scale", action="store_true", help="average RGB, as the original's -g")
    a("--batch-size", type=int, default=32, help="frames per VAE call (the original's)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    a("--seed", type=int, default=0, help="seeds the posterior samples")
    a("--mean", action="store_true", help="posterior means, not samples (the demo)")
    a = command("reference", "real reference frame folders for the metrics")
    a("--root", required=True, help="EchoNet-layout folder (FileList.csv + Videos/)")
    a("--out", required=True, help="output folder of <FileName>/0000.jpg ...")
    a("--frames", type=int, default=128, help="frames per video: 128 (Dynamic) or 16 (Pediatric)")
    a("--fps", type=float, default=32, help="resampling fps")
    a("--num-videos", type=int, help="videos to write (None: 2048 for 128 frames, 3125 for 16)")
    args = parser.parse_args(argv)
    try:
        check_ranges(vars(args), {"num_videos": (1, None), "seed": (0, None), "workers": (1, None),
                                  "batch_size": (1, None), "frames": (1, None), "fps": (1, None)})
        if args.command == "phantom":
            rows = make_phantom(args.out, args.num_videos, args.seed, args.workers)
            print(f"wrote {len(rows)} phantom videos and FileList.csv to {args.out}")
        elif args.command == "encode":
            failed = encode_videos(args.root, args.vae, args.out, args.gray_scale,
                                   args.batch_size, args.device, args.seed, args.mean)
            if failed:
                print(f"{len(failed)} videos failed and were skipped:", *failed, sep="\n  ")
                sys.exit(1)
        else:
            written = make_reference(args.root, args.out, args.frames, args.fps, args.num_videos)
            print(f"{written} reference videos in {args.out}")
    except (DataError, OSError) as e:
        sys.exit(f"error: {error_line(e)}")

if __name__ == "__main__":
    main()
