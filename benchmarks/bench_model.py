"""Speed and memory of our UNet against diffusers' UNetSpatioTemporalConditionModel.

Both hold the same weights (a folder written by diffusers, loaded with model.load_model) and see
the same inputs; runs alternate between the two in one process and the median is reported, with
the spread of the per-pair speed-ups (diffusers' time / ours, each pair of neighbouring runs):
on a shared machine the load drifts, and a pair sees about the same load.

    python benchmarks/bench_model.py                  # paper config, 1 x 8 and 1 x 16 frames, 16x16
    python benchmarks/bench_model.py --frames 16 --threads 1
    python benchmarks/bench_model.py --preset small --frames 32 --batch 2
    python benchmarks/bench_model.py --device cuda --dtype bf16 --batch 4 --frames 64  # GPU

Memory: the activations autograd saves for the backward pass (distinct storages, weights
excluded), which is what grows with batch and frames in training; on CUDA also the peak of
torch.cuda.max_memory_allocated over one forward + backward.

On CPU the process CPU time (less sensitive to a busy host than wall time; with --threads 1 it
counts no time spent spinning at thread barriers) and the minor page faults per call are reported
too: fresh activation memory costs a fault per 4 KiB page, so a model that allocates less also
waits less on the kernel.
"""

import argparse
import contextlib
import dataclasses
import gc
import os
import resource
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import model as M  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--preset", default="lvdm", choices=sorted(M.UNET_PRESETS))
parser.add_argument("--batch", type=int, default=1, help="videos per call")
parser.add_argument("--frames", type=int, nargs="+", default=[8, 16],
                    help="frames per video; each count is measured in turn")
parser.add_argument("--size", type=int, default=16, help="latent height and width (16 = padded 14)")
parser.add_argument("--repeats", type=int, default=5, help="timed runs per implementation")
parser.add_argument("--device", default="cpu")
parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                    help="autocast dtype on GPU (weights stay fp32)")
parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
parser.add_argument("--forward", action="store_true", help="also time the forward pass alone")
args = parser.parse_args()


def sync():
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def saved_for_backward(net, forward):
    """Bytes of the distinct storages autograd keeps for the backward pass of one forward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward(net)
    del out
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params)


def cuda_peak(net, fn):
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(net)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def spread(times):
    """'(pairs a-b)': the lowest and highest speed-up over the pairs of neighbouring runs."""
    pairs = [d / o for d, o in zip(times["diffusers"], times["ours"])]
    return f"(pairs {min(pairs):.2f}-{max(pairs):.2f})"


def measure(nets, config, Fr):
    """Forward + backward (and the forward alone): the two models in turn, medians printed."""
    B, S = args.batch, args.size
    x = torch.randn(B, Fr, config.in_channels, S, S, device=args.device)
    t = torch.randint(0, 1000, (B,), device=args.device)
    ehs = torch.rand(B, 1, 1, device=args.device)
    ids = torch.zeros(B, 1, device=args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
    amp = (torch.autocast(args.device.split(":")[0], dtype=dtype) if dtype
           else contextlib.nullcontext())

    def forward(net):
        with amp:
            out = net(x, t, ehs, ids)
        return out.sample if hasattr(out, "sample") else out

    def fwd(net):
        with torch.no_grad():
            forward(net)

    def fwd_bwd(net):
        forward(net).float().square().mean().backward()
        net.zero_grad(set_to_none=True)

    print(f"input {list(x.shape)} (batch x frames x channels x height x width)")
    modes = [("forward", fwd)] * args.forward + [("forward+backward", fwd_bwd)]
    for mode, fn in modes:
        wall, cpu, faults = ({name: [] for name in nets} for _ in range(3))
        for net in nets.values():  # warm-up
            fn(net)
        for r in range(args.repeats):
            order = list(nets) if r % 2 == 0 else list(nets)[::-1]
            for name in order:
                sync()
                start, start_cpu = time.perf_counter(), time.process_time()
                start_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                fn(nets[name])
                sync()
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                                    - start_faults)
        med = {name: statistics.median(ts) for name, ts in wall.items()}
        print(f"{mode:17s} diffusers {med['diffusers']:.3f} s   ours {med['ours']:.3f} s   "
              f"ours/diffusers {med['ours'] / med['diffusers']:.3f}   "
              f"speed-up {med['diffusers'] / med['ours']:.2f}x {spread(wall)}")
        if args.device == "cpu":
            c = {name: statistics.median(ts) for name, ts in cpu.items()}
            f = {name: statistics.median(ts) for name, ts in faults.items()}
            print(f"{'':17s} CPU time: diffusers {c['diffusers']:.3f} s   ours {c['ours']:.3f} s   "
                  f"speed-up {c['diffusers'] / c['ours']:.2f}x {spread(cpu)}   page faults per "
                  f"call: diffusers {f['diffusers']:.0f}   ours {f['ours']:.0f}")
    saved = {name: saved_for_backward(net, forward) for name, net in nets.items()}
    print(f"activations saved for backward: diffusers {saved['diffusers'] / 2**20:.0f} MiB   "
          f"ours {saved['ours'] / 2**20:.0f} MiB   "
          f"ours/diffusers {saved['ours'] / saved['diffusers']:.3f}")
    if args.device.startswith("cuda"):
        peak = {name: cuda_peak(net, fwd_bwd) for name, net in nets.items()}
        print(f"CUDA peak of forward+backward: diffusers {peak['diffusers'] / 2**20:.0f} MiB   "
              f"ours {peak['ours'] / 2**20:.0f} MiB")


def main():
    from diffusers import UNetSpatioTemporalConditionModel

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = M.UNET_PRESETS[args.preset]
    ref = UNetSpatioTemporalConditionModel(**dataclasses.asdict(config))
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        ours = M.load_model(d)
    ours.train()
    ref.train()
    nets = {"diffusers": ref.to(args.device), "ours": ours.to(args.device)}
    print(f"UNet preset {args.preset}, {args.device}, {args.dtype}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"command: python benchmarks/bench_model.py {' '.join(sys.argv[1:])}")
    for frames in args.frames:
        measure(nets, config, frames)


if __name__ == "__main__":
    main()
