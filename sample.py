"""Generate echo videos with the latent video diffusion model: conditioning frame + EF -> video.

    python sample.py --frames 192                 # models/lvdm, models/vae, data/conditioning
    python sample.py --unet models/lvdm --vae models/vae --conditioning data/conditioning \\
        --output samples/lvdm_dynamic --num_samples 2048 --batch_size 8 --num_steps 64 \\
        --min_lvef 10 --max_lvef 90 --save_as avi,jpg --frames 192   # the paper's metric set

Follows EchoNet-Synthetic's `echosyn/lvdm/sample.py` (its flags and its algorithm: DDPM over 64
"leading" steps, long videos as 64-frame windows every 32 frames in one UNet batch, conditioning
files taken in turn), but every video has its own random generator, seeded from (--seed, its
index), so a video is the same at any batch size; a killed run started again skips the finished
videos. Outputs: <output>/<format>/sample_000000[.ext] and <output>/FileList.csv.
Differences from the original and its bugs: docs/sample.md.
"""

import argparse
import json
import os
import re
import shutil
import sys

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import data
import diffusion
import model

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
arg = parser.add_argument_group("models and conditioning").add_argument
arg("--unet", default="models/lvdm", help="UNet model folder, or a training run folder or its "
    "checkpoint-<step>/ (EMA weights) (default: %(default)s, else out/lvdm's newest checkpoint)")
arg("--vae", default="models/vae", help="VAE model folder (default: %(default)s)")
arg("--conditioning", default="data/conditioning", help="folder of [4, 14, 14] .pt latents "
    "(scaled) or .jpg/.png frames, or an encoded dataset root (FileList.csv + Latents/: first "
    "frames of its TEST videos) (default: %(default)s)")
arg("--config", help="ignored (model folders carry their config): the original's commands run")
arg = parser.add_argument_group("sampling").add_argument
arg("--num_samples", type=int, default=8, help="videos (default: %(default)s)")
arg("--num_steps", type=int, default=64, help="denoising steps (default: %(default)s)")
arg("--sampler", choices=("ddpm", "ddim"), default="ddpm",
    help="ddpm (the original's) or deterministic ddim (default: %(default)s)")
arg("--guidance", type=float, default=1.0, help="classifier-free guidance scale, 1 = off "
    "(default; the published model never saw a null EF)")
arg("--min_lvef", type=int, default=10, help="lowest EF in %% (default: %(default)s)")
arg("--max_lvef", type=int, default=90, help="highest EF in %% (default: %(default)s)")
arg("--ef_from", help="a FileList.csv: EFs drawn from its EF column (within min..max)")
arg("--frames", type=int, default=192, help="frames per video, rounded up to a multiple of half "
    "the UNet's num_frames (32) (default: %(default)s)")
arg("--seed", type=int, default=0, help="video i's generator is seeded (seed, i) (default: 0)")
arg("--fps", type=float, default=32, help="the UNet's training frame rate, written to the "
    "videos and FileList.csv (default: %(default)s, the original's)")
arg = parser.add_argument_group("output and performance").add_argument
arg("--output", default="samples/lvdm", help="output folder (default: %(default)s)")
arg("--save_as", default="avi,jpg", help="any of avi,mp4,gif,jpg,png (frame folders),pt "
    "(latents) (default: %(default)s)")
arg("--batch_size", type=int, default=8, help="videos per batch (default: %(default)s)")
arg("--decode_chunk", type=int, default=8, help="frames per VAE decode call (default: "
    "%(default)s; on a CPU 2-8 ran faster than 64)")
arg("--device", default="cuda" if torch.cuda.is_available() else "cpu",
    help="torch device (default: %(default)s); the UNet runs in bf16 on cuda")
arg("--dry_run", action="store_true", help="print the resolved settings and exit")

FORMATS = ("avi", "mp4", "gif", "jpg", "png", "pt")
UNET, VAE = "UNetSpatioTemporalConditionModel", "AutoencoderKL"
TRAIN_OUT = "out/lvdm"  # train.py's default run folder: --unet's fallback
GET_WEIGHTS = ("get the weights from Hugging Face HReynaud/EchoNet-Synthetic (lvdm/ -> models/lvdm,"
               " vae/ -> models/vae) or train your own (make demo; or python train.py ... then "
               "python export.py)")
GET_CONDITIONING = ("give --conditioning a folder of [4, 14, 14] .pt latents or of 112x112 "
                    ".jpg/.png frames (e.g. frames of real echos)")

