"""The GPU check: every GPU path of the project measured in one command, in at most 8 minutes.

    python benchmarks/gpu_check.py                        # one CUDA GPU; prints the table and
                                                          # writes gpu_check.json
    python benchmarks/gpu_check.py --only compile,sample  # some groups again (names below)
    python benchmarks/gpu_check.py --smoke                # the same code on the CPU with
                                                          # tiny presets (tests/test_scale.py)

What it measures, group by group (run in this order; `--only` takes the group names):
  parity_unet, parity_vae  max |ours - diffusers| of the UNet and VAE outputs in fp32, bf16 and
                           fp16 autocast, same weights (written by diffusers, read with
                           model.load_model) and inputs, TF32 off; the note gives how far
                           diffusers' own autocast output lies from its fp32 output, for scale
  sdpa                     which scaled_dot_product_attention kernel our UNet (bf16) and VAE
                           (fp32, as sample.py decodes) run, from the profiler's aten op names,
                           and which backends run the UNet when allowed alone (sdpa_kernel)
  train_bf16, train_fp16   forward + backward, and the whole training step, against the same
                           loop on diffusers' UNetSpatioTemporalConditionModel, at the paper
                           configuration (batch 4 x 64 frames of 4 x 16 x 16): speed-up =
                           diffusers' median seconds / ours
  memory                   peak CUDA memory of one training step (bf16), with and without
                           gradient checkpointing, ours and diffusers'
  sample_ddpm, sample_ddim seconds per 64- and per 192-frame video with diffusion.sample, batch 8,
                           bf16: DDPM 64 steps, DDIM 16 steps
  decode                   VAE decode seconds per video (fp32 as sample.py decodes, and bf16)
  inception, i3d           evaluate.py's detectors (random weights), TF32 off as the metrics run
  compile                  the training group again with torch.compile on both sides: compile
                           seconds, graph breaks and speed-ups

The training step is written here (train.py's is being reworked; this one must not move with it):
the v-prediction MSE (Salimans & Ho 2022) of a random batch at random t, AdamW (1e-4, 0.9/0.999,
1e-2), gradient clipping at 1.0, EMA (diffusion.ema_update), for fp16 a GradScaler; the one-token
cross-attention parameters train.py freezes are frozen on both sides. TF32 is on for training
and sampling (train.py's default), off for parity and metrics.

Every group is guarded: an error fills its rows with the error's one line and the rest runs. A
time budget (--budget, 480 s) covers the whole run: a group starts only if its usual need fits,
stops when its share runs out (SIGALRM), and its rows say so; sampling times fewer steps and
scales up when the full count would not fit (the note says so). The JSON is rewritten after every
group, so a killed run leaves what it measured. A measurement, not a test: nothing asserts on
time. `--smoke` runs every group on the CPU with the tiny presets (fp16 runs as fp32 there, the
GradScaler stays on; torch.compile uses the 'eager' backend), so the script keeps working
between the rare runs on a GPU.
"""

import argparse
import contextlib
import copy
import dataclasses
import functools
import gc
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import warnings

START = time.perf_counter()  # the budget counts from here, torch's import included
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import diffusion  # noqa: E402
import model  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--smoke", action="store_true", help="CPU, tiny presets (what CI runs)")
parser.add_argument("--out", default="gpu_check.json", help="JSON file written after each group")
parser.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run (default: 480 on GPU, 900 with --smoke)")
parser.add_argument("--only", default="", help="comma-separated group names (default: all)")

# --- settings ----------------------------------------------------------------------------------

GPU = dict(  # the paper configuration (EchoNet-Synthetic's LVDM) on one CUDA GPU
    device="cuda", unet="lvdm", vae="echonet", budget=480.0,
    batch=4, frames=64, size=16,             # training: 4 clips x 64 frames of 8 x 16 x 16 in
    parity=(2, 16), vae_images=8,            # parity: 2 clips x 16 frames; 8 VAE images
    steps=10, warmup=3,                      # timed and untimed repeats per side
    sample_batch=8, window=64, stride=32, short=64, long=192, ddpm=64, ddim=16,
    decode_videos=2, decode_chunk=128,       # VAE decode: 2 videos, 128 frames per call
    inception_batch=128, i3d=((16, 16), (128, 2)),   # (frames, clips per call) short, long
    backend="inductor")
