"""Train EchoNet-Synthetic's latent video diffusion model (LVDM), or the phantom demo's small VAE,
on one process or many (torchrun + DDP), without diffusers or Accelerate.

    python train.py --config configs/tiny.json --out out/tiny         # CPU smoke run, seconds
    torchrun --nproc_per_node 8 train.py --config configs/lvdm.json    # the paper run, 8 GPUs
    torchrun --nproc_per_node 2 train.py --config configs/tiny.json --max-steps 20  # gloo, CPU
    python train.py --config configs/vae_phantom.json                  # the demo's VAE
    python train.py --config configs/lvdm.json --lr 2e-4 --dry-run     # print the resolved config

Every key of CONFIG below is a flag (max_steps: --max-steps; --help lists them); flags
override the --config file, which overrides CONFIG (the paper run). The run folder (--out)
holds config.json, log.jsonl, previews/ and checkpoint-<step>/; the same command again resumes
from the newest checkpoint. Follows EchoNet-Synthetic's echosyn/lvdm/train.py
(reference/echonet-synthetic.md, "Training") with nanoGPT's and DiT's DDP loop; the objective
is diffusion.lvdm_loss; the differences from the original: docs/train.md.
"""

import argparse
import copy
import dataclasses
import json
import os
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

# --- config: the paper run (EchoNet-Synthetic's echosyn/lvdm/configs/default.yaml) ---------------
CONFIG = dict(  # key=(default, what it is)
    # main
    model=("unet", "what to train: the LVDM's UNet, or 'vae' (the phantom demo's VAE)"),
    preset=("lvdm", "model.py preset (UNet lvdm/small/phantom/tiny, VAE echonet/...)"),
    data=(["data/latents/dynamic", "data/latents/ped_a4c", "data/latents/ped_psax"],
          "data roots, concatenated: FileList.csv + Latents/ (the VAE: + Videos/)"),
    vae=("models/vae", "VAE folder decoding the previews (none: latent channels 0-2)"),
    out=("out/lvdm", "run folder (export.py and sample.py look here by default)"),
    resume=("latest", "latest complete checkpoint in out (if any), none, or a folder"),
    frames=(64, "frames per training clip"),
    fps=(32.0, "clips are resampled to this frame rate"),
    # hyperparameters
    batch_size=(128, "global batch: clips per optimizer step, all processes together"),
    batch_per_gpu=(16, "most clips per process per forward pass (fewer: accumulation)"),
    max_steps=(500_000, "optimizer steps"),
    lr=(1e-4, "AdamW learning rate, constant after the warm-up"),
    warmup=(500, "update k (from 1) uses lr * min(1, k / warmup)"),
    betas=([0.9, 0.999], "AdamW betas"),
    weight_decay=(1e-2, "AdamW weight decay"),
    adam_eps=(1e-8, "AdamW epsilon"),
    grad_clip=(1.0, "max gradient norm"),
    ema_decay=(0.9999, "EMA decay cap (diffusers' EMAModel warm-up below it)"),
    noise_offset=(0.1, "offset noise strength (Guttenberg 2023)"),
    ef_dropout=(0.1, "share of clips trained with NULL_EF, for guidance (applied here)"),
    residual=(0.0, "diffuse k (x0 - cond) instead of x0 (0: x0, the original's)"),
    cond_frame=("random", "conditioning frame: random (any of the video, the original's), "
                "first (the clip's first: it starts from it) or ed (first, at end-diastole)"),
    t_shift=(0.0, "t = N (1 - (1 - u)^p): more high-noise clips (0: uniform, the original's)"),
    recon_loss=("l1", "VAE: reconstruction loss, l1 or mse"),
    kl_weight=(1e-6, "VAE: KL weight (latent diffusion's KL-reg)"),
    unit_latents=(False, "VAE: scaling_factor = 1 / std of TRAIN latents (off: the preset's)"),
    seed=(42, "seeds the weights, data order and noise"),
    # performance
    device=("auto", "auto (cuda:LOCAL_RANK if there is a GPU), cpu, cuda"),
    precision=("fp16", "GPU autocast: fp16 + grad scaler (original), bf16, fp32; CPU: fp32"),
    tf32=(True, "TF32 matmuls (--no-tf32 to turn off)"),
    compile=(False, "torch.compile the network"),
    grad_checkpointing=(False, "recompute UNet blocks in the backward pass to save memory"),
    workers=(16, "DataLoader workers per process"),
    # output
    checkpoint_every=(10_000, "steps between checkpoints"),
    keep=(100, "checkpoints kept (the oldest deleted)"),
    preview_every=(1500, "steps between previews (0: none)"),
    preview_efs=([0.0, 40.0, 70.0, 100.0], "EFs of the preview videos, in percent"),
    preview_sampler=("ddpm", "ddpm (the original's) or ddim"),
    preview_steps=(128, "preview sampling steps"),
    preview_guidance=(1.0, "classifier-free guidance scale of the previews (1: none)"),
    log_every=(10, "steps between log.jsonl lines"),
)
CHOICES = dict(model=["unet", "vae"], precision=["fp32", "bf16", "fp16"],
               preview_sampler=["ddpm", "ddim"], recon_loss=["l1", "mse"],
               cond_frame=["random", "first", "ed"])