class SampleError(Exception):
    """Bad input; the message names the flag or file and what is wrong (main exits cleanly)."""

# --- inputs ------------------------------------------------------------------------------------

def check_flags(args):
    """Flags out of range, and everything a fresh checkout lacks (in one message)."""
    if not 0 <= args.min_lvef <= args.max_lvef <= 100:
        raise SampleError(f"--min_lvef {args.min_lvef} --max_lvef {args.max_lvef}: need "
                          "0 <= min_lvef <= max_lvef <= 100 (EF in %)")
    for flag in ("num_samples", "batch_size", "num_steps", "frames", "decode_chunk"):
        if getattr(args, flag) < 1:
            raise SampleError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    if args.seed < 0:
        raise SampleError(f"--seed {args.seed}: must be >= 0")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SampleError(f"--device {args.device}: CUDA is not available here (use cpu)")
    fallback = args.unet == parser.get_default("unet") and model.list_checkpoints(TRAIN_OUT)
    found = {"unet": os.path.exists(args.unet) or bool(fallback), "vae": os.path.exists(args.vae),
             "conditioning": os.path.isdir(args.conditioning)}
    if not all(found.values()):
        missing = [f"--{flag} {getattr(args, flag)}" for flag, ok in found.items() if not ok]
        hints = [GET_WEIGHTS] * (not found["unet"] or not found["vae"])
        hints += [GET_CONDITIONING] * (not found["conditioning"])
        raise SampleError(f"missing {', '.join(missing)}: {'; '.join(hints)}")

def load_unet(path):
    """(UNet, path): a model folder, or a training checkpoint's EMA weights (a checkpoint-<step>/
    folder, or a run folder: its highest complete step, model.load_checkpoint); when the
    default models/lvdm is absent, the newest checkpoint of train.py's default run folder."""
    if path == parser.get_default("unet") and not os.path.exists(path):
        path = TRAIN_OUT
    if os.path.isfile(os.path.join(path, "config.json")):
        return model.load_model(path, expect=UNET), path
    unet, path = model.load_checkpoint(path)
    if unet.class_name != UNET:
        raise SampleError(f"--unet {path}: a checkpoint of a {unet.class_name}, not a UNet")
    return unet, path

def load_models(args):
    """(UNet, its path, VAE, window): the window is the UNet's num_frames, as the original's T."""
    unet, unet_path = load_unet(args.unet)
    vae = model.load_model(args.vae, expect=VAE)
    C, window = vae.config.latent_channels, unet.config.num_frames
    if len(vae.config.block_out_channels) != 4:
        raise SampleError(f"--vae {args.vae}: {len(vae.config.block_out_channels)} levels; this "
                          "sampler expects 4 (frames 8x the latent size, as the original's)")
    if (unet.config.in_channels, unet.config.out_channels) != (2 * C, C):
        raise SampleError(f"--unet {unet_path}: takes {unet.config.in_channels} channels and "
                          f"gives {unet.config.out_channels}; the VAE's latents need {2 * C}, {C}")
    if window < 2 or window % 2:
        raise SampleError(f"--unet {unet_path}: num_frames {window} in its config; the windows "
                          "need an even number (the training clip length, 64)")
    return unet, unet_path, vae, window

def list_conditioning(folder):
    """The conditioning files sorted by name: all .pt files, or all .jpg/.jpeg/.png files; or,
    for an encoded EchoNet-layout root (FileList.csv + Latents/), the latent videos of its TEST
    split, whose first frames animate real hearts."""
    latents = os.path.join(folder, "Latents")
    if os.path.isfile(os.path.join(folder, "FileList.csv")) and os.path.isdir(latents):
        paths = [os.path.join(latents, r["FileName"] + ".pt")
                 for r in data.read_filelist(folder, probe=False) if r["Split"] == "TEST"]
        paths = [p for p in paths if os.path.isfile(p)]
        if not paths:
            raise SampleError(f"--conditioning {folder}: no TEST videos with a latent in Latents/")
        return paths
    names = sorted(os.listdir(folder))
    pts = [n for n in names if n.lower().endswith(".pt")]
    images = [n for n in names if n.lower().endswith((".jpg", ".jpeg", ".png"))]
    if bool(pts) == bool(images):
        raise SampleError(f"--conditioning {folder}: " + ("both .pt latents and images, use one "
                          "kind" if pts else "no .pt latents and no .jpg/.png frames in it"))
    return [os.path.join(folder, n) for n in pts or images]