SMOKE = dict(  # the same code on the CPU with the tiny presets, about a minute on 2 cores
    device="cpu", unet="tiny", vae="tiny", budget=900.0,
    batch=1, frames=4, size=16, parity=(1, 4), vae_images=1, steps=1, warmup=0,
    sample_batch=1, window=4, stride=2, short=4, long=8, ddpm=2, ddim=2,
    decode_videos=1, decode_chunk=4, inception_batch=1, i3d=((10, 1), (16, 1)),
    backend="eager")

# One row per figure: (key, group, label, unit). Labels are formatted with the settings.
ROWS = [
    ("unet_fp32", "parity_unet", "UNet fp32, max |ours - diffusers|", ""),
    ("unet_bf16", "parity_unet", "UNet bf16 autocast, max |ours - diffusers|", ""),
    ("unet_fp16", "parity_unet", "UNet fp16 autocast, max |ours - diffusers|", ""),
    ("vae_fp32", "parity_vae", "VAE fp32, max |ours - diffusers|", ""),
    ("vae_bf16", "parity_vae", "VAE bf16 autocast, max |ours - diffusers|", ""),
    ("vae_fp16", "parity_vae", "VAE fp16 autocast, max |ours - diffusers|", ""),
    ("sdpa_unet", "sdpa", "SDPA kernel run by our UNet (bf16)", "calls"),
    ("sdpa_vae", "sdpa", "SDPA kernel run by our VAE decode (fp32)", "calls"),
    ("sdpa_alone", "sdpa", "SDPA backends that run our UNet alone (bf16)", ""),
    ("fwd_bwd", "train_bf16", "forward+backward bf16, {batch} x {frames} frames", "x diffusers"),
    ("step_bf16", "train_bf16", "training step bf16, {batch} x {frames} frames", "x diffusers"),
    ("step_fp16", "train_fp16", "training step fp16 + GradScaler", "x diffusers"),
    ("mem_ours", "memory", "peak memory, training step, ours", "MiB"),
    ("mem_ours_ckpt", "memory", "peak memory, ours, gradient checkpointing", "MiB"),
    ("mem_ref", "memory", "peak memory, training step, diffusers", "MiB"),
    ("mem_ref_ckpt", "memory", "peak memory, diffusers, gradient checkpointing", "MiB"),
    ("ddpm_short", "sample_ddpm", "sampling, DDPM {ddpm} steps, {short} frames", "s/video"),
    ("ddpm_long", "sample_ddpm", "sampling, DDPM {ddpm} steps, {long} frames", "s/video"),
    ("ddim_short", "sample_ddim", "sampling, DDIM {ddim} steps, {short} frames", "s/video"),
    ("ddim_long", "sample_ddim", "sampling, DDIM {ddim} steps, {long} frames", "s/video"),
    ("decode_short", "decode", "VAE decode fp32, {short} frames", "s/video"),
    ("decode_long", "decode", "VAE decode fp32, {long} frames", "s/video"),
    ("decode_long_bf16", "decode", "VAE decode bf16, {long} frames", "s/video"),
    ("inception", "inception", "Inception-v3 features, 112 -> 299", "frames/s"),
    ("i3d_short", "i3d", "I3D logits, {i3d[0][0]}-frame clips", "clips/s"),
    ("i3d_long", "i3d", "I3D logits, {i3d[1][0]}-frame clips", "clips/s"),
    ("compile_fwd_bwd", "compile", "torch.compile forward+backward bf16", "x diffusers"),
    ("compile_step", "compile", "torch.compile training step bf16", "x diffusers"),
]
# Seconds a group usually needs on one H100-class GPU (it is skipped when less is left) and the
# most it may take (None: whatever is left); compile comes last and takes the rest.
NEED = {"parity_unet": (30, 90), "parity_vae": (15, 60), "sdpa": (10, 45),
        "train_bf16": (30, 90), "train_fp16": (20, 60), "memory": (20, 90),
        "sample_ddpm": (40, 120), "sample_ddim": (15, 60), "decode": (10, 60),
        "inception": (5, 45), "i3d": (10, 60), "compile": (90, None)}


