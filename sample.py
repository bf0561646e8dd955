"""Generate echo videos with the latent video diffusion model: conditioning frame + EF -> video.

    python sample.py --frames 192                 # models/lvdm, models/vae, data/conditioning
    python sample.py --unet models/lvdm --vae models/vae --conditioning data/conditioning \\
        --output samples/lvdm_dynamic --num_samples 2048 --batch_size 8 --num_steps 64 \\
        --min_lvef 10 --max_lvef 90 --save_as avi,jpg --frames 192   # the paper's metric set
    torchrun --nproc_per_node 8 sample.py --frames 192 ...          # 8 GPUs (or --nnodes N)

Follows EchoNet-Synthetic's `echosyn/lvdm/sample.py` (its flags; DDPM over 64 "leading" steps,
long videos as 64-frame windows every 32 frames in one UNet batch), but video i has its own
generator, seeded (--seed, i): the same at any batch size or process count; a killed run started
again skips the finished videos. Writes <output>/<format>/sample_000000[.ext] and FileList.csv.
Differences from the original and its bugs: docs/sample.md; several GPUs and nodes: docs/scale.md.
"""

import argparse
import contextlib
import json
import os
import re
import shutil
import sys

import numpy as np
import torch
import torch.distributed as dist
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
arg("--conditioning", default="data/conditioning", help="folder of [4, 14, 14] .pt latents or "
    ".jpg/.png frames, or an encoded dataset root (its TEST videos) (default: %(default)s)")
arg("--cond_frame", choices=("first", "ed"), default="first", help="the frame of a dataset root's "
    "TEST videos: first (default), or ed: the end-diastolic one, the largest LV cavity by "
    "data.measure_ef (phantom-like videos)")
arg("--config", help="ignored (model folders carry their config): the original's commands run")
arg = parser.add_argument_group("sampling").add_argument
arg("--num_samples", type=int, default=8, help="videos (default: %(default)s)")
arg("--num_steps", type=int, default=64, help="denoising steps (default: %(default)s)")
arg("--sampler", choices=("ddpm", "ddim", "dpm"), default="ddpm", help="ddpm (default, the "
    "original's), deterministic ddim, or dpm (DPM-Solver++(2M): few steps, <= 999)")
arg("--guidance", type=float, default=1.0, help="classifier-free guidance scale, 1 = off "
    "(default; the published model never saw a null EF)")
arg("--min_lvef", type=int, default=10, help="lowest EF in %% (default: %(default)s)")
arg("--max_lvef", type=int, default=90, help="highest EF in %% (default: %(default)s)")
arg("--ef_shift", type=float, default=0.0, help="EF points added to each requested EF before the "
    "UNet sees it, a correction measured on other videos (FileList.csv keeps the requested EF; "
    "default: 0)")
arg("--frames", type=int, default=192, help="frames per video, rounded up to a multiple of half "
    "the UNet's num_frames (32) (default: %(default)s)")
arg("--seed", type=int, default=0, help="video i's generator is seeded (seed, i) (default: 0)")
arg("--fps", type=float, default=32, help="written to the videos and FileList.csv (default: "
    "%(default)s, the UNet's training frame rate)")
arg = parser.add_argument_group("output and performance").add_argument
arg("--output", default="samples/lvdm", help="output folder (default: %(default)s)")
arg("--save_as", default="avi,jpg", help="any of avi,mp4,gif,jpg,png (frame folders),pt "
    "(latents) (default: %(default)s)")
arg("--batch_size", type=int, default=8, help="videos per batch (default: %(default)s)")
arg("--decode_chunk", type=int, default=8, help="frames per VAE decode call (default: 8)")
arg("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda (bf16 UNet; "
    "cuda:LOCAL_RANK under torchrun) or cpu (default: %(default)s)")

FORMATS = ("avi", "mp4", "gif", "jpg", "png", "pt")
UNET, TRAIN_OUT = "UNetSpatioTemporalConditionModel", "out/lvdm"  # --unet's fallback: train.py's
# Every numeric flag's range (None: unbounded), checked before any work; NaN and inf fail too.
RANGES = {"num_samples": (1, None), "num_steps": (1, 1000), "guidance": (0, None),  # 1000: the
          "frames": (1, None), "seed": (0, None), "fps": (1, None),  # training schedule's steps
          "batch_size": (1, None), "decode_chunk": (1, None),  # EFs: 0 <= min <= max <= 100
          "ef_shift": (-50, 50)}
HINTS = ("get the weights from Hugging Face HReynaud/EchoNet-Synthetic (lvdm/ -> models/lvdm, "
         "vae/ -> models/vae) or train your own (make demo; or python train.py ... then python "
         "export.py)", "give --conditioning a folder of [4, 14, 14] .pt latents or of 112x112 "
         ".jpg/.png frames (e.g. frames of real echos)")