def read_conditioning(path, shape):
    """A conditioning file: a latent of `shape` [C, h, w] (fp32) or a latent video [T, C, h, w]
    (its first frame), or an RGB frame uint8 [8h, 8w, 3] (for a VAE with 4 levels)."""
    latent = path.lower().endswith(".pt")
    try:
        if latent:
            x = model.torch_load(path)
            if torch.is_tensor(x) and x.ndim == 4 and tuple(x.shape[1:]) == tuple(shape):
                x = x[0]  # a latent video: its first frame
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        else:
            with Image.open(path) as im:
                x = torch.from_numpy(np.array(im.convert("RGB")))
            got, shape = tuple(x.shape), (shape[1] * 8, shape[2] * 8, 3)
    except (OSError, model.ModelLoadError) as e:  # unpickling, truncated or non-image files
        raise SampleError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None
    if got != tuple(shape):
        raise SampleError(f"{path}: shape {got}, expected {tuple(shape)}")
    return x.float() if latent else x

def conditioning(paths, shape, vae, generators, device):
    """Scaled conditioning latents [B, C, h, w]: .pt latents as they are; frames encoded as the
    original does (data.from_pixels: x / 128 - 1), a posterior *sample* (here from the video's
    own generator) times the scaling factor."""
    x = torch.stack([read_conditioning(p, shape) for p in paths]).to(device)
    if not paths[0].lower().endswith(".pt"):
        x = vae.encode(data.from_pixels(x)).sample(generators) * vae.config.scaling_factor
    return x

def draw_ef(generator, low, high, real_efs=None):
    """A video's EF, its generator's first draw: an integer uniform in [low, high] (the original's
    randint), or with --ef_from one of the real EFs in that range."""
    if real_efs is None:
        return int(torch.randint(low, high + 1, (1,), generator=generator))
    return real_efs[int(torch.randint(len(real_efs), (1,), generator=generator))]

def read_efs(args):
    """--ef_from's EF column (a FileList.csv or a folder holding one) within the EF range."""
    if not args.ef_from:
        return None
    root = os.path.dirname(args.ef_from) if os.path.isfile(args.ef_from) else args.ef_from
    efs = [r["EF"] for r in data.read_filelist(root, probe=False)
           if args.min_lvef <= r["EF"] <= args.max_lvef]
    if not efs:
        raise SampleError(f"--ef_from {args.ef_from}: no EF in [{args.min_lvef}, {args.max_lvef}]")
    return efs

# --- outputs -----------------------------------------------------------------------------------

def output_path(out, fmt, index):
    """<out>/jpg/sample_000000 (a frame folder) or <out>/avi/sample_000000.avi."""
    name = f"sample_{index:06d}"
    return os.path.join(out, fmt, name if fmt in ("jpg", "png") else f"{name}.{fmt}")

def save(out, index, frames, latents, formats, fps):
    """One video in every format, each written under a temporary name and renamed."""
    for fmt in formats:
        path = output_path(out, fmt, index)
        if fmt == "pt":
            torch.save(latents.cpu().clone(), path + ".tmp")
            os.replace(path + ".tmp", path)
        else:
            data.save_video(path, frames, fps, fmt)

def finished(out, formats):
    """Indices of the videos in `out` that exist in every format."""
    found = [re.fullmatch(r"sample_(\d{6,})(\.\w+)?", n) for n in os.listdir(f"{out}/{formats[0]}")]
    return {int(m[1]) for m in found
            if m and all(os.path.exists(output_path(out, f, int(m[1]))) for f in formats)}