# --- bookkeeping: rows, budget, guards ---------------------------------------------------------

class OutOfTime(BaseException):
    """Raised by SIGALRM when a group's share of the budget is spent. A BaseException, so that
    no `except Exception` inside torch (dynamo's fallbacks) swallows it."""


class Check:
    """The run's settings, device, deadline and rows; `record` fills a row and prints it."""

    def __init__(self, cfg, args):
        self.cfg, self.args, self.start = cfg, args, START
        self.device = torch.device(cfg["device"])
        self.cuda = self.device.type == "cuda"
        self.end = self.start + (args.budget or cfg["budget"]) - 5  # 5 s to write the table
        self.group_end = self.end
        self.seconds = {}  # group -> wall seconds it took
        self.rows = {key: {"key": key, "group": group, "label": label.format(**cfg),
                           "unit": unit, "value": None, "status": "not run", "note": ""}
                     for key, group, label, unit in ROWS}

    def left(self, group=False):
        return (self.group_end if group else self.end) - time.perf_counter()

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def record(self, key, value, note="", status="ok"):
        row = self.rows[key]
        row.update(value=value, note=note, status=status)
        print(format_row(row), flush=True)


def format_row(row):
    v = row["value"]
    text = (f"{v:.4g}" if isinstance(v, float) else str(v)) if v is not None else row["status"]
    return f"{row['label']:<48s} {text:>14s} {row['unit']:<11s} {row['note']}"