SampleError = data.DataError  # bad input: the message names the flag or file and what is wrong

# --- inputs ------------------------------------------------------------------------------------
def check_flags(args):
    """Numbers out of range, and everything a fresh checkout lacks (in one message)."""
    data.check_ranges(vars(args), RANGES, dash="_")
    if not 0 <= args.min_lvef <= args.max_lvef <= 100:
        raise SampleError(f"--min_lvef {args.min_lvef} --max_lvef {args.max_lvef}: need "
                          "0 <= min_lvef <= max_lvef <= 100 (EF in %)")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SampleError(f"--device {args.device}: CUDA is not available here (use cpu)")
    if args.sampler == "dpm" and args.num_steps > 999:
        raise SampleError(f"--num_steps {args.num_steps}: --sampler dpm takes at most 999")
    fallback = args.unet == parser.get_default("unet") and model.list_checkpoints(TRAIN_OUT)
    found = {"unet": os.path.exists(args.unet) or bool(fallback), "vae": os.path.exists(args.vae),
             "conditioning": os.path.isdir(args.conditioning)}
    if missing := [flag for flag, ok in found.items() if not ok]:  # each hint once, in order
        hints = dict.fromkeys(HINTS[flag == "conditioning"] for flag in missing)
        raise SampleError(f"missing {', '.join(f'--{f} {getattr(args, f)}' for f in missing)}: "
                          + "; ".join(hints))

def load_unet(path):
    """(UNet, its folder): a model folder, or a training checkpoint's EMA weights (a
    checkpoint-<step>/ folder, or a run folder: its highest complete step, by step); when the
    default models/lvdm is absent, train.py's default run folder (out/lvdm)."""
    if path == parser.get_default("unet") and not os.path.exists(path):
        path = TRAIN_OUT
    is_folder = os.path.isfile(os.path.join(path, "config.json"))
    unet, path = (model.load_model(path, UNET), path) if is_folder else model.load_checkpoint(path)
    if unet.class_name != UNET:
        raise SampleError(f"--unet {path}: a checkpoint of a {unet.class_name}, not a UNet")
    return unet, path

def list_conditioning(folder, frame="first"):
    """(file, frame index in a latent video, else 0): all .pt or all .jpg/.jpeg/.png files sorted
    by name, or an encoded root's (FileList.csv + Latents/) TEST videos, first or "ed" frame."""
    if os.path.isfile(f"{folder}/FileList.csv") and os.path.isdir(f"{folder}/Latents"):
        names = [r["FileName"] for r in data.read_filelist(folder, probe=False)
                 if r["Split"] == "TEST" and os.path.isfile(f"{folder}/Latents/{r['FileName']}.pt")]
        if not names:
            raise SampleError(f"--conditioning {folder}: no TEST videos with a latent in Latents/")
        return [(os.path.join(folder, "Latents", n + ".pt"),
                 data.end_diastole(folder, n) if frame == "ed" else 0) for n in names]
    names = sorted(os.listdir(folder))
    pts = [n for n in names if n.lower().endswith(".pt")]
    images = [n for n in names if n.lower().endswith((".jpg", ".jpeg", ".png"))]
    if bool(pts) == bool(images):
        raise SampleError(f"--conditioning {folder}: " + ("both .pt latents and images, use one "
                          "kind" if pts else "no .pt latents and no .jpg/.png frames in it"))
    return [(os.path.join(folder, n), 0) for n in pts or images]

def read_conditioning(item, shape):
    """A conditioning (file, frame): a latent of `shape` [C, h, w] (fp32) or a latent video [T, C,
    h, w] (its frame `frame`), or an RGB frame uint8 [8h, 8w, 3] (for a VAE with 4 levels)."""
    path, frame = item
    try:
        if path.lower().endswith(".pt"):
            x = model.torch_load(path)
            if torch.is_tensor(x) and x.ndim == 4 and tuple(x.shape[1:]) == tuple(shape):
                if frame >= len(x):
                    raise SampleError(f"{path}: {len(x)} frames, no frame {frame}")
                x = x[frame]  # a latent video: the frame asked for
            x = x.float() if torch.is_tensor(x) else x
        else:
            with Image.open(path) as im:
                x = torch.from_numpy(np.array(im.convert("RGB")))
            shape = (shape[1] * 8, shape[2] * 8, 3)
    except OSError as e:  # truncated or non-image files (a bad .pt: torch_load names it)
        raise SampleError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None
    got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
    if got != tuple(shape):
        raise SampleError(f"{path}: shape {got}, expected {tuple(shape)}")
    return x

