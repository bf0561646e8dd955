"""Training speed: the data loader against the training step, and our training step against the
same loop built on diffusers' UNetSpatioTemporalConditionModel (the original's network).

    python benchmarks/bench_train.py                                  # small UNet, 16 frames, CPU
    python benchmarks/bench_train.py --preset lvdm --frames 64 --batch 16 --device cuda --amp bf16

The step is train.py's: diffusion.lvdm_loss (offset noise, v target, padded 16x16 UNet call,
masked MSE), backward, clipping, AdamW, EMA update. Only the network differs: ours, or
diffusers' with the same config and weights (its output's `.sample` taken). Both freeze the
same one-token cross-attention parameters. Steps alternate between the two so that both see
the same machine load; the minimum over steps is the least disturbed figure, the median is
printed too.
The loader reads random latents written to a temporary folder ([120, 4, 14, 14] at 50 fps, as
EchoNet-Dynamic's ~2.4 s videos) through LatentVideoDataset and train.py's global_batches.
"""

import argparse
import copy
import csv
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import diffusion  # noqa: E402
import model  # noqa: E402
import train  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--preset", default="small", help="UNet preset (default: %(default)s)")
parser.add_argument("--frames", type=int, default=16, help="frames per clip (default: 16)")
parser.add_argument("--batch", type=int, default=1, help="clips per step (default: 1)")
parser.add_argument("--steps", type=int, default=5, help="timed steps per network (default: 5)")
parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: 1)")
parser.add_argument("--workers", type=int, default=2, help="loader workers (default: 2)")
parser.add_argument("--videos", type=int, default=64, help="videos in the loader's dataset")
parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"],
                    help="autocast dtype on CUDA (default: none)")
parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's)")


class Reference(torch.nn.Module):
    """diffusers' UNet behind our call: unet(sample, t, ef, ids) -> tensor."""

    def __init__(self, config, state):
        super().__init__()
        import diffusers

        kw = {k: v for k, v in model.config_to_dict(model.UNetSpatioTemporal(config)).items()
              if not k.startswith("_")}
        self.unet = diffusers.UNetSpatioTemporalConditionModel(**kw)
        self.unet.load_state_dict(state)

    def forward(self, sample, t, ef, ids):
        return self.unet(sample, t, encoder_hidden_states=ef, added_time_ids=ids).sample


def loader_speed(args):
    """Clips per second out of the DataLoader (after its first batch)."""
    with tempfile.TemporaryDirectory() as root:
        os.makedirs(os.path.join(root, "Latents"))
        rows = []
        for i in range(args.videos):
            torch.save(torch.randn(120, 4, 14, 14), os.path.join(root, "Latents", f"v{i}.pt"))
            rows.append({"FileName": f"v{i}", "EF": 55, "FPS": 50, "NumberOfFrames": 120,
                         "Split": "TRAIN"})
        with open(os.path.join(root, "FileList.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        dataset = data.LatentVideoDataset(root, "TRAIN", frames=args.frames, fps=32)
        cfg = {"batch_size": args.batch, "seed": 0, "workers": args.workers}
        clips, start = 0, None
        for (batch,) in train.global_batches(dataset, cfg, 0, 1, args.batch, 0, False):
            if start is None:
                start = time.perf_counter()  # workers started and warmed up
                continue
            clips += len(batch["latents"])
            if clips >= 400:
                return clips / (time.perf_counter() - start)


def make_step(net, args, device, amp):
    """One training step of train.py on a fixed random batch; returns a function -> seconds."""
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    ema = copy.deepcopy(net).float().eval().requires_grad_(False)
    scheduler = diffusion.DDPM()
    B = args.batch
    x0, cond = torch.randn(B, args.frames, 4, 14, 14, device=device), torch.randn(B, 4, 14, 14,
                                                                                 device=device)
    ef, n_real = torch.rand(B, device=device), torch.full((B,), args.frames, device=device)
    state = {"step": 0}

    def step():
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        tic = time.perf_counter()
        gens = [data.item_generator(0, state["step"], i) for i in range(B)]
        loss = diffusion.lvdm_loss(net, scheduler, x0, cond, ef, n_real, gens, amp=amp)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        diffusion.ema_update(ema, net, state["step"])
        sync()
        return time.perf_counter() - tic

    return step


def main():
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = (torch.autocast("cuda", dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[args.amp])
           if args.amp != "none" else nullcontext())
    print("command: python benchmarks/bench_train.py " + " ".join(sys.argv[1:]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {device}; "
          f"UNet '{args.preset}', {args.frames} frames, batch {args.batch}, amp {args.amp}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    torch.manual_seed(0)
    ours = model.UNetSpatioTemporal(model.UNET_PRESETS[args.preset])
    ref = Reference(ours.config, ours.state_dict())
    frozen = {n for n, p in ours.named_parameters()
              if any(p is q for q in ours.unused_with_one_token())}
    for net in (ours, ref.unet):
        for name, p in net.named_parameters():
            p.requires_grad_(name not in frozen)
    steps = {"ours": make_step(ours.to(device).train(), args, device, amp),
             "diffusers": make_step(ref.to(device).train(), args, device, amp)}
    times = {k: [] for k in steps}
    for i in range(args.warmup + args.steps):
        for name, step in steps.items():  # alternate, so both see the same machine load
            seconds = step()
            if i >= args.warmup:
                times[name].append(seconds)
    for stat in (min, statistics.median):
        t_ours, t_ref = (stat(times[k]) for k in ("ours", "diffusers"))
        print(f"training step, {stat.__name__} of {args.steps}: ours {t_ours:.3f} s, diffusers "
              f"{t_ref:.3f} s, ratio ours/diffusers {t_ours / t_ref:.3f}")
    t_ours = min(times["ours"])
    consumed = args.batch / t_ours
    loaded = loader_speed(args)
    print(f"data loader ({args.workers} workers): {loaded:.1f} clips/s; the training step "
          f"consumes {consumed:.2f} clips/s; loader / step = {loaded / consumed:.1f}x")


if __name__ == "__main__":
    main()