def one_line(e):
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def run_group(ck, name, fn):
    """fn(ck) under the budget: skipped if its usual need does not fit, stopped by SIGALRM at its
    share; an exception or the alarm marks the group's unfilled rows and the run goes on."""
    need, cap = NEED[name] if not ck.args.smoke else (0, None)
    left = ck.left()
    rows = [r for r in ck.rows.values() if r["group"] == name]
    if left < need:
        for r in rows:
            ck.record(r["key"], None, f"skipped: {left:.0f} s of the budget left, this group "
                      f"needs ~{need} s", "skipped")
        return
    share = left if cap is None else min(left, cap)
    ck.group_end = time.perf_counter() + share
    start = time.perf_counter()

    def alarm(signum, frame):
        raise OutOfTime()

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, share)
    try:
        fn(ck)
        failure = None
    except OutOfTime:
        failure = ("skipped", f"skipped: out of time after {time.perf_counter() - start:.0f} s "
                   f"(this group's share of the budget: {share:.0f} s)")
    except Exception as e:  # noqa: BLE001 - the table shows it, the other groups still run
        failure = ("error", f"error: {one_line(e)}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        ck.group_end = ck.end
    for r in rows:
        if failure and r["status"] == "not run":
            ck.record(r["key"], None, failure[1], failure[0])
    torch._dynamo.reset()
    gc.collect()
    if ck.cuda:
        torch.cuda.empty_cache()


def write_json(ck, path):
    """The rows and the run's facts; written to a temporary name, then renamed."""
    facts = {"command": " ".join(["python", *sys.argv]), "smoke": ck.args.smoke,
             "device": (torch.cuda.get_device_name() if ck.cuda
                        else platform.processor() or platform.machine()),
             "torch": torch.__version__, "cuda": torch.version.cuda,
             "elapsed_s": round(time.perf_counter() - ck.start, 1),
             "budget_s": ck.args.budget or ck.cfg["budget"], "group_seconds": ck.seconds,
             "settings": ck.cfg,
             "rows": list(ck.rows.values())}
    try:
        import diffusers
        facts["diffusers"] = diffusers.__version__
    except ImportError:
        facts["diffusers"] = None
    with open(path + ".tmp", "w") as f:
        json.dump(facts, f, indent=1)
    os.replace(path + ".tmp", path)


# --- models: ours and diffusers' with the same weights ------------------------------------------

def numerics(tf32, deterministic=False):
    """TF32 matmuls and convolutions on CUDA: on in training and sampling (train.py's default),
    off in parity checks and metrics, which must match the reference; the metrics also run cuDNN
    deterministically (evaluate.py's settings)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, deterministic


def amp_for(device, precision):
    """A factory of the autocast context for 'fp32', 'bf16' or 'fp16' (fp16 runs as fp32 on
    the CPU, where fp16 kernels are slow emulations and no training uses them)."""
    if precision == "fp32" or (precision == "fp16" and device.type != "cuda"):
        return contextlib.nullcontext
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return functools.partial(torch.autocast, device.type, dtype=dtype)


def cpu_fp16(ck, precision):
    return "; CPU: fp32 for fp16" if precision == "fp16" and not ck.cuda else ""


def perturb(net):
    """Random weights everywhere: diffusers zero-initialises some output layers."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return net


@functools.cache
def models(kind, preset):
    """(ours, diffusers') on the CPU for 'unet' or 'vae': diffusers' module with random weights,
    saved as a model folder and read back with model.load_model (the published weights' path)."""
    import diffusers

    torch.manual_seed(0)
    if kind == "unet":
        config = dataclasses.asdict(model.UNET_PRESETS[preset])
        ref = diffusers.UNetSpatioTemporalConditionModel(**config)
    else:
        ref = diffusers.AutoencoderKL(**dataclasses.asdict(model.VAE_PRESETS[preset]))
    perturb(ref)
    with tempfile.TemporaryDirectory() as folder:
        ref.save_pretrained(folder)
        ours = model.load_model(folder)
    return ours, ref


class Reference(torch.nn.Module):
    """diffusers' UNet behind our call: net(sample, t, ef, ids) -> tensor."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, t, ef, ids):
        return self.unet(sample, t, encoder_hidden_states=ef, added_time_ids=ids).sample


def unet_pair(ck, checkpointing=False, sides=("ours", "diffusers")):
    """{"ours", "diffusers"} (or the sides asked for): copies on the device, in training mode,
    with the one-token cross-attention parameters frozen on both sides (as train.py does)."""
    ours, ref = models("unet", ck.cfg["unet"])
    frozen = {id(p) for p in ours.unused_with_one_token()}
    names = {n for n, p in ours.named_parameters() if id(p) in frozen}
    nets = {}
    for side in sides:
        net = copy.deepcopy(ours if side == "ours" else ref)
        for n, p in net.named_parameters():
            p.requires_grad_(n not in names)
        if checkpointing and side == "ours":
            net.set_gradient_checkpointing(True)
        elif checkpointing:
            net.enable_gradient_checkpointing()
        nets[side] = (net if side == "ours" else Reference(net)).to(ck.device).train()
    return nets


# --- the training step (train.py's kind, written out here) --------------------------------------

def train_batch(ck):
    """A fixed random batch at the training size: latents, conditioning frame, noise, t, EF."""
    c, g = ck.cfg, torch.Generator().manual_seed(0)
    B, Fr, S = c["batch"], c["frames"], c["size"]
    b = {"x0": torch.randn(B, Fr, 4, S, S, generator=g),
         "cond": torch.randn(B, 1, 4, S, S, generator=g).expand(B, Fr, 4, S, S),
         "noise": torch.randn(B, Fr, 4, S, S, generator=g),
         "t": torch.randint(0, 1000, (B,), generator=g), "ef": torch.rand(B, 1, 1, generator=g),
         "ids": torch.zeros(B, 1)}
    return {k: v.to(ck.device) for k, v in b.items()}


class Trainer:
    """One optimisation step: v-prediction MSE, backward (scaled for fp16), unscale, clip at
    1.0, AdamW, EMA update. With a `backend` the network runs under torch.compile."""

    def __init__(self, net, batch, device, precision, backend=None):
        self.module, self.batch = net, batch
        self.net = torch.compile(net, backend=backend) if backend else net
        self.amp = amp_for(device, precision)
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2)
        self.ema = copy.deepcopy(net).float().eval().requires_grad_(False)
        self.steps = 0
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.scheduler = diffusion.DDPM()

    def loss(self):
        # v = sqrt(a) eps - sqrt(1 - a) x0 at x_t = sqrt(a) x0 + sqrt(1 - a) eps (a = alpha_bar_t)
        b, s = self.batch, self.scheduler
        x_t = s.add_noise(b["x0"], b["noise"], b["t"])
        v = s.get_velocity(b["x0"], b["noise"], b["t"])
        with self.amp():
            out = self.net(torch.cat([x_t, b["cond"]], dim=2), b["t"], b["ef"], b["ids"])
        return F.mse_loss(out.float(), v)

    def forward_backward(self):
        self.loss().backward()
        self.opt.zero_grad(set_to_none=True)

    def step(self):
        self.scaler.scale(self.loss()).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.steps += 1
        diffusion.ema_update(self.ema, self.module, self.steps)


def race(ck, fns, repeats=None, warmup=None):
    """Median seconds of each fn() over alternating runs (the order flips every round, so both
    see the same machine), after untimed warm-up runs."""
    repeats = repeats or ck.cfg["steps"]
    warmup = ck.cfg["warmup"] if warmup is None else warmup
    times = {k: [] for k in fns}
    for i in range(warmup + repeats):
        for k in (list(fns) if i % 2 == 0 else list(fns)[::-1]):
            ck.sync()
            start = time.perf_counter()
            fns[k]()
            ck.sync()
            if i >= warmup:
                times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def speedup(ck, key, t, what):
    ck.record(key, t["diffusers"] / t["ours"], f"ours {t['ours']:.4f} s, diffusers "
              f"{t['diffusers']:.4f} s per {what} (median of {ck.cfg['steps']})")


# --- the groups ---------------------------------------------------------------------------------

@torch.no_grad()
def parity_unet(ck):
    numerics(tf32=False)
    ours, ref = (copy.deepcopy(m).to(ck.device).eval() for m in models("unet", ck.cfg["unet"]))
    B, Fr = ck.cfg["parity"]
    g = torch.Generator().manual_seed(2)
    args = [torch.randn(B, Fr, 8, 16, 16, generator=g), torch.randint(0, 1000, (B,), generator=g),
            torch.rand(B, 1, 1, generator=g), torch.zeros(B, 1)]
    args = [a.to(ck.device) for a in args]
    fp32 = ref(*args).sample
    for precision in ("fp32", "bf16", "fp16"):
        with amp_for(ck.device, precision)():
            a, b = ours(*args).float(), ref(*args).sample.float()
        ck.record(f"unet_{precision}", (a - b).abs().max().item(), f"diffusers' {precision} - "
                  f"fp32: {(b - fp32).abs().max().item():.3g}; input {list(args[0].shape)}"
                  + cpu_fp16(ck, precision))


@torch.no_grad()
def parity_vae(ck):
    numerics(tf32=False)
    ours, ref = (copy.deepcopy(m).to(ck.device).eval() for m in models("vae", ck.cfg["vae"]))
    n, g = ck.cfg["vae_images"], torch.Generator().manual_seed(3)
    x = (torch.rand(n, 3, 112, 112, generator=g) * 2 - 1).to(ck.device)
    z = torch.randn(n, 4, 14, 14, generator=g).to(ck.device)
    fp32 = ref.decode(z).sample
    for precision in ("fp32", "bf16", "fp16"):
        with amp_for(ck.device, precision)():
            dec = (ours.decode(z).float() - ref.decode(z).sample.float()).abs().max().item()
            enc = (ours.encode(x).mode().float()
                   - ref.encode(x).latent_dist.mode().float()).abs().max().item()
            own = (ref.decode(z).sample.float() - fp32).abs().max().item()
        ck.record(f"vae_{precision}", max(dec, enc), f"decode {dec:.3g}, encode {enc:.3g} "
                  f"({n} images); diffusers' {precision} decode - fp32: {own:.3g}"
                  + cpu_fp16(ck, precision))


SDPA_OPS = {  # aten op -> the backend scaled_dot_product_attention dispatched to
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "_scaled_dot_product_efficient_attention": "memory-efficient",
    "_scaled_dot_product_cudnn_attention": "cuDNN",
    "_scaled_dot_product_fused_attention_overrideable": "overrideable",
    "_scaled_dot_product_attention_math": "math"}


def sdpa_calls(fn):
    """'flash x24, math x2': the SDPA kernels fn() runs, from the profiler's aten op names."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    counts = {SDPA_OPS[e.key.removeprefix("aten::")]: e.count for e in prof.key_averages()
              if e.key.removeprefix("aten::") in SDPA_OPS}
    return ", ".join(f"{k} x{n}" for k, n in counts.items()) or "no SDPA call"


