"""Train EchoNet-Synthetic's latent video diffusion model (LVDM), or the phantom demo's small VAE,
on one process or many (torchrun + DDP), without diffusers or Accelerate.

    python train.py --config configs/tiny.json --out out/tiny         # CPU smoke run, seconds
    torchrun --nproc_per_node 8 train.py --config configs/lvdm.json    # the paper run, 8 GPUs
    torchrun --nproc_per_node 2 train.py --config configs/tiny.json --max-steps 20  # gloo, CPU
    python train.py --config configs/vae_phantom.json                  # the demo's VAE
    python train.py --config configs/lvdm.json --lr 2e-4 --dry-run     # print the resolved config

Every config key is a flag (--max-steps or --max_steps); flags override the --config file, which
overrides the defaults (the paper run). The run folder (--out) holds config.json, log.jsonl,
previews/ and checkpoint-<step>/; the same command again resumes from the latest checkpoint.
Follows EchoNet-Synthetic's echosyn/lvdm/train.py (reference/echonet-synthetic.md, "Training")
with nanoGPT's and DiT's DDP loop; differences from the original: docs/train.md.
"""

import argparse
import dataclasses
import json
import os
import random
import re
import shutil
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import diffusion
import model


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def flag(group, name, **kw):
    """Config key `name` as a flag spelled both ways: --max-steps and --max_steps."""
    group.add_argument(*sorted({"--" + name.replace("_", "-"), "--" + name}), dest=name, **kw)


def nullable(s):
    return None if s.lower() in ("", "none", "null") else s


parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
parser.add_argument("--config", help="JSON file of config keys (the flags below, snake_case)")
parser.add_argument("--dry-run", "--dry_run", action="store_true",
                    help="print the resolved config as JSON and exit")
g = parser.add_argument_group("main")
flag(g, "model", default="unet", choices=["unet", "vae"],
     help="what to train: the LVDM's UNet, or a VAE for the phantom demo (real EchoNet work "
          "uses the published VAE; this mode has no adversarial or perceptual loss)")
flag(g, "preset", default="lvdm",
     help="model.py preset (UNet: lvdm, small, tiny; VAE: echonet, small, tiny)")
flag(g, "data", nargs="+", default=["data/latents/dynamic", "data/latents/ped_a4c",
                                    "data/latents/ped_psax"],
     help="data roots, concatenated: FileList.csv + Latents/ (UNet) or + Videos/ (VAE); "
          "the original's three")
flag(g, "vae", type=nullable, default="models/vae",
     help="VAE model folder that decodes the previews ('none': show latent channels 0-2)")
flag(g, "out", default="out", help="run folder: config.json, log.jsonl, previews/, checkpoints")
flag(g, "resume", default="latest", help="'latest' checkpoint in --out (none: start fresh), "
     "'none', or a checkpoint-<step> folder")
flag(g, "frames", type=int, default=64, help="frames per training clip (the original's 64)")
flag(g, "fps", type=float, default=32.0, help="clips are resampled to this frame rate (original)")
g = parser.add_argument_group("hyperparameters (the paper's)")
flag(g, "batch_size", type=int, default=128, help="global batch: clips per optimizer step over "
     "all processes (16 per GPU x 8 GPUs in the paper)")
flag(g, "batch_per_gpu", type=int, default=16,
     help="most clips per process per forward pass; fewer means gradient accumulation")
flag(g, "max_steps", type=int, default=500_000, help="optimizer steps")
flag(g, "lr", type=float, default=1e-4, help="AdamW learning rate, constant after warm-up")
flag(g, "warmup", type=int, default=500,
     help="linear warm-up steps: step k (from 1) uses lr * min(1, k / warmup)")