# Every number's range (low, high or None), checked before any work; NaN and inf fail too. A
# number not listed here must be >= 0.
RANGES = {k: (0, None) for k, (v, _) in CONFIG.items() if type(v) in (int, float)} | dict(
    batch_size=(1, None), batch_per_gpu=(1, None), frames=(1, None), fps=(1, None),
    checkpoint_every=(1, None), keep=(1, None), log_every=(1, None), ema_decay=(0, 1),
    ef_dropout=(0, 1), preview_steps=(1, 1000))

TrainingError = data.DataError  # a bad config or a run that cannot go on: main() prints it

def file_flags(path):
    """A --config file's keys as command-line tokens: {"lr": 2e-4, "tf32": false, "data": [a, b]}
    -> --lr 0.0002 --no-tf32 --data a b, so that argparse checks them as it checks flags."""
    try:
        with open(path) as f:
            given = {k: v for k, v in json.load(f).items() if not k.startswith("_")}  # _: notes
    except (OSError, ValueError, AttributeError) as e:
        raise TrainingError(f"{path}: not a JSON object of config keys ({e})") from None
    tokens = []
    for key, value in given.items():
        if key not in CONFIG:
            raise TrainingError(f"{path}: unknown config key {key!r} (train.py CONFIG lists them)")
        flag = ("--no-" if value is False else "--") + key.replace("_", "-")
        values = [] if isinstance(value, bool) else value if isinstance(value, list) else [value]
        tokens += [flag, *map(str, values)]
    return tokens