@torch.no_grad()
def sdpa(ck):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    numerics(tf32=True)
    unet = unet_pair(ck, sides=("ours",))["ours"].eval()
    vae = copy.deepcopy(models("vae", ck.cfg["vae"])[0]).to(ck.device).eval()
    b, amp = train_batch(ck), amp_for(ck.device, "bf16")

    def forward():
        with amp():
            unet(torch.cat([b["x0"], b["cond"]], dim=2), b["t"], b["ef"], b["ids"])

    shape = f"input {[b['x0'].shape[0], b['x0'].shape[1], 8, *b['x0'].shape[3:]]}"
    ck.record("sdpa_unet", sdpa_calls(forward), shape)
    z = torch.randn(ck.cfg["vae_images"], 4, 14, 14, device=ck.device)
    ck.record("sdpa_vae", sdpa_calls(lambda: vae.decode(z)), f"{len(z)} latents 4 x 14 x 14")
    runs, refused = [], []
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION),
                          ("memory-efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("cuDNN", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)):
        try:
            with sdpa_kernel(backend):
                forward()
            runs.append(name)
        except RuntimeError as e:  # "No available kernel" when the backend cannot take it
            refused.append(f"{name} ({one_line(e).split('. ')[0]})")
    ck.record("sdpa_alone", ", ".join(runs) or "none", "refused: " + "; ".join(refused)
              if refused else "all four run")


def train_group(ck, precision):
    numerics(tf32=True)
    batch = train_batch(ck)
    trainers = {k: Trainer(net, batch, ck.device, precision) for k, net in unet_pair(ck).items()}
    if precision == "bf16":
        t = race(ck, {k: tr.forward_backward for k, tr in trainers.items()})
        speedup(ck, "fwd_bwd", t, "forward+backward")
    t = race(ck, {k: tr.step for k, tr in trainers.items()})
    speedup(ck, f"step_{precision}", t, "step" + cpu_fp16(ck, precision))


def memory(ck):
    numerics(tf32=True)
    batch = train_batch(ck)
    for ckpt in (False, True):
        for side in ("ours", "diffusers"):  # one network on the device at a time
            trainer = Trainer(unet_pair(ck, ckpt, (side,))[side], batch, ck.device, "bf16")
            trainer.step()  # AdamW's states exist from here on
            ck.sync()
            if ck.cuda:
                torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() if ck.cuda else 0
            start = time.perf_counter()
            trainer.step()
            ck.sync()
            seconds = time.perf_counter() - start
            key = ("mem_ours" if side == "ours" else "mem_ref") + ("_ckpt" if ckpt else "")
            if ck.cuda:
                peak = torch.cuda.max_memory_allocated()
                ck.record(key, peak / 2**20, f"{(peak - base) / 2**20:.0f} MiB above the step's "
                          f"start (activations); step {seconds:.3f} s")
            else:
                ck.record(key, None, f"skipped: CUDA only; the step ran ({seconds:.2f} s)",
                          "skipped")
            del trainer
            gc.collect()
            if ck.cuda:
                torch.cuda.empty_cache()


def sample_seconds(ck, unet, scheduler, cond, ef, frames, k):
    """Seconds of diffusion.sample over the first k of the scheduler's timesteps (bf16)."""
    full = scheduler.timesteps
    scheduler.timesteps = full[:k]
    gens = [torch.Generator().manual_seed(i) for i in range(len(cond))]  # one per video
    ck.sync()
    start = time.perf_counter()
    diffusion.sample(unet, scheduler, cond, ef, gens, frames, ck.cfg["window"], ck.cfg["stride"],
                     amp=amp_for(ck.device, "bf16")())
    ck.sync()
    scheduler.timesteps = full
    return time.perf_counter() - start


@torch.no_grad()
def sample_group(ck, sampler):
    """Seconds per video of diffusion.sample (batch sample_batch, bf16); when the full step count
    would overflow the group's share, the first k steps are timed and scaled by n / k."""
    numerics(tf32=True)
    c = ck.cfg
    unet = unet_pair(ck, sides=("ours",))["ours"].eval()
    B, n = c["sample_batch"], c[sampler]
    g = torch.Generator().manual_seed(4)
    cond = torch.randn(B, 4, 14, 14, generator=g).to(ck.device)
    ef = torch.rand(B, generator=g).to(ck.device)
    for length in ("short", "long"):
        scheduler = diffusion.DDPM() if sampler == "ddpm" else diffusion.DDIM()
        scheduler.set_timesteps(n)
        frames, warm = c[length], min(2, n)
        per_step = sample_seconds(ck, unet, scheduler, cond, ef, frames, warm) / warm  # warm-up
        fits = 0.8 * ck.left(group=True) / per_step
        k = n if fits >= n else max(1, int(fits))
        seconds = sample_seconds(ck, unet, scheduler, cond, ef, frames, k) * n / k
        scaled = "" if k == n else f"; timed {k} of {n} steps and scaled (budget)"
        windows = len(diffusion.window_starts(frames, c["window"], c["stride"]))
        ck.record(f"{sampler}_{length}", seconds / B, f"batch {B}, {windows} window(s) of "
                  f"{c['window']}, bf16: {seconds:.2f} s per batch{scaled}")


@torch.no_grad()
def decode(ck):
    """VAE decode as sample.py decodes: latents / scaling_factor, chunked, then uint8 frames."""
    numerics(tf32=True)
    c = ck.cfg
    vae = copy.deepcopy(models("vae", c["vae"])[0]).to(ck.device).eval()
    for key, length, precision in (("decode_short", "short", "fp32"),
                                   ("decode_long", "long", "fp32"),
                                   ("decode_long_bf16", "long", "bf16")):
        z = torch.randn(c["decode_videos"] * c[length], 4, 14, 14, device=ck.device)
        amp = amp_for(ck.device, precision)

        def run(z=z, amp=amp):
            with amp():
                x = torch.cat([vae.decode(part / vae.config.scaling_factor)
                               for part in z.split(c["decode_chunk"])])
                ((x.float() + 1) * 128).clamp(0, 255).to(torch.uint8)

        t = race(ck, {"vae": run})["vae"]
        ck.record(key, t / c["decode_videos"], f"{c['decode_videos']} video(s), "
                  f"{c['decode_chunk']} frames per call")


@torch.inference_mode()
def inception(ck):
    import detectors

    numerics(tf32=False, deterministic=True)
    net = detectors.InceptionV3().eval().to(ck.device)
    n = ck.cfg["inception_batch"]
    x = torch.randint(0, 256, (n, 3, 112, 112), dtype=torch.uint8).to(ck.device)
    t = race(ck, {"inception": lambda: net(x, return_features=True)})["inception"]
    ck.record("inception", n / t, f"{n} uint8 frames per call, {t:.3f} s")


@torch.inference_mode()
def i3d(ck):
    import detectors

    numerics(tf32=False, deterministic=True)
    net = detectors.I3D().eval().to(ck.device)
    for key, (frames, clips) in zip(("i3d_short", "i3d_long"), ck.cfg["i3d"]):
        x = torch.randint(0, 256, (clips, 3, frames, 112, 112), dtype=torch.uint8).to(ck.device)
        t = race(ck, {"i3d": lambda x=x: net(x, rescale=True, resize=True,
                                             return_features=True)})["i3d"]
        ck.record(key, clips / t, f"{clips} uint8 clip(s) 112 -> 224 per call, {t:.3f} s")


def compiled(ck):
    """train_bf16 with torch.compile on both sides: the first call's seconds (tracing and code
    generation, forward and backward graphs), graph breaks, then the same races."""
    from torch._dynamo.utils import counters

    numerics(tf32=True)
    batch = train_batch(ck)
    trainers, notes = {}, []
    for side, net in unet_pair(ck).items():
        counters.clear()
        trainers[side] = Trainer(net, batch, ck.device, "bf16", backend=ck.cfg["backend"])
        ck.sync()
        start = time.perf_counter()
        trainers[side].forward_backward()
        ck.sync()
        breaks = sum(counters["graph_break"].values())
        notes.append(f"{side}: compiled in {time.perf_counter() - start:.0f} s, "
                     f"{breaks} graph break(s)")
    backend = f"backend {ck.cfg['backend']}; " + "; ".join(notes)
    t = race(ck, {k: tr.forward_backward for k, tr in trainers.items()})
    speedup(ck, "compile_fwd_bwd", t, "forward+backward; " + backend)
    t = race(ck, {k: tr.step for k, tr in trainers.items()})
    speedup(ck, "compile_step", t, "step")


GROUPS = {"parity_unet": parity_unet, "parity_vae": parity_vae, "sdpa": sdpa,
          "train_bf16": functools.partial(train_group, precision="bf16"),
          "train_fp16": functools.partial(train_group, precision="fp16"), "memory": memory,
          "sample_ddpm": functools.partial(sample_group, sampler="ddpm"),
          "sample_ddim": functools.partial(sample_group, sampler="ddim"), "decode": decode,
          "inception": inception, "i3d": i3d, "compile": compiled}


# --- main ---------------------------------------------------------------------------------------

def main(argv=None):
    args = parser.parse_args(argv)
    # Dynamo warns about lru_cache-wrapped version checks in diffusers' code, once per call site.
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache")
    only = [g for g in args.only.split(",") if g]
    unknown = sorted(set(only) - set(GROUPS))
    if unknown:
        sys.exit(f"error: --only: unknown group(s) {', '.join(unknown)}; groups: "
                 f"{', '.join(GROUPS)}")
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("error: no CUDA device; `--smoke` runs the same check on the CPU")
    ck = Check(SMOKE if args.smoke else GPU, args)
    print(f"command: python {' '.join(sys.argv)}\ntorch {torch.__version__}, device "
          f"{ck.device}{' ' + torch.cuda.get_device_name() if ck.cuda else ''}, "
          f"UNet '{ck.cfg['unet']}', VAE '{ck.cfg['vae']}', budget "
          f"{args.budget or ck.cfg['budget']:.0f} s", flush=True)
    print(f"{'measurement':<48s} {'value':>14s} {'unit':<11s} note", flush=True)
    for name, fn in GROUPS.items():
        if only and name not in only:
            for r in ck.rows.values():
                if r["group"] == name:
                    r.update(status="skipped", note="skipped: not in --only")
            continue
        start = time.perf_counter()
        run_group(ck, name, fn)
        ck.seconds[name] = round(time.perf_counter() - start, 1)
        write_json(ck, args.out)
    print(f"\n{'measurement':<48s} {'value':>14s} {'unit':<11s} note")
    for row in ck.rows.values():
        print(format_row(row))
    bad = [r["key"] for r in ck.rows.values() if r["status"] == "error"]
    print("seconds per group: " + ", ".join(f"{k} {v:.0f}" for k, v in ck.seconds.items()))
    print(f"\n{time.perf_counter() - ck.start:.0f} s; JSON: {args.out}"
          + (f"; errors in: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