flag(g, "betas", type=float, nargs=2, default=[0.9, 0.999], help="AdamW betas")
flag(g, "weight_decay", type=float, default=1e-2, help="AdamW weight decay")
flag(g, "adam_eps", type=float, default=1e-8, help="AdamW epsilon")
flag(g, "grad_clip", type=float, default=1.0, help="max gradient norm")
flag(g, "ema_decay", type=float, default=0.9999, help="EMA decay cap (diffusers' EMAModel "
     "warm-up: min(cap, (1 + n) / (10 + n)))")
flag(g, "noise_offset", type=float, default=0.1, help="offset noise strength (Guttenberg 2023)")
flag(g, "ef_dropout", type=float, default=0.1,
     help="share of clips trained with NULL_EF, for classifier-free guidance (applied for real)")
flag(g, "recon_loss", default="l1", choices=["l1", "mse"], help="VAE reconstruction loss")
flag(g, "kl_weight", type=float, default=1e-6, help="VAE KL weight (latent diffusion's KL-reg)")
flag(g, "seed", type=int, default=42, help="seeds init, data order, noise (the original's 42)")
g = parser.add_argument_group("performance")
flag(g, "device", default="auto", help="'auto' (cuda:LOCAL_RANK if there is a GPU), cpu, cuda")
flag(g, "precision", default="fp16", choices=["fp32", "bf16", "fp16"], help="autocast on GPU: "
     "fp16 with a grad scaler as the original, bf16 recommended on Ampere+; the CPU runs fp32")
flag(g, "tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls (original)")
flag(g, "compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile")
flag(g, "grad_checkpointing", action=argparse.BooleanOptionalAction, default=False,
     help="recompute UNet blocks in the backward pass to save memory")
flag(g, "workers", type=int, default=16, help="DataLoader workers per process (original)")
g = parser.add_argument_group("output")
flag(g, "checkpoint_every", type=int, default=10_000, help="steps between checkpoints")
flag(g, "keep", type=int, default=100, help="checkpoints kept (the oldest are deleted)")
flag(g, "preview_every", type=int, default=1500, help="steps between previews (0: never)")
flag(g, "preview_efs", type=float, nargs="+", default=[0, 40, 70, 100],
     help="EF values (%%) of the preview videos")
flag(g, "preview_sampler", default="ddpm", choices=["ddpm", "ddim"],
     help="preview sampler (the original's DDPM)")
flag(g, "preview_steps", type=int, default=128, help="preview sampling steps (original: 128)")
flag(g, "preview_guidance", type=float, default=1.0, help="classifier-free guidance scale")
flag(g, "log_every", type=int, default=10, help="steps between log.jsonl lines")
del g


class ConfigError(Exception):
    """A bad config file, key or value; the message names it."""


class TrainingError(Exception):
    """Training cannot go on (a non-finite loss, an unusable checkpoint)."""


def resolve_config(argv=None):
    """Defaults (the paper run) < --config FILE < command-line flags. Returns (config, dry_run).

    The file's keys become flags placed before the command line's: argparse checks their types
    and choices, and a flag also given on the command line wins (the last occurrence counts).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    keys = [k for k in vars(args) if k not in ("config", "dry_run")]
    if args.config:
        try:
            with open(args.config) as f:
                given = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{args.config}: cannot read the config ({e})") from None
        if not isinstance(given, dict):
            raise ConfigError(f"{args.config}: expected a JSON object of config keys")
        tokens = []
        for key, value in given.items():
            if key.startswith("_"):  # "_comment": JSON has no comments
                continue
            key = key.replace("-", "_")
            if key not in keys:
                raise ConfigError(f"{args.config}: unknown config key {key!r} (python train.py "
                                  "--help lists them)")
            if isinstance(value, bool):
                tokens.append(f"--{key}" if value else f"--no-{key}")
            else:
                tokens += [f"--{key}", *map(str, value if isinstance(value, list) else [value])]
        args = parser.parse_args(tokens + argv)
    cfg = {k: getattr(args, k) for k in keys}
    for key, least in [("batch_size", 1), ("batch_per_gpu", 1), ("frames", 1), ("keep", 1),
                       ("checkpoint_every", 1), ("log_every", 1), ("preview_steps", 1),
                       ("max_steps", 0), ("warmup", 0), ("workers", 0), ("preview_every", 0)]:
        if cfg[key] < least:
            raise ConfigError(f"{key} must be >= {least}, got {cfg[key]}")
    if not 0 <= cfg["ef_dropout"] <= 1:
        raise ConfigError(f"ef_dropout must be in [0, 1], got {cfg['ef_dropout']}")
    return cfg, args.dry_run


# --- building blocks ---------------------------------------------------------------------------


def clip_generators(seed, step, positions):
    """One CPU generator per clip, seeded with (seed, step, position in the global batch): a
    clip's noise, t and EF dropout do not depend on how the batch is split over processes."""
    return [torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, p])
                                              .generate_state(1, np.uint64)[0]))
            for p in positions]