def resolve_config(argv=None):
    """CONFIG < --config FILE < command-line flags; returns (config, dry_run). The file's tokens
    go before the command line's: a flag given in both takes the command line's value."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="JSON file of config keys")
    parser.add_argument("--dry-run", action="store_true", help="print the config and exit")
    for key, (value, text) in CONFIG.items():
        if isinstance(value, bool):
            kind = dict(action=argparse.BooleanOptionalAction)
        elif isinstance(value, list):  # betas: two numbers; data, preview_efs: one or more
            kind = dict(nargs=len(value) if key == "betas" else "+", type=type(value[0]))
        else:
            kind = dict(type=type(value), choices=CHOICES.get(key))
        parser.add_argument("--" + key.replace("_", "-"), default=value,
                            help=f"{text} (default: %(default)s)", **kind)
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    args = parser.parse_args(argv)
    if args.config:
        args = parser.parse_args(file_flags(args.config) + argv)
    cfg = {k: getattr(args, k) for k in CONFIG}
    cfg["vae"] = None if str(cfg["vae"]).lower() in ("", "none", "null") else cfg["vae"]
    data.check_ranges(cfg, RANGES)
    return cfg, args.dry_run

# --- setup: processes, data, model and its loss -------------------------------------------------
def setup_device(cfg):
    """(device, rank, world size, autocast context, grad scaler, precision) of this process
    (data.join_processes). GPUs run fp16 (the original's, with a grad scaler) or bf16 autocast,
    the CPU fp32. Without fp16 the scaler is disabled (scale() and unscale_() do nothing, step()
    is opt.step()): the loop has one path for every precision."""
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device, rank, world = data.join_processes(auto if cfg["device"] == "auto" else cfg["device"])
    precision = cfg["precision"] if device.type == "cuda" else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg["tf32"]
    return (device, rank, world, torch.autocast("cuda", dtype=dtype) if dtype else nullcontext(),
            torch.amp.GradScaler("cuda", enabled=precision == "fp16"), precision)

def split_batch(G, per_gpu, world):
    """(micro-batch, accumulation steps): G = processes x accumulation x micro-batch, the
    micro-batch the largest divisor of G / processes <= per_gpu (128 = 8 x 1 x 16, the paper)."""
    if G % world:
        raise TrainingError(f"batch_size {G} is not divisible by the {world} processes")
    micro = max(b for b in range(1, min(per_gpu, G // world) + 1) if (G // world) % b == 0)
    return micro, G // world // micro

def make_dataset(cfg, split):
    """The LVDM's latent clips (each drawn from (seed, epoch, index)), or the VAE's frames."""
    if cfg["model"] == "vae":
        return torch.utils.data.ConcatDataset([data.FrameDataset(r, split) for r in cfg["data"]])
    return data.LatentVideoDataset(cfg["data"], split, cfg["frames"], cfg["fps"], cfg["seed"],
                                   cfg["cond_frame"])

def spaced(dataset, n, device):
    """n items spread evenly over a frame dataset (first to last), stacked: [n, 3, H, W]."""
    picks = np.linspace(0, len(dataset) - 1, n).round().astype(int)
    return torch.stack([dataset[int(i)] for i in picks]).to(device)

def global_batches(dataset, cfg, rank, world, micro, step, pin_memory):
    """This process's micro-batches of every global batch from `step` on, epoch after epoch.
    Epoch e shuffles the items with a generator seeded (seed, e) and cuts them into global
    batches of G (the rest is dropped); process r of W takes items [r G / W, (r + 1) G / W) of
    each: any process count sees the same global batches, and a resumed run goes on mid-epoch."""
    G, share = cfg["batch_size"], cfg["batch_size"] // world
    steps = len(dataset) // G  # per epoch
    while True:
        epoch, first = divmod(step, steps)
        order = np.random.default_rng([cfg["seed"], epoch]).permutation(len(dataset))
        mine = order[:steps * G].reshape(steps, world, share)[first:, rank].ravel().tolist()
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)  # before the loader hands it to its workers
        loader = iter(torch.utils.data.DataLoader(dataset, micro, sampler=mine, pin_memory=
                                                  pin_memory, num_workers=cfg["workers"]))
        for _ in range(first, steps):
            yield [next(loader) for _ in range(share // micro)]
        step = (epoch + 1) * steps

def build_model(cfg, device):
    """(network, its EMA, optimizer, trained parameters): the network from its model.py preset,
    in train mode, seeded (every process starts from the same weights); the EMA an fp32 copy;
    AdamW (fused on CUDA) over the trained parameters."""
    presets = model.UNET_PRESETS if cfg["model"] == "unet" else model.VAE_PRESETS
    if cfg["preset"] not in presets:
        raise TrainingError(f"preset {cfg['preset']!r} is not a {cfg['model']} preset; use one "
                            f"of {sorted(presets)} (model.py)")
    torch.manual_seed(cfg["seed"])
    if cfg["model"] == "vae":
        net = model.AutoencoderKL(presets[cfg["preset"]])
    else:  # num_frames records the clip length: sample.py's window (the forward ignores it)
        net = model.UNetSpatioTemporal(dataclasses.replace(presets[cfg["preset"]],
                                                           num_frames=cfg["frames"]))
        # One-token cross-attention (the EF) leaves norm2, to_q, to_k without a gradient:
        # frozen, left out of the optimizer, so DDP needs no unused-parameter search.
        for p in net.unused_with_one_token():
            p.requires_grad_(False)
        net.set_gradient_checkpointing(cfg["grad_checkpointing"])
    net.to(device).train()
    ema = copy.deepcopy(net).float().eval().requires_grad_(False)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], betas=tuple(cfg["betas"]), eps=cfg["adam_eps"],
                            weight_decay=cfg["weight_decay"], fused=device.type == "cuda")
    return net, ema, opt, params

FORWARD_PROCESS = diffusion.DDPM()  # the noise schedule of the loss, built once, not per step

def loss_of(net, batch, generators, cfg, amp, device):
    """A micro-batch's loss, a 0-dim fp32 mean over its frames; one generator per item.
    LVDM: diffusion.lvdm_loss. VAE: reconstruction + KL of frames [B, 3, H, W]."""
    if cfg["model"] == "unet":
        x0, cond, ef, n_real = (batch[k].to(device) for k in ("latents", "cond", "ef", "n_real"))
        return diffusion.lvdm_loss(net, FORWARD_PROCESS, x0, cond, ef, n_real, generators,
                                   cfg["ef_dropout"], cfg["noise_offset"], amp,
                                   cfg["residual"], cfg["t_shift"])
    x = batch.to(device)
    with amp:
        recon, posterior = net(x, sample_posterior=True, generator=generators)
    err = recon.float() - x
    rec = err.abs().mean() if cfg["recon_loss"] == "l1" else err.square().mean()
    # Latent diffusion's balance, sum |x - x_rec| + kl_weight * KL per image, divided by the
    # pixels per image (3 * 112 * 112) so that the loss is per element.
    kl = model.DiagonalGaussian(posterior.moments.float()).kl()  # [B]
    return rec + cfg["kl_weight"] * kl.mean() / x[0].numel()

# --- the run folder: resume, log, checkpoints ---------------------------------------------------
def resume(cfg, net, ema, opt, scaler, log):
    """The step to start from: 0, or that of the checkpoint --resume names (latest: the run
    folder's newest complete one, model.list_checkpoints) once its model, EMA, optimizer and
    scaler are loaded. The data position follows: epoch, batch = divmod(step, steps per epoch)."""
    path = cfg["resume"]
    if path == "latest":
        path = (model.list_checkpoints(cfg["out"]) or [(0, "none")])[-1][1]
    if path == "none":
        return 0
    if not os.path.isdir(path):
        raise TrainingError(f"resume: {path} is not a checkpoint folder")
    state = {k: model.torch_load(os.path.join(path, k + ".pt"))
             for k in ("model", "ema", "optimizer", "scaler", "trainer")}
    try:
        net.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"]["model"])
        opt.load_state_dict(state["optimizer"])
        if state["scaler"]:  # {} from a run without fp16
            scaler.load_state_dict(state["scaler"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise TrainingError(f"{path} does not fit this run: {str(e).splitlines()[0]}") from None
    for group in opt.param_groups:  # this run's settings, not the checkpoint's
        group.update(betas=tuple(cfg["betas"]), weight_decay=cfg["weight_decay"],
                     eps=cfg["adam_eps"])
    log(f"resumed from {path} at step {state['trainer']['step']}")
    return state["trainer"]["step"]

def prepare_run_folder(cfg, step):
    """Rank 0: the run folder with config.json; log.jsonl cut back to `step` (a killed run
    logged past its last checkpoint, perhaps half a line); a crash's temporary folders gone."""
    out, log = cfg["out"], os.path.join(cfg["out"], "log.jsonl")
    os.makedirs(os.path.join(out, "previews") if cfg["preview_every"] else out, exist_ok=True)
    if os.path.isfile(log):
        with open(log) as f:
            kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= step]
        data.save(log, "".join(kept))
    for name in [n for n in os.listdir(out) if n.startswith(".tmp-")]:
        shutil.rmtree(os.path.join(out, name))
    data.save(os.path.join(out, "config.json"), json.dumps(cfg, indent=2))

def save_checkpoint(cfg, step, net, ema, opt, scaler, state):
    """<out>/checkpoint-<step>/ (model.save_checkpoint; the newest `keep` are kept), no diffusers
    model folder (export.py makes one). A VAE with unit_latents gets its scale here: latent
    diffusion's (Rombach et al. 2022, sec. 4.3.2), 1 / std of the EMA's posterior means of 64
    evenly spaced TRAIN frames, the unit variance the LVDM's noise schedule assumes."""
    if cfg["model"] == "vae" and cfg["unit_latents"]:
        with torch.no_grad():
            x = spaced(make_dataset(cfg, "TRAIN"), 64, next(ema.parameters()).device)
            ema.config.scaling_factor = net.config.scaling_factor = (
                1 / ema.encode(x).mode().std()).item()
    try:
        model.save_checkpoint(cfg["out"], step, {
            "model": net.state_dict(), "optimizer": opt.state_dict(), "trainer": state,
            "ema": {"step": step, "max_decay": cfg["ema_decay"], "model": ema.state_dict()},
            "scaler": scaler.state_dict() if scaler else {}, "training_config": cfg,
            "model_config": model.config_to_dict(net)}, cfg["keep"])
    except (OSError, RuntimeError) as e:  # a full disk: torch.save raises a RuntimeError
        raise TrainingError(f"{cfg['out']}/checkpoint-{step} not written ({e}): the earlier "
                            "checkpoints are intact") from None

# --- previews ------------------------------------------------------------------------------------
def latent_pixels(z, vae):
    """Latents [..., C, h, w] -> uint8 frames [..., 8h, 8w, 3]: decoded by the VAE (data.decode),
    or without one, channels 0-2 mapped from [-2, 2] to 0..255 and enlarged 8x."""
    if vae is not None:
        return data.decode(vae, z)
    x = F.interpolate(z.flatten(0, -4)[:, :3].float() / 2, scale_factor=8, mode="nearest")
    return data.to_pixels(x.unflatten(0, z.shape[:-3]))

def preview_example(cfg, train_set, device):
    """Rank 0's fixed validation example, so that previews are comparable: (the first VAL clip,
    the VAE decoding it or None) for the LVDM, (8 VAL frames, None) for the VAE; TRAIN if no VAL."""
    try:
        val_set = make_dataset(cfg, "VAL")
    except data.DataError:
        print("no usable VAL split: previews use TRAIN data")
        val_set = train_set
    if cfg["model"] == "vae":
        return spaced(val_set, 8, device), None
    vae = model.load_model(cfg["vae"], expect="AutoencoderKL").to(device) if cfg["vae"] else None
    return val_set[0], vae

@torch.no_grad()
def preview(ema, path, example, vae, cfg, amp, device):
    """Writes path.gif (all frames) and path.png (8 of them, top to bottom) of the EMA model on
    the preview example, under a 12 px header naming the columns. VAE: real | reconstructed
    (posterior mode), one frame per row. LVDM: one clip per preview EF sampled from the
    example's conditioning frame; columns conditioning frame | real clip | each EF."""
    if cfg["model"] == "vae":
        pixels = [data.to_pixels(x) for x in (example, ema.decode(ema.encode(example).mode()))]
        strip, labels, fps = np.concatenate(pixels, axis=2), ["real", "reconstructed"], 1
    else:
        efs = torch.tensor(cfg["preview_efs"], device=device) / 100
        n, Fr, cond = len(efs), cfg["frames"], example["cond"].to(device)
        sampler = diffusion.DDIM() if cfg["preview_sampler"] == "ddim" else diffusion.DDPM()
        sampler.set_timesteps(cfg["preview_steps"])
        gens = [data.item_generator(cfg["seed"], i) for i in range(n)]
        x = diffusion.sample(ema, sampler, cond.expand(n, *cond.shape), efs, gens, Fr, window=Fr,
                             guidance=cfg["preview_guidance"], amp=amp, residual=cfg["residual"])
        real = latent_pixels(example["latents"].to(device), vae)  # [F, H, W, 3]
        real[int(example["n_real"]):] = 0  # zero padding past the clip's end: black
        first = np.broadcast_to(latent_pixels(cond[None], vae), real.shape)
        strip = np.concatenate([first, real, *latent_pixels(x, vae)], axis=2)  # [F, H, (2+n)W, 3]
        labels, fps = ["cond", "real"] + [f"EF {e:g}" for e in cfg["preview_efs"]], cfg["fps"]
    head = Image.new("RGB", (strip.shape[2], 12))
    for i, text in enumerate(labels):
        ImageDraw.Draw(head).text((i * strip.shape[2] // len(labels) + 2, 0), text, fill="yellow")
    head = np.asarray(head)
    data.save_video(path + ".gif", [np.concatenate([head, frame]) for frame in strip], fps)
    rows = np.linspace(0, len(strip) - 1, min(len(strip), 8)).round().astype(int)
    png = Image.fromarray(np.concatenate([head, *strip[rows]]))
    data.write_whole(path + ".png", lambda tmp: png.save(tmp, format="PNG"))

# --- training ------------------------------------------------------------------------------------
def train(cfg):
    """The whole run, on every process."""
    # Setup: processes, batch arithmetic, precision, data, model, resume, run folder, previews.
    device, rank, world, amp, scaler, precision = setup_device(cfg)
    ddp, master, out, G = dist.is_initialized(), rank == 0, cfg["out"], cfg["batch_size"]
    log = print if master else (lambda *a, **k: None)  # rank 0 speaks for all
    micro, accum = split_batch(G, cfg["batch_per_gpu"], world)
    train_set = make_dataset(cfg, "TRAIN")  # every latent's shape is read here, before step 1
    if len(train_set) < G:
        raise data.DataError(f"{len(train_set)} training items in {', '.join(cfg['data'])}: "
                             f"fewer than one global batch ({G})")
    net, ema, opt, params = build_model(cfg, device)
    step = resume(cfg, net, ema, opt, scaler, log)
    if master:
        prepare_run_folder(cfg, step)
    example = preview_example(cfg, train_set, device) if master and cfg["preview_every"] else None
    # DDP averages the gradients on the last micro-step; torch.compile is optional. Checkpoints
    # save `net` itself, so its keys carry neither "module." nor "_orig_mod.".
    ddp_net = DDP(net, device_ids=[device] if device.type == "cuda" else None,
                  gradient_as_bucket_view=True) if ddp else None
    train_net = torch.compile(ddp_net or net) if cfg["compile"] else ddp_net or net
    batches = global_batches(train_set, cfg, rank, world, micro, step, device.type == "cuda")
    epoch_steps = len(train_set) // G
    log(f"{cfg['model']} '{cfg['preset']}': {model.count_parameters(net):,} parameters, "
        f"{sum(p.numel() for p in params):,} trained; {len(train_set)} items, {epoch_steps} steps"
        f" per epoch; batch {G} = {world} processes x {accum} accumulation x {micro}; {device}, "
        f"{precision}")
    # (loss, grad norm) of the steps since the last log, seconds waiting for data and training
    since, data_s, t0, train_s = [], 0.0, time.time(), 0.0  # (checkpoints, previews apart)
    with tqdm(total=cfg["max_steps"], initial=step, disable=not master, dynamic_ncols=True) as bar:
        while step < cfg["max_steps"]:
            # Load this step's micro-batches and count the frames each one's loss is a mean over:
            # an LVDM batch's real ones, VAE frames; and those of the global batch.
            tic, micro_batches = time.time(), next(batches)
            data_s += time.time() - tic
            counts = [int(b["n_real"].sum()) if isinstance(b, dict) else len(b)
                      for b in micro_batches]
            total = torch.tensor(sum(counts), device=device)
            if ddp:
                dist.all_reduce(total)

            # Forward and backward. Each micro-batch's loss (a mean over its frames) is weighted
            # by its share of the global batch's frames, times the process count that DDP's
            # average divides out: the gradient is that of the mean over all frames of the
            # global batch, however it is split. Each clip draws its noise, t and EF dropout
            # from its own generator, seeded (seed, step, its place in the global batch).
            loss_sum = torch.zeros((), device=device)
            for j, batch in enumerate(micro_batches):
                first = rank * (G // world) + j * micro
                gens = [data.item_generator(cfg["seed"], step, first + i) for i in range(micro)]
                with ddp_net.no_sync() if ddp and j < accum - 1 else nullcontext():
                    loss = loss_of(train_net, batch, gens, cfg, amp, device)
                    share = counts[j] / int(total)
                    scaler.scale(loss * (share * world)).backward()
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
            scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"]).item()
            if not np.isfinite(grad_norm) and not scaler.is_enabled():  # fp16: the scaler skips
                raise TrainingError(f"gradient norm is {grad_norm} at step {step + 1} (loss "
                                    f"{loss:.4g}): stopped before the optimizer step")
            lr = cfg["lr"] * min(1.0, (step + 1) / cfg["warmup"]) if cfg["warmup"] else cfg["lr"]
            for group in opt.param_groups:
                group["lr"] = lr
            scaler.step(opt)  # opt.step(), unless an fp16 gradient overflowed
            scaler.update()
            opt.zero_grad(set_to_none=True)

            step += 1  # the EMA: diffusers' EMAModel warm-up, capped at ema_decay
            diffusion.ema_update(ema, net, step, cfg["ema_decay"])

            # Log: loss and grad norm averaged over processes and steps, lr, clips per second.
            since.append((loss, grad_norm))
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            if master and (step % cfg["log_every"] == 0 or step == cfg["max_steps"]):
                seconds, (mean_loss, mean_norm) = time.time() - t0, np.mean(since, axis=0).tolist()
                train_s += seconds
                with open(os.path.join(out, "log.jsonl"), "a") as f:
                    print(json.dumps({"step": step, "epoch": (step - 1) // epoch_steps, "lr": lr,
                                      "loss": mean_loss, "grad_norm": mean_norm, "clips_per_s":
                                      len(since) * G / seconds, "data_wait": data_s / seconds,
                                      "train_s": train_s}), file=f)
                since, data_s, t0 = [], 0.0, time.time()

            # Checkpoint (rank 0 writes, the others wait) and preview; neither counts in clips/s.
            pause = time.time()
            if step % cfg["checkpoint_every"] == 0 or step == cfg["max_steps"]:
                if master:
                    save_checkpoint(cfg, step, net, ema, opt, scaler, {
                        "step": step, "epoch": step // epoch_steps, "batch": step % epoch_steps,
                        "world_size": world})
                if ddp:
                    dist.barrier()
            if example and step % cfg["preview_every"] == 0:
                preview(ema, os.path.join(out, "previews", f"step-{step}"), *example, cfg, amp,
                        device)
            t0 += time.time() - pause
    log(f"done: {step} steps in {out}")

def main(argv=None):
    rank = int(os.environ.get("RANK", 0))
    try:
        cfg, dry_run = resolve_config(argv)
        if dry_run:
            print(json.dumps(cfg, indent=2)) if rank == 0 else None
        else:
            with data.locked(cfg["out"], "--out") if rank == 0 else nullcontext():
                train(cfg)
    except (TrainingError, model.ModelLoadError, OSError) as e:
        # One line, no traceback; a DataLoader worker's error from whichever process met it.
        if rank == 0 or "Original Traceback" in str(e):
            print(f"error: {data.error_line(e)}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

if __name__ == "__main__":
    main()