def draw_ef(generator, low, high):
    """A video's EF in %, its generator's first draw: an integer uniform in [low, high] (the
    original's randint; written to FileList.csv, given to the UNet as EF / 100)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))

def conditioning(paths, shape, vae, generators, device):
    """Scaled conditioning latents [B, C, h, w]: .pt latents as they are; frames encoded as the
    original does (data.from_pixels: x / 128 - 1), a posterior *sample* (here from the video's
    own generator) times the scaling factor."""
    x = torch.stack([read_conditioning(p, shape) for p in paths]).to(device)
    if x.dtype == torch.uint8:
        x = vae.encode(data.from_pixels(x)).sample(generators) * vae.config.scaling_factor
    return x

def trained_residual(path):
    """k of a UNet trained with train.py's --residual k (0: on the latents, as the original),
    from the training_config.json of its checkpoint (export.py copies it under "config")."""
    try:
        with open(os.path.join(path, "training_config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):  # published weights: no training config
        return 0.0
    return float(config.get("config", config).get("residual", 0.0))

def setup(args, device):
    """The run, checked before any work: models on `device` (a 4-level VAE; a UNet of 2C -> C
    channels and an even window, num_frames), scheduler, conditioning files, the video length,
    and the settings that determine the written files (settings.json)."""
    unet, unet_path = load_unet(args.unet)
    vae = model.load_model(args.vae, expect="AutoencoderKL")
    C, window = vae.config.latent_channels, unet.config.num_frames  # window 64: windows every 32
    if len(vae.config.block_out_channels) != 4 or window < 2 or window % 2 or (
            unet.config.in_channels, unet.config.out_channels) != (2 * C, C):
        raise SampleError(f"--unet {unet_path} --vae {args.vae}: need a VAE of 4 levels and C "
                          "latent channels, and a UNet of 2C -> C channels with an even num_frames")
    residual = trained_residual(unet_path)
    unet, vae = (m.to(device).requires_grad_(False) for m in (unet, vae))
    job = argparse.Namespace(
        unet=unet, vae=vae, window=window, residual=residual, device=device,
        frames=diffusion.round_frames(args.frames, window // 2),  # 100 -> 128
        shape=(C, *2 * [unet.config.sample_size or 14]),  # [4, 14, 14]
        paths=list_conditioning(args.conditioning, args.cond_frame),
        scheduler=dict(ddpm=diffusion.DDPM, ddim=diffusion.DDIM, dpm=diffusion.DPMSolver)[
            args.sampler](),
        amp=torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None)
    job.scheduler.set_timesteps(args.num_steps)
    job.settings = {k: getattr(args, k) for k in ("seed", "num_steps", "sampler", "guidance",
                                                  "min_lvef", "max_lvef", "fps", "cond_frame")}
    job.settings.update({k: p and os.path.abspath(p) for k, p in [  # paths made absolute
        ("unet", unet_path), ("vae", args.vae), ("conditioning", args.conditioning)]})
    job.settings.update(frames=job.frames, window=window, residual=residual,
                        device=device.type)  # cuda: a bf16 UNet, other bits than the CPU's
    if args.ef_shift:                                # recorded only when used: old folders resume
        job.settings["ef_shift"] = args.ef_shift
    return job

# --- outputs -----------------------------------------------------------------------------------
def output_path(out, fmt, index):
    """<out>/jpg/sample_000000 (a frame folder) or <out>/avi/sample_000000.avi."""
    name = f"sample_{index:06d}"
    return os.path.join(out, fmt, name if fmt in ("jpg", "png") else f"{name}.{fmt}")

def finished(out, formats):
    """Indices of the videos in `out` that exist in every format."""
    found = [re.fullmatch(r"sample_(\d{6,})(\.\w+)?", n) for n in os.listdir(f"{out}/{formats[0]}")]
    return {int(m[1]) for m in found
            if m and all(os.path.exists(output_path(out, f, int(m[1]))) for f in formats)}

def prepare_output(args, formats, job):
    """Rank 0, holding the lock: drop a killed run's temporary files, refuse a folder of videos
    made with other settings (data.check_settings), record the settings. Returns the indices
    still to do, their conditioning files read (fail now, not hours in)."""
    out, path = args.output, os.path.join(args.output, "settings.json")
    names = [(f, n) for f in FORMATS if os.path.isdir(f"{out}/{f}")
             for n in os.listdir(f"{out}/{f}") if n.startswith("sample_")]
    for tmp in [os.path.join(out, f, n) for f, n in names if n.endswith(".tmp")]:
        shutil.rmtree(tmp) if os.path.isdir(tmp) else os.remove(tmp)
    data.check_settings(path, job.settings, any(not n.endswith(".tmp") for _, n in names),
                        "--output")
    for fmt in formats:
        os.makedirs(os.path.join(out, fmt), exist_ok=True)
    data.save(path, json.dumps(job.settings, indent=2))
    todo = sorted(set(range(args.num_samples)) - finished(out, formats))
    for i in sorted({i % len(job.paths) for i in todo}):
        read_conditioning(job.paths[i], job.shape)
    return todo

def sample_batch(args, job, index, formats):
    """Videos `index`: EF, conditioning latent, denoising, decoding, then every format, each
    file written under a temporary name and renamed (a killed run leaves no half file)."""
    generators = [data.item_generator(args.seed, i) for i in index]
    efs = [draw_ef(g, args.min_lvef, args.max_lvef) for g in generators]
    with torch.inference_mode():
        x = conditioning([job.paths[i % len(job.paths)] for i in index], job.shape, job.vae,
                         generators, job.device)  # video i: file i mod N
        ef = (torch.tensor(efs, device=job.device) + args.ef_shift) / 100  # EF as the UNet sees it
        latents = diffusion.sample(job.unet, job.scheduler, x, ef, generators,
                                   max(job.frames, job.window), job.window, job.window // 2,
                                   args.guidance, job.amp, job.residual)[:, :job.frames]
        videos = data.decode(job.vae, latents, args.decode_chunk)
    for i, video, z in zip(index, videos, latents):
        for fmt, path in [(fmt, output_path(args.output, fmt, i)) for fmt in formats]:
            if fmt == "pt":
                data.save(path, z.cpu().clone())
            else:
                data.save_video(path, video, args.fps, fmt)

def write_filelist(args, job, formats):
    """FileList.csv, rebuilt from every finished video on disk (EFs redrawn from their
    generators), in index order: by rank 0, once every process is done."""
    rows = [{"FileName": f"sample_{i:06d}", "EF": draw_ef(data.item_generator(args.seed, i),
             args.min_lvef, args.max_lvef), "ESV": 0, "EDV": 0, "FrameHeight": 8 *
             job.shape[1], "FrameWidth": 8 * job.shape[2], "FPS": args.fps, "NumberOfFrames":
             job.frames, "Split": "TRAIN"} for i in sorted(finished(args.output, formats))]
    data.write_filelist(os.path.join(args.output, "FileList.csv"), rows)
    print(f"{len(rows)} videos of {job.frames} frames in {args.output} ({', '.join(formats)})")

# --- main --------------------------------------------------------------------------------------
def run(args, formats):
    check_flags(args)
    device, rank, world = data.join_processes(args.device)     # under torchrun: a group
    if device.type == "cuda":  # TF32 matmuls; the UNet under bf16 autocast, the VAE in fp32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    job = setup(args, device)
    with data.locked(args.output, "--output") if rank == 0 else contextlib.nullcontext():
        # Rank 0 prepares the folder and lists the videos to do; every process gets the list.
        todo = [prepare_output(args, formats, job) if rank == 0 else None]
        if world > 1:
            dist.broadcast_object_list(todo, src=0)
        # The batches are the same whatever the process count (so are their float sums): batch
        # k goes to process k mod N; every process takes the same number of rounds, and their
        # video counts add up (all_reduce) on rank 0's progress bar.
        batches = [todo[0][k:k + args.batch_size] for k in range(0, len(todo[0]), args.batch_size)]
        bar = tqdm(total=args.num_samples, initial=args.num_samples - len(todo[0]), unit="video",
                   disable=rank > 0)
        for k in range(rank, -(-len(batches) // world) * world, world):
            if k < len(batches):
                sample_batch(args, job, batches[k], formats)
            n = torch.tensor(len(batches[k]) if k < len(batches) else 0, device=device)
            if world > 1:
                dist.all_reduce(n)
            bar.update(int(n))
        bar.close()
        if rank == 0:  # after the last all_reduce: every process has written its videos
            write_filelist(args, job, formats)

def main(argv=None):
    args = parser.parse_args(argv)
    formats = list(dict.fromkeys(s.strip().lower() for s in args.save_as.split(",") if s.strip()))
    if not formats or set(formats) - set(FORMATS):
        parser.error(f"--save_as {args.save_as}: choose from {','.join(FORMATS)}")
    try:
        run(args, formats)
    except (model.ModelLoadError, data.DataError, OSError) as e:  # one line, once
        sys.exit(f"error: {data.error_line(e)}" if os.environ.get("RANK", "0") == "0" else 1)
    except KeyboardInterrupt:
        sys.exit("interrupted: run the same command again to finish (finished videos are kept)")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

if __name__ == "__main__":
    main()