def lvdm_loss(unet, scheduler, batch, gens, cfg, amp, device):
    """v-prediction loss of one micro-batch over its real frames (fp32, 0-dim)."""
    x0 = batch["latents"].to(device)  # [B, F, C, H, W]
    cond = batch["cond"].to(device)  # [B, C, H, W]
    # Per clip, from its own generator: t uniform in [0, 1000), EF dropped to NULL_EF with
    # probability ef_dropout (the original drew this mask and never applied it), offset noise.
    N = scheduler.config["num_train_timesteps"]
    t = torch.cat([torch.randint(0, N, (1,), generator=g) for g in gens]).to(device)
    ef = torch.cat([diffusion.drop_ef(batch["ef"][i:i + 1], cfg["ef_dropout"], g)
                    for i, g in enumerate(gens)]).to(device)
    noise = diffusion.offset_noise(x0, cfg["noise_offset"], gens)
    # Forward process (DDPM, Ho et al. 2020, Eq. 4) and v target (Salimans & Ho 2022), both from
    # the same offset noise as in the original, with a = alpha_bar_t:
    #   x_t = sqrt(a) x0 + sqrt(1 - a) noise,    v = sqrt(a) noise - sqrt(1 - a) x0
    x_t = scheduler.add_noise(x0, noise, t)
    v = scheduler.get_velocity(x0, noise, t)
    with amp:
        v_pred = diffusion.predict(unet, x_t, cond, t, ef)
    return diffusion.masked_mse(v_pred, v, batch["n_real"].to(device))


def vae_loss(vae, x, gens, cfg, amp):
    """Reconstruction + KL of one micro-batch of frames x [B, 3, H, W] (fp32, 0-dim)."""
    with amp:
        recon, posterior = vae(x, sample_posterior=True, generator=gens)
    err = recon.float() - x
    rec = err.abs().mean() if cfg["recon_loss"] == "l1" else err.square().mean()
    # Latent diffusion's balance, sum |x - x_rec| + kl_weight * KL per image, divided by the
    # pixels per image (3 * 112 * 112) so that the loss is per element.
    kl = model.DiagonalGaussian(posterior.moments.float()).kl()  # [B]
    return rec + cfg["kl_weight"] * kl.mean() / x[0].numel()