def prepare_output(out, formats, settings):
    """Refuse to mix settings in one folder, drop a killed run's temporary files, record the
    settings (<out>/settings.json)."""
    path = os.path.join(out, "settings.json")
    old = {}
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
    changed = [f"{k} {v!r} -> {settings[k]!r}" for k, v in old.items() if settings.get(k, v) != v]
    if changed:
        raise SampleError(f"{out} holds videos made with other settings ({'; '.join(changed)}): "
                          "use another --output, or the same settings to resume")
    for fmt in FORMATS:
        for name in os.listdir(f"{out}/{fmt}") if os.path.isdir(f"{out}/{fmt}") else []:
            tmp = os.path.join(out, fmt, name)
            if name.startswith("sample_") and name.endswith(".tmp"):
                shutil.rmtree(tmp) if os.path.isdir(tmp) else os.remove(tmp)
    for fmt in formats:
        os.makedirs(os.path.join(out, fmt), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(settings, f, indent=2)
    os.replace(path + ".tmp", path)

# --- main --------------------------------------------------------------------------------------

def run(args, formats):
    # Inputs: flags, EFs, conditioning files, models; the scheduler and the video length.
    check_flags(args)
    real_efs, paths = read_efs(args), list_conditioning(args.conditioning)
    unet, unet_path, vae, window = load_models(args)
    shape = (vae.config.latent_channels, *2 * [unet.config.sample_size or 14])  # [4, 14, 14]
    frames = diffusion.round_frames(args.frames, window // 2)  # 100 -> 128 with 64-frame windows
    scheduler = diffusion.DDPM() if args.sampler == "ddpm" else diffusion.DDIM(eta=0.0)
    if args.num_steps > scheduler.config["num_train_timesteps"]:
        raise SampleError(f"--num_steps {args.num_steps}: at most 1000 (the training steps)")
    scheduler.set_timesteps(args.num_steps)

    # The output folder: what determines its videos, and which of them are still to do.
    settings = {k: getattr(args, k) for k in ("seed", "num_steps", "sampler", "guidance",
                                              "min_lvef", "max_lvef")}
    settings.update(frames=frames, window=window, unet=os.path.abspath(unet_path),
                    vae=os.path.abspath(args.vae), conditioning=os.path.abspath(args.conditioning),
                    ef_from=args.ef_from and os.path.abspath(args.ef_from))
    if args.dry_run:
        print(json.dumps({**settings, "save_as": formats, "output": args.output}, indent=2))
        return
    prepare_output(args.output, formats, settings)
    done = finished(args.output, formats)
    todo = [i for i in range(args.num_samples) if i not in done]
    for i in sorted({i % len(paths) for i in todo}):  # fail now, not hours in
        read_conditioning(paths[i], shape)

    # Sample batch after batch: EF, conditioning latent, denoising, decoding, files.
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    unet.to(device).requires_grad_(False)
    vae.to(device).requires_grad_(False)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    bar = tqdm(total=args.num_samples, initial=args.num_samples - len(todo), unit="video")
    for k in range(0, len(todo), args.batch_size):
        index = todo[k:k + args.batch_size]
        generators = [data.item_generator(args.seed, i) for i in index]
        efs = [draw_ef(g, args.min_lvef, args.max_lvef, real_efs) for g in generators]
        with torch.inference_mode():
            cond = conditioning([paths[i % len(paths)] for i in index], shape, vae, generators,
                                device)
            latents = diffusion.sample(unet, scheduler, cond, torch.tensor(efs, device=device)
                                       / 100, generators, max(frames, window), window,
                                       window // 2, args.guidance, amp)[:, :frames]
            videos = data.decode(vae, latents, args.decode_chunk)
        for i, video, z in zip(index, videos, latents):
            save(args.output, i, video, z, formats, args.fps)
        bar.update(len(index))
    bar.close()

    # FileList.csv, rebuilt from every finished video (EFs redrawn from their generators).
    efs = [(i, draw_ef(data.item_generator(args.seed, i), args.min_lvef, args.max_lvef,
                       real_efs)) for i in sorted(finished(args.output, formats))]
    rows = [{"FileName": f"sample_{i:06d}", "EF": ef, "ESV": 0, "EDV": 0, "FrameHeight": 8 *
             shape[1], "FrameWidth": 8 * shape[2], "FPS": args.fps, "NumberOfFrames": frames,
             "Split": "TRAIN"} for i, ef in efs]
    data.write_filelist(os.path.join(args.output, "FileList.csv"), rows)
    print(f"{len(rows)} videos of {frames} frames in {args.output} ({', '.join(formats)})")

def main(argv=None):
    args = parser.parse_args(argv)
    formats = list(dict.fromkeys(s.strip().lower() for s in args.save_as.split(",") if s.strip()))
    if not formats or set(formats) - set(FORMATS):
        parser.error(f"--save_as {args.save_as}: choose from {','.join(FORMATS)}")
    try:
        run(args, formats)
    except (SampleError, model.ModelLoadError, data.DataError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: run the same command again to finish (finished videos are kept)")

if __name__ == "__main__":
    main()
