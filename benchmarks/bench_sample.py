"""Sampling speed, ours against the original's loop, on the same model in one process.

    python benchmarks/bench_sample.py                      # small presets, 2 videos x 96 frames
    python benchmarks/bench_sample.py --preset lvdm --frames 192 --steps 64 --device cuda

Reference: EchoNet-Synthetic's echosyn/lvdm/sample.py rebuilt with diffusers 0.42.1: [B, C, F, H,
W] latents re-padded and re-laid out at every step, windows stacked window-major, one
UNetSpatioTemporalConditionModel call per step, DDPMScheduler.step on the global RNG, then
AutoencoderKL decode in chunks of batch_size frames. Ours: diffusion.sample + data.decode.
Both get the same weights (random, perturbed). Timings alternate ours / reference and report the
median of --repeats; the ratio is ours / reference in videos per second (> 1: ours is faster).
On a CPU shared with other jobs, --threads 1 avoids OpenMP oversubscription (2-7x swings).
"""

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as nnf

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402
import diffusion  # noqa: E402
import model  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--preset", default="small", choices=sorted(model.UNET_PRESETS),
                    help="UNet preset (VAE: 'echonet' for lvdm, else the same name)")
parser.add_argument("--batch_size", type=int, default=2, help="videos per batch (default: 2)")
parser.add_argument("--frames", type=int, default=96, help="frames per video (default: 96)")
parser.add_argument("--window", type=int, default=64, help="window, overlap half (default: 64)")
parser.add_argument("--steps", type=int, default=2, help="DDPM steps (default: 2)")
parser.add_argument("--repeats", type=int, default=3, help="timed runs per side (default: 3)")
parser.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (default: torch's choice; 1 is steadier on a busy CPU)")
parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def reference(unet, vae, scheduler, cond, ef, frames, T, batch_size):
    """The original's loop and decode (diffusers modules, its layout and window order)."""
    B, C, H, W = cond.shape
    OT, TR = T // 2, (frames - T) // (T // 2) + 1
    latents = torch.randn(B, C, frames, H, W, device=cond.device)
    lvefs = ef[:, None, None].repeat(TR, 1, 1)  # window-major, matching the windows (see tests)
    added_time_ids = torch.zeros(B * TR, 1, device=cond.device)
    cond_frames = cond[:, :, None].repeat(1, 1, frames, 1, 1)
    for t in scheduler.timesteps:
        x = torch.cat([scheduler.scale_model_input(latents, t), cond_frames], dim=1)
        pad = (8 - x.shape[-1] % 8) // 2
        x = nnf.pad(x, (pad, pad, pad, pad, 0, 0), mode="replicate").permute(0, 2, 1, 3, 4)
        inputs = torch.cat([x[:, r * (T - OT):r * (T - OT) + T] for r in range(TR)], dim=0)
        pred = unet(inputs, t, encoder_hidden_states=lvefs, added_time_ids=added_time_ids).sample
        outputs = torch.chunk(pred, TR, dim=0)
        pred = torch.cat([o if r == 0 else o[:, OT:] for r, o in enumerate(outputs)], dim=1)
        pred = pred.permute(0, 2, 1, 3, 4)[..., pad:-pad, pad:-pad]
        latents = scheduler.step(pred, t, latents).prev_sample
    yield  # denoising done; decoding follows
    z = latents.permute(0, 2, 1, 3, 4).flatten(0, 1) / vae.config.scaling_factor
    video = torch.cat([vae.decode(c).sample for c in torch.split(z, batch_size)])
    yield ((video + 1) * 128).clamp(0, 255).to(torch.uint8)


def ours(unet, vae, scheduler, cond, ef, frames, T, batch_size):
    gens = [data.item_generator(0, i) for i in range(len(cond))]
    latents = diffusion.sample(unet, scheduler, cond, ef, gens, frames, T, T // 2)
    yield  # denoising done; decoding follows
    yield data.decode(vae, latents)


def main():
    import diffusers

    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    unet_config = dataclasses.asdict(model.UNET_PRESETS[args.preset])
    vae_config = dataclasses.asdict(model.VAE_PRESETS["echonet" if args.preset == "lvdm"
                                                      else args.preset])
    torch.manual_seed(0)
    ref_unet = diffusers.UNetSpatioTemporalConditionModel(**unet_config)
    ref_vae = diffusers.AutoencoderKL(**vae_config)
    with torch.no_grad():
        for p in [*ref_unet.parameters(), *ref_vae.parameters()]:
            p.add_(torch.randn_like(p) * 0.02)
    with tempfile.TemporaryDirectory() as tmp:
        ref_unet.save_pretrained(f"{tmp}/unet"), ref_vae.save_pretrained(f"{tmp}/vae")
        our_unet, our_vae = model.load_model(f"{tmp}/unet"), model.load_model(f"{tmp}/vae")
    sides = {"ours": (ours, our_unet, our_vae, torch.inference_mode),
             "reference": (reference, ref_unet, ref_vae, torch.no_grad)}
    for _, unet, vae, _ in sides.values():
        unet.to(dev).eval().requires_grad_(False), vae.to(dev).eval().requires_grad_(False)
    frames = diffusion.round_frames(args.frames, args.window // 2)
    cond = torch.randn(args.batch_size, 4, 14, 14, device=dev)
    ef = torch.linspace(0.2, 0.8, args.batch_size, device=dev)
    scheduler = {"ours": diffusion.DDPM(),
                 "reference": diffusers.DDPMScheduler(
                     beta_schedule="linear", clip_sample_range=4.0,
                     prediction_type="v_prediction", timestep_spacing="leading")}
    for s in scheduler.values():
        s.set_timesteps(args.steps)

    times = {name: {"denoise": [], "decode": []} for name in sides}
    for r in range(args.repeats):  # alternating order; the median drops the cold first run
        for name in (sides if r % 2 else reversed(sides)):
            fn, unet, vae, mode = sides[name]
            with mode():
                steps = fn(unet, vae, scheduler[name], cond, ef, frames, args.window,
                           args.batch_size)
                for phase in ("denoise", "decode"):
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    next(steps)
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    times[name][phase].append(time.perf_counter() - start)

    print("command:", " ".join([os.path.basename(sys.executable), *sys.argv]))
    print(f"device {dev}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"preset {args.preset}, {args.batch_size} videos x {frames} frames "
          f"({len(diffusion.window_starts(frames, args.window, args.window // 2))} windows of "
          f"{args.window}), {args.steps} DDPM steps + decode, median of {args.repeats}")
    rate = {}
    for name, phases in times.items():
        total = [a + b for a, b in zip(phases["denoise"], phases["decode"])]
        rate[name] = args.batch_size / statistics.median(total)
        split = ", ".join(f"{p} {statistics.median(ts):.1f} s" for p, ts in phases.items())
        print(f"  {name:9s} {rate[name]:.4f} videos/s  (median {split}; totals "
              + ", ".join(f"{t:.1f}" for t in total) + " s)")
    for phase in ("denoise", "decode"):
        ratio = statistics.median(times["reference"][phase]) / statistics.median(
            times["ours"][phase])
        print(f"  {phase}: ours {ratio:.2f}x as fast")
    print(f"ratio ours / reference: {rate['ours'] / rate['reference']:.2f}x videos/s")


if __name__ == "__main__":
    main()