class ShardedSampler(torch.utils.data.Sampler):
    """This process's share of every global batch. Epoch e shuffles the dataset with a generator
    seeded (seed, e) and cuts it into global batches of G (the rest is dropped); process r of W
    takes items [r * G / W, (r + 1) * G / W) of each. The order is a function of (seed, epoch)
    only, so any process count sees the same global batches; `start` skips batches on resume."""

    def __init__(self, n, global_batch, rank, world, seed):
        self.n, self.G, self.rank, self.world, self.seed = n, global_batch, rank, world, seed
        self.steps, self.epoch, self.start = n // global_batch, 0, 0  # steps per epoch

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __len__(self):
        return (self.steps - self.start) * (self.G // self.world)

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        share = self.G // self.world
        for k in range(self.start, self.steps):
            yield from order[k * self.G + self.rank * share:][:share].tolist()


# --- previews ----------------------------------------------------------------------------------


@torch.no_grad()
def to_pixels(z, vae):
    """Latents [N, C, h, w] -> uint8 [N, 112, 112, 3]: VAE-decoded as the original's sampler
    ((x + 1) * 128, clamped), or without a VAE channels 0-2 mapped from [-2, 2] to 0..255."""
    if vae is None:
        img = (z[:, :3].float() / 4 + 0.5).clamp(0, 1) * 255
        img = F.interpolate(img, scale_factor=8, mode="nearest")
    else:
        z = z.float() / vae.config.scaling_factor
        img = torch.cat([vae.decode(c) for c in z.split(32)])  # 32 frames per call
        img = ((img + 1) * 128).clamp(0, 255)
    return img.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()


def with_header(image, labels):
    """uint8 [H, n * w, 3] -> [H + 12, n * w, 3] with one label above each w-wide column."""
    head = Image.new("RGB", (image.shape[1], 12))
    w = image.shape[1] // len(labels)
    for i, text in enumerate(labels):
        ImageDraw.Draw(head).text((i * w + 2, 0), text, fill=(255, 255, 0))
    return np.concatenate([np.asarray(head), image], axis=0)


def save_png(path, image):
    Image.fromarray(image).save(path + ".tmp", format="PNG")
    os.replace(path + ".tmp", path)


@torch.no_grad()
def preview_lvdm(unet, vae, item, cfg, amp, device, path):
    """Samples one clip per preview EF from a validation clip's conditioning frame with `unet`
    (the EMA) and writes path.gif and path.png (8 frames, top to bottom), columns: conditioning
    frame | real clip | generated at each EF."""
    efs = torch.tensor(cfg["preview_efs"], device=device) / 100
    n, Fr, shape = len(efs), cfg["frames"], item["cond"].shape
    cond = item["cond"].to(device).expand(n, *shape)
    sampler = diffusion.DDIM() if cfg["preview_sampler"] == "ddim" else diffusion.DDPM()
    sampler.set_timesteps(cfg["preview_steps"])
    gens = [torch.Generator().manual_seed(cfg["seed"] + i) for i in range(n)]
    x = diffusion.sample(unet, sampler, cond, efs, gens, Fr, window=Fr,
                         guidance=cfg["preview_guidance"], amp=amp)
    fake = to_pixels(x.flatten(0, 1), vae)
    fake = fake.reshape(n, Fr, *fake.shape[1:])  # [n, F, 112, 112, 3]
    real = to_pixels(item["latents"].to(device), vae)
    real[int(item["n_real"]):] = 0  # zero padding past the clip's end: black
    first = np.broadcast_to(to_pixels(item["cond"][None].to(device), vae), real.shape)
    strip = np.concatenate([first, real, *fake], axis=2)  # [F, 112, (2 + n) * 112, 3]
    labels = ["cond", "real"] + [f"EF {e:g}" for e in cfg["preview_efs"]]
    data.save_video(path + ".gif", [with_header(f, labels) for f in strip], cfg["fps"])
    rows = np.linspace(0, Fr - 1, min(Fr, 8)).round().astype(int)
    save_png(path + ".png", with_header(np.concatenate(list(strip[rows]), axis=0), labels))


@torch.no_grad()
def preview_vae(vae, frames, path):
    """Writes path.png: real | reconstructed (posterior mode) for each frame, one per row."""
    recon = vae.decode(vae.encode(frames).mode())
    pixels = [((x + 1) * 128).clamp(0, 255).permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()
              for x in (frames, recon)]
    grid = np.concatenate([np.concatenate(pair, axis=1) for pair in zip(*pixels)], axis=0)
    save_png(path + ".png", with_header(grid, ["real", "reconstructed"]))


# --- checkpoints -------------------------------------------------------------------------------


def list_checkpoints(out):
    """[(step, path)] of the checkpoint-<step> folders in `out`, oldest first."""
    names = os.listdir(out) if os.path.isdir(out) else []
    return sorted((int(m[1]), os.path.join(out, m[0]))
                  for m in map(re.compile(r"checkpoint-(\d+)").fullmatch, names) if m)


def rng_states():
    st = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": (st[0], torch.from_numpy(st[1].astype(np.int64)), *st[2:]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(s):
    random.setstate(s["python"])
    np.random.set_state((s["numpy"][0], s["numpy"][1].numpy().astype(np.uint32), *s["numpy"][2:]))
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(out, step, net, ema, opt, scaler, cfg, state, keep):
    """Writes out/checkpoint-<step>/ via a temporary folder renamed at the end, so a crash never
    leaves a half checkpoint; then deletes all but the newest `keep`."""
    final = os.path.join(out, f"checkpoint-{step}")
    tmp = os.path.join(out, f".tmp-checkpoint-{step}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    torch.save(net.state_dict(), os.path.join(tmp, "model.pt"))
    torch.save(ema.state_dict(), os.path.join(tmp, "ema.pt"))  # {"step", "max_decay", "model"}
    torch.save(opt.state_dict(), os.path.join(tmp, "optimizer.pt"))
    torch.save(scaler.state_dict() if scaler else {}, os.path.join(tmp, "scaler.pt"))
    torch.save(state, os.path.join(tmp, "trainer.pt"))  # step, epoch, batch, RNG states per rank
    configs = {"training_config.json": cfg, "model_config.json": model.config_to_dict(net)}
    for name, d in configs.items():  # not config.json: the folder is no diffusers model folder
        with open(os.path.join(tmp, name), "w") as f:
            json.dump(d, f, indent=2)
    shutil.rmtree(final, ignore_errors=True)  # only when re-saving the same step
    os.replace(tmp, final)
    for _, old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old)


def load(path, name, device="cpu"):
    try:
        return torch.load(os.path.join(path, name), map_location=device, weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        raise TrainingError(f"{os.path.join(path, name)}: unreadable ({e})") from None


def truncate_log(path, step):
    """Keeps the log.jsonl lines up to `step`: a killed run wrote more after its last checkpoint,
    perhaps half a line."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step and line.endswith("\n"):
                    kept.append(line)
            except (ValueError, KeyError):
                pass
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def build_model(cfg):
    """The network to train, from its model.py preset."""
    unet = cfg["model"] == "unet"
    presets = model.UNET_PRESETS if unet else model.VAE_PRESETS
    if cfg["preset"] not in presets:
        raise ConfigError(f"preset {cfg['preset']!r} is not a {cfg['model']} preset; use one of "
                          f"{sorted(presets)} (model.py)")
    config = presets[cfg["preset"]]
    if unet:  # num_frames records the clip length: sample.py's window (forward ignores it)
        return model.UNetSpatioTemporal(dataclasses.replace(config, num_frames=cfg["frames"]))
    return model.AutoencoderKL(config)


def global_batches(loader, sampler, dataset, step, accum):
    """This process's micro-batches of each global batch, epoch after epoch, from `step` on."""
    while True:
        epoch, first = divmod(step, sampler.steps)
        sampler.set_epoch(epoch, first)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)  # before iter(): it reaches the workers when they start
        micro_batches = iter(loader)
        for _ in range(first, sampler.steps):
            yield [next(micro_batches) for _ in range(accum)]
        step = (epoch + 1) * sampler.steps


# --- training ----------------------------------------------------------------------------------


def train(cfg):
    """The whole run. torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; plain python is one process."""
    # Processes and devices: NCCL on GPUs, gloo on the CPU.
    ddp = "RANK" in os.environ
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    kind = cfg["device"] if cfg["device"] != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if kind == "cuda" else kind)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    master, out, unet_mode = rank == 0, cfg["out"], cfg["model"] == "unet"
    log = print if master else (lambda *a, **k: None)

    # Global batch G = processes x accumulation steps x micro-batch (the largest <= batch_per_gpu
    # that divides G / processes): 128 = 8 x 1 x 16 in the paper.
    G = cfg["batch_size"]
    if G % world:
        raise ConfigError(f"batch_size {G} is not divisible by the {world} processes")
    per_rank = G // world
    micro = max(b for b in range(1, min(cfg["batch_per_gpu"], per_rank) + 1) if per_rank % b == 0)
    accum = per_rank // micro

    # Mixed precision on GPUs only: fp16 (the original's) with a grad scaler, or bf16; TF32.
    precision = cfg["precision"] if device.type == "cuda" else "fp32"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    amp = torch.autocast("cuda", dtype=amp_dtype) if amp_dtype else nullcontext()
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg["tf32"]

    # Data: the order of the global batches depends on (seed, epoch) only (ShardedSampler), and
    # each clip's window and conditioning frame on (seed, epoch, index) (data.py).
    def make(split):
        if unet_mode:
            return data.LatentVideoDataset(cfg["data"], split, cfg["frames"], cfg["fps"],
                                           cfg["seed"])
        return torch.utils.data.ConcatDataset([data.FrameDataset(r, split) for r in cfg["data"]])

    train_set = make("TRAIN")
    if len(train_set) < G:
        raise data.DataError(f"{len(train_set)} training items in {', '.join(cfg['data'])}: "
                             f"fewer than one global batch ({G})")
    sampler = ShardedSampler(len(train_set), G, rank, world, cfg["seed"])
    loader = torch.utils.data.DataLoader(train_set, batch_size=micro, sampler=sampler,
                                         num_workers=cfg["workers"],
                                         pin_memory=device.type == "cuda")

    # Model, EMA and optimizer. The same initial weights on every process; then seed + rank.
    torch.manual_seed(cfg["seed"])
    net = build_model(cfg)
    if unet_mode:
        # One-token cross-attention (the EF) leaves norm2, to_q, to_k without a gradient: frozen,
        # left out of the optimizer, so DDP needs no unused-parameter search. Kept in the weights.
        for p in net.unused_with_one_token():
            p.requires_grad_(False)
        net.set_gradient_checkpointing(cfg["grad_checkpointing"])
    net.to(device).train()
    ema = diffusion.EMA(net, cfg["ema_decay"])
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], betas=tuple(cfg["betas"]),
                            weight_decay=cfg["weight_decay"], eps=cfg["adam_eps"],
                            fused=device.type == "cuda")
    random.seed(cfg["seed"] + rank)
    np.random.seed(cfg["seed"] + rank)
    torch.manual_seed(cfg["seed"] + rank)

    # Resume: model, EMA, optimizer, scaler, step and RNG states; the data position follows from
    # the step (epoch, batch = divmod(step, steps per epoch)).
    step, path = 0, None
    if cfg["resume"] == "latest":
        path = (list_checkpoints(out) or [(0, None)])[-1][1]
    elif cfg["resume"] != "none":
        path = cfg["resume"]
        if not os.path.isdir(path):
            raise ConfigError(f"resume: {path} is not a checkpoint folder")
    if path:
        try:
            net.load_state_dict(load(path, "model.pt"))
            ema.load_state_dict(load(path, "ema.pt"))
            opt.load_state_dict(load(path, "optimizer.pt"))
            if scaler and load(path, "scaler.pt"):
                scaler.load_state_dict(load(path, "scaler.pt"))
        except (RuntimeError, KeyError, ValueError) as e:
            raise TrainingError(f"{path} does not fit this run: {str(e).splitlines()[0]}") from None
        for group in opt.param_groups:  # this run's settings, not the checkpoint's
            group.update(betas=tuple(cfg["betas"]), weight_decay=cfg["weight_decay"],
                         eps=cfg["adam_eps"])
        state = load(path, "trainer.pt")
        step = state["step"]
        if len(state["rng"]) == world:
            set_rng_states(state["rng"][rank])
        else:
            log(f"{path} was written by {len(state['rng'])} processes: RNG states not restored "
                "(the training noise does not use them)")
        log(f"resumed from {path} at step {step}")
    if master:
        os.makedirs(out, exist_ok=True)
        truncate_log(os.path.join(out, "log.jsonl"), step)
        for name in os.listdir(out):  # a checkpoint cut short by a crash
            if name.startswith(".tmp-checkpoint-"):
                shutil.rmtree(os.path.join(out, name))
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)

    # Previews (rank 0): a fixed validation clip (or 8 frames) so that previews are comparable.
    vae, val = None, None
    if master and cfg["preview_every"]:
        try:
            val_set = make("VAL")
        except data.DataError:
            log("no usable VAL split: previews use TRAIN data")
            val_set = train_set
        if unet_mode:
            val = val_set[0]
            if cfg["vae"]:
                vae = model.load_model(cfg["vae"], expect="AutoencoderKL").to(device)
        else:
            val = torch.stack([val_set[int(i)] for i in
                               np.linspace(0, len(val_set) - 1, 8).round()]).to(device)

    # Wrap for DDP (gradients averaged on the last micro-step) and torch.compile. The checkpoint
    # saves `net` itself, so its keys carry neither "module." nor "_orig_mod.".
    ddp_net = DDP(net, device_ids=[device] if device.type == "cuda" else None,
                  gradient_as_bucket_view=True) if ddp else None
    train_net = ddp_net or net
    if cfg["compile"]:
        train_net = torch.compile(train_net)
    scheduler = diffusion.DDPM()  # the training schedule: 1000 steps, linear betas, v-prediction

    trained = sum(p.numel() for p in params)
    log(f"{cfg['model']} '{cfg['preset']}': {model.count_parameters(net):,} parameters, "
        f"{trained:,} trained; {len(train_set)} items, {sampler.steps} steps per epoch; batch "
        f"{G} = {world} processes x {accum} accumulation x {micro}; {device}, {precision}")
    batches = global_batches(loader, sampler, train_set, step, accum)
    sums, t0 = {"loss": 0.0, "grad_norm": 0.0, "steps": 0, "data_s": 0.0}, time.time()
    bar = tqdm(total=cfg["max_steps"], initial=step, disable=not master, dynamic_ncols=True)
    with bar:  # closed on errors too, before main() prints the error
        while step < cfg["max_steps"]:
            # Load this step's micro-batches and count the real frames of the global batch.
            tic = time.time()
            micro_batches = next(batches)
            sums["data_s"] += time.time() - tic
            counts = [int(b["n_real"].sum()) if unet_mode else len(b) for b in micro_batches]
            total = torch.tensor(sum(counts), device=device)
            if ddp:
                dist.all_reduce(total)
            total = int(total)

            # Forward and backward. Each micro-batch's loss (a mean over its real frames) is
            # weighted by its share of the global batch's real frames, times the process count
            # that DDP's average divides out: the gradient is that of the mean over all real
            # frames of the global batch, however it is split over processes and micro-steps.
            loss_sum = torch.zeros((), device=device)
            for j, batch in enumerate(micro_batches):
                start = rank * per_rank + j * micro  # this micro-batch's place in the global one
                gens = clip_generators(cfg["seed"], step, range(start, start + micro))
                last = j == accum - 1
                with ddp_net.no_sync() if ddp and not last else nullcontext():
                    if unet_mode:
                        loss = lvdm_loss(train_net, scheduler, batch, gens, cfg, amp, device)
                    else:
                        x = batch.to(device, non_blocking=True)
                        loss = vae_loss(train_net, x, gens, cfg, amp)
                    share = counts[j] / total
                    weighted = loss * (share * world)
                    (scaler.scale(weighted) if scaler else weighted).backward()
                loss_sum += loss.detach() * share

            # Average the loss over processes; stop on a non-finite one before the optimizer
            # step, so neither the weights nor the EMA are touched.
            if ddp:
                dist.all_reduce(loss_sum)
            loss = loss_sum.item()
            if not np.isfinite(loss):
                raise TrainingError(
                    f"loss is {loss} at step {step + 1}: stopped before the optimizer step, so the "
                    f"weights and EMA are unharmed and the checkpoints in {out} are intact; try a "
                    "lower --lr, --precision bf16, or check the data")

            # Clip the gradient norm (unscaled first with fp16) and step. Warm-up: update k = 1,
            # 2, ... uses lr * min(1, k / warmup). The original's config asks for 500 warm-up
            # steps, but its scheduler "constant" ignores them: it ran at 1e-4 from update 1.
            if scaler:
                scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"]).item()
            if not np.isfinite(grad_norm) and not scaler:  # the scaler skips such steps itself
                raise TrainingError(f"gradient norm is {grad_norm} at step {step + 1} (loss "
                                    f"{loss:.4g}): stopped before the optimizer step")
            lr = cfg["lr"] * min(1.0, (step + 1) / cfg["warmup"]) if cfg["warmup"] else cfg["lr"]
            for group in opt.param_groups:
                group["lr"] = lr
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)

            # Update EMA.
            ema.update(net)
            step += 1

            # Log: loss averaged over processes and steps, lr, grad norm, clips per second.
            sums["loss"] += loss
            sums["grad_norm"] += grad_norm
            sums["steps"] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            if master and (step % cfg["log_every"] == 0 or step == cfg["max_steps"]):
                n, seconds = sums["steps"], time.time() - t0
                line = {"step": step, "epoch": (step - 1) // sampler.steps, "lr": lr,
                        "loss": sums["loss"] / n, "grad_norm": sums["grad_norm"] / n,
                        "clips_per_s": n * G / seconds, "data_wait": sums["data_s"] / seconds}
                with open(os.path.join(out, "log.jsonl"), "a") as f:
                    f.write(json.dumps(line) + "\n")
                sums, t0 = dict.fromkeys(sums, 0), time.time()
            pause = time.time()

            # Checkpoint (every process's RNG state, rank 0 writes) and preview.
            if step % cfg["checkpoint_every"] == 0 or step == cfg["max_steps"]:
                states = [None] * world
                if ddp:
                    dist.all_gather_object(states, rng_states())
                else:
                    states = [rng_states()]
                state = {"step": step, "epoch": step // sampler.steps,
                         "batch": step % sampler.steps, "world_size": world, "rng": states}
                if master:
                    save_checkpoint(out, step, net, ema, opt, scaler, cfg, state, cfg["keep"])
                if ddp:
                    dist.barrier()
            if master and cfg["preview_every"] and step % cfg["preview_every"] == 0:
                path = os.path.join(out, "previews", f"step-{step}")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                if unet_mode:
                    preview_lvdm(ema.model, vae, val, cfg, amp, device, path)
                else:
                    preview_vae(ema.model, val, path)
            t0 += time.time() - pause  # checkpoints and previews do not count against clips/s
    log(f"done: {step} steps in {out}")


def main(argv=None):
    rank = int(os.environ.get("RANK", 0))
    try:
        cfg, dry_run = resolve_config(argv)
        if dry_run:
            if rank == 0:
                print(json.dumps(cfg, indent=2))
            return
        train(cfg)
    except (ConfigError, TrainingError, data.DataError, model.ModelLoadError) as e:
        # One line, no traceback. A DataLoader worker's error arrives with the worker's traceback
        # in its message: keep its last line, and print it from whichever process met it.
        message, from_worker = str(e).strip(), "Original Traceback" in str(e)
        if from_worker:
            message = message.splitlines()[-1].split(": ", 1)[-1]
        if rank == 0 or from_worker:
            print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
