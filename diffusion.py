"""Diffusion for latent echo videos: noise schedule, forward process, v-prediction, DDPM and DDIM
steps, classifier-free guidance, long-video window stitching, the LVDM's training loss and
sampling loop, and the EMA of the weights. `python diffusion.py` runs a smoke test.

The schedulers mirror diffusers 0.42.1 `DDPMScheduler` / `DDIMScheduler` operation for operation
(float32 schedule, 0-dim float32 coefficients computed in the same order), so a step gives the
same bits as diffusers on the same inputs and generator (tests/test_diffusion.py).
References: DDPM (Ho et al. 2020), DDIM (Song et al. 2021), v-prediction (Salimans & Ho 2022,
"Progressive distillation"), classifier-free guidance (Ho & Salimans 2022), offset noise
(Guttenberg 2023), EchoNet-Synthetic (Reynaud et al. 2024).
Layout: latent videos are [B, F, C, H, W] (batch, frames, channels, height, width), the UNet's
native layout; t is always diffusion time; ef is the ejection fraction in [0, 1].
"""

import contextlib
import copy

import torch

# --- random numbers ----------------------------------------------------------------------------

def randn(shape, generator=None, device=None, dtype=None):
    """Standard normal noise of `shape` as diffusers' randn_tensor draws it. generator: None
    (global RNG), a torch.Generator, or a list of shape[0]: item i drawn alone from generator i,
    so a video's noise does not depend on its batch. Drawn on the generator's device."""
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]  # diffusers treats a list of one like a single generator
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        one = (1, *shape[1:])
        noise = [torch.randn(one, generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.cat(noise).to(device)
    rand_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)

# --- v-prediction, noise schedule, forward process ------------------------------------------------

def predict_x0_eps(v, x_t, alpha_bar):
    """(x0, eps), unclipped, from the network's v at x_t; v, x_t [B, ...], alpha_bar a 0-dim
    tensor or one broadcastable to x_t. With a = alpha_bar, x_t = sqrt(a) x0 + sqrt(1 - a) eps
    (Ho et al. 2020, Eq. 4) and v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022, Sec. 4,
    Appendix D):  x0 = sqrt(a) x_t - sqrt(1 - a) v,   eps = sqrt(a) v + sqrt(1 - a) x_t."""
    a, b = alpha_bar, 1 - alpha_bar
    return a**0.5 * x_t - b**0.5 * v, a**0.5 * v + b**0.5 * x_t

class _Scheduler:
    """The schedule shared by DDPM and DDIM; defaults are EchoNet-Synthetic's lvdm config."""

    def __init__(
        self,
        num_train_timesteps=1000,  # diffusion steps in training
        beta_start=1e-4,  # linear betas from beta_start to beta_end (Ho et al. 2020, Sec. 4)
        beta_end=0.02,
        clip_sample=True,  # clamp predicted x0 to [-clip_sample_range, clip_sample_range]
        clip_sample_range=4.0,  # the original's choice (diffusers' default is 1.0)
        steps_offset=0,  # added to the "leading" timesteps of set_timesteps
    ):
        if not 0 < beta_start <= beta_end < 1 or not clip_sample_range > 0 or steps_offset < 0:
            raise ValueError(f"betas {beta_start}..{beta_end}, clip_sample_range "
                             f"{clip_sample_range}, steps_offset {steps_offset}: need 0 < "
                             "beta_start <= beta_end < 1, clip_sample_range > 0, steps_offset >= 0")
        self.config = dict(num_train_timesteps=num_train_timesteps, beta_start=beta_start,
                           beta_end=beta_end, beta_schedule="linear", clip_sample=clip_sample,
                           clip_sample_range=clip_sample_range, steps_offset=steps_offset,
                           prediction_type="v_prediction", timestep_spacing="leading")
        # torch's float32 linspace and cumprod: numpy's float64 linspace cast to float32 differs
        # in 338 of the 1000 betas. alpha_bar[0] = 0.99989998, [945] = 1.1670701e-4.
        self.betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # alpha_bar_t, [N]
        self.one = torch.tensor(1.0)  # alpha_bar "after" the last step (prev_t = -1)
        # The schedule stays on the CPU: its 0-dim entries act as scalars on tensors anywhere.
        self.num_inference_steps = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)  # int64, N-1 .. 0

    def _alpha_bar(self, t, x):
        """alpha_bar_t in x's dtype and device, shaped [B, 1, ..., 1] to broadcast over x."""
        alpha_bar = self.alphas_cumprod.to(device=x.device).to(dtype=x.dtype)
        a = alpha_bar[torch.as_tensor(t, device=x.device)].flatten()
        return a.view(-1, *[1] * (x.ndim - 1))

    def add_noise(self, x0, noise, t):
        """Samples q(x_t | x0) (Ho et al. 2020, Eq. 4): sqrt(a) x0 + sqrt(1 - a) noise, with
        a = alpha_bar_t. x0, noise: [B, ...]; t: int, 0-dim or [B] int tensor."""
        a = self._alpha_bar(t, x0)
        return a**0.5 * x0 + (1 - a) ** 0.5 * noise

    def get_velocity(self, x0, noise, t):
        """The v-prediction target (Salimans & Ho 2022, Sec. 4): sqrt(a) noise - sqrt(1 - a) x0.
        x0, noise: [B, ...]; t: int, 0-dim or [B] int tensor. Returns v shaped like x0."""
        a = self._alpha_bar(t, x0)
        return a**0.5 * noise - (1 - a) ** 0.5 * x0

    def set_timesteps(self, n):
        """Picks n of the N training steps for sampling ("leading" spacing, the original's); sets
        `.timesteps` (int64, descending). N = 1000, n = 64: step 1000 // 64 = 15 -> 945, 930,
        ..., 15, 0 (it starts at 945, not 999), each plus steps_offset."""
        N = self.config["num_train_timesteps"]
        if not (isinstance(n, int) and 1 <= n <= N):
            raise ValueError(f"set_timesteps({n!r}): need an int in [1, {N}] (training steps)")
        self.timesteps = torch.arange(n).flip(0) * (N // n) + self.config["steps_offset"]
        self.num_inference_steps = n

    def _x0_eps(self, v, x_t, a):
        x0, eps = predict_x0_eps(v, x_t, a)
        if self.config["clip_sample"]:  # the original clips x0 to +-4; eps stays unclipped
            x0 = x0.clamp(-self.config["clip_sample_range"], self.config["clip_sample_range"])
        return x0, eps

class DDPM(_Scheduler):
    """Ancestral DDPM sampler (Ho et al. 2020, Algorithm 2) over the chosen timesteps."""

    def __init__(self, variance_type="fixed_small", **overrides):
        if variance_type not in ("fixed_small", "fixed_large"):
            raise ValueError(f"variance_type={variance_type!r}: use fixed_small or fixed_large")
        super().__init__(**overrides)
        self.config["variance_type"] = variance_type

    def _previous(self, t):
        if self.num_inference_steps is None:
            return t - 1
        i = (self.timesteps == t).nonzero()
        if len(i) == 0:
            raise ValueError(f"t={t} is not one of the timesteps set by set_timesteps")
        i = int(i[0, 0])
        return int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1

    def step(self, model_output, t, x_t, generator=None, return_x0=False):
        """One step x_t -> x_prev [B, ...] (and the clipped x0 with return_x0), prev the next
        entry of `.timesteps` (-1 after the last); model_output (v), x_t [B, ...]; t an entry of
        `.timesteps`; generator as in `randn`, drawn from only when t > 0."""
        t = int(t)
        prev_t = self._previous(t)
        a_t = self.alphas_cumprod[t]
        a_p = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        b_t, b_p = 1 - a_t, 1 - a_p
        # A jump t -> prev_t acts as one step with alpha = a_t / a_p, beta = 1 - alpha (respaced
        # DDPM, Nichol & Dhariwal 2021, Sec. 4); for prev_t = t - 1 they are the paper's alpha_t.
        alpha, beta = a_t / a_p, 1 - a_t / a_p
        x0, _ = self._x0_eps(model_output, x_t, a_t)
        # Posterior mean of q(x_prev | x_t, x0), Ho et al. 2020, Eq. 7:
        #   mu = sqrt(a_p) beta / (1 - a_t) x0 + sqrt(alpha) (1 - a_p) / (1 - a_t) x_t
        x_prev = (a_p**0.5 * beta) / b_t * x0 + alpha**0.5 * b_p / b_t * x_t
        if t > 0:
            # fixed_small: sigma^2 = beta~ = (1 - a_p) / (1 - a_t) beta (Eq. 7); fixed_large:
            # sigma^2 = beta (Sec. 3.2). At t = 0 nothing is drawn: the generator is untouched.
            small = self.config["variance_type"] == "fixed_small"
            var = torch.clamp(b_p / b_t * beta, min=1e-20) if small else beta
            z = randn(model_output.shape, generator, model_output.device, model_output.dtype)
            x_prev = x_prev + var**0.5 * z
        return (x_prev, x0) if return_x0 else x_prev

class DDIM(_Scheduler):
    """DDIM sampler (Song et al. 2021, Eq. 12); eta = 0 is deterministic, eta = 1 is DDPM-like."""

    def __init__(self, eta=0.0, set_alpha_to_one=True, **overrides):
        if not eta >= 0:
            raise ValueError(f"eta={eta!r}: need eta >= 0")
        super().__init__(**overrides)
        self.eta = eta
        self.config["set_alpha_to_one"] = set_alpha_to_one
        # alpha_bar after the last step: 1 (x0 itself) or alpha_bar_0.
        self.final_alpha_cumprod = self.one if set_alpha_to_one else self.alphas_cumprod[0]

    def step(self, model_output, t, x_t, generator=None, return_x0=False):
        """One step x_t -> x_prev [B, ...] (and the clipped x0 with return_x0), prev = t - N // n
        the next entry of `.timesteps`; arguments as DDPM.step's; the generator is drawn from at
        every step (the last too) when eta > 0, never when eta = 0."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(n) before DDIM.step")
        t = int(t)
        prev_t = t - self.config["num_train_timesteps"] // self.num_inference_steps
        a_t = self.alphas_cumprod[t]
        a_p = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b_t, b_p = 1 - a_t, 1 - a_p
        x0, eps = self._x0_eps(model_output, x_t, a_t)
        # Song et al. 2021, Eq. 16: sigma = eta sqrt((1 - a_p) / (1 - a_t)) sqrt(1 - a_t / a_p).
        sigma = self.eta * ((b_p / b_t) * (1 - a_t / a_p)) ** 0.5
        # Eq. 12: x_prev = sqrt(a_p) x0 + sqrt(1 - a_p - sigma^2) eps + sigma z.
        x_prev = a_p**0.5 * x0 + (1 - a_p - sigma**2) ** 0.5 * eps
        if self.eta > 0:
            z = randn(model_output.shape, generator, model_output.device, model_output.dtype)
            x_prev = x_prev + sigma * z
        return (x_prev, x0) if return_x0 else x_prev

# --- training noise, EF dropout, masked MSE, guidance -------------------------------------------

def offset_noise(x0, strength=0.1, generator=None):
    """Training noise for x0 [B, F, C, H, W]: randn_like(x0) + strength * randn(B, 1, C, 1, 1)
    (Guttenberg 2023), one offset per (video, channel) as the original's randn(B, C, 1, 1, 1) on
    its [B, C, F, H, W] layout; generator as in `randn`."""
    if x0.ndim != 5:
        raise ValueError(f"offset_noise wants latents [B, F, C, H, W], got {tuple(x0.shape)}")
    B, F, C, H, W = x0.shape
    noise = randn(x0.shape, generator, x0.device, x0.dtype)
    return noise + strength * randn((B, 1, C, 1, 1), generator, x0.device, x0.dtype)

# The UNet sees ef as encoder_hidden_states [B, 1, 1]: one key token of width 1. Softmax over one
# key is 1, so cross-attention returns to_out(to_v(ef)), and to_v has no bias: its value vector is
# ef * w_v, linear in ef. Real ef in [0, 1] span the segment 0 .. w_v; NULL_EF = -1 gives -w_v,
# the negative of EF = 100 %'s, distinct from every real EF (0 would be EF = 0 %, a real value).
NULL_EF = -1.0

def drop_ef(ef, p, generator=None):
    """ef [B] or [B, 1, 1] with each item replaced by NULL_EF with probability p, drawn from
    `generator` (classifier-free guidance training; the original drew this mask, never used it)."""
    if not 0 <= p <= 1:
        raise ValueError(f"drop_ef: p={p!r} must be in [0, 1]")
    device = generator.device if generator is not None else ef.device
    drop = torch.rand(ef.shape[0], generator=generator, device=device).to(ef.device) < p
    return torch.where(drop.view(-1, *[1] * (ef.ndim - 1)), torch.full_like(ef, NULL_EF), ef)

def masked_mse(pred, target, n_real=None):
    """The float32 MSE of pred, target [B, F, ...] over the real frames, index < n_real [B]
    (None: all). Returns a 0-dim tensor."""
    err = (pred.float() - target.float()) ** 2
    if n_real is None:
        return err.mean()
    B, F = err.shape[:2]
    n_real = torch.as_tensor(n_real, device=err.device).view(B, 1)
    # The original kept frames index <= n_real (one padded frame too) and averaged over the whole
    # tensor, so a padded clip's loss was shrunk by n_real / F. We keep index < n_real and divide
    # by the number of real elements: every real frame weighs the same, padded or not.
    real = (torch.arange(F, device=err.device) < n_real).view(B, F, *[1] * (err.ndim - 2))
    per_frame = err[0, 0].numel()
    return torch.where(real, err, 0.0).sum() / (real.sum() * per_frame).clamp(min=1)

def guided(v_cond, v_uncond, scale):
    """Classifier-free guidance (Ho & Salimans 2022, Eq. 6, scale = 1 + w), linear, so it holds
    for v as for eps: v_uncond + scale (v_cond - v_uncond), [B, ...]; scale 1 gives v_cond."""
    return v_uncond + scale * (v_cond - v_uncond)

# --- long videos: window stitching -------------------------------------------------------------
# The UNet is trained on 64-frame clips. Longer videos (the original's sample.py) are denoised as
# 64-frame windows every 32 frames, all in one batch, at every step: 192 frames -> R = 5 windows
# at 0, 32, 64, 96, 128; the video's prediction is window 0 whole (frames 0-63), then frames 32-63
# of windows 1..4 (video frames 64-95, ..., 160-191): an overlap takes the earlier window's.

def round_frames(frames, multiple=32):
    """--frames rounded up to a multiple of 32, as the original's sampler does: 100 -> 128."""
    return -(-frames // multiple) * multiple

def window_starts(frames, window=64, stride=32):
    """First frame of each window: 192 -> [0, 32, 64, 96, 128]; frames <= window -> [0]."""
    if frames <= window:
        return [0]  # one window: the video itself, shorter than 64 frames if frames < 64
    if not 0 < stride <= window or (frames - window) % stride:
        raise ValueError(f"{frames} frames do not tile into {window}-frame windows every "
                         f"{stride}: round up to {window} + k * {stride} first (round_frames)")
    return list(range(0, frames - window + 1, stride))

def split_windows(x, window=64, stride=32):
    """x [B, F, ...] -> [B*R, window, ...] batch-major (video 0's windows, then video 1's), so
    the EF per window is ef.repeat_interleave(R, 0) (the original stacked windows window-major
    but repeated EFs batch-major: windows got other videos' EFs). F <= window: x itself."""
    F = x.shape[1]
    if F <= window:
        return x
    starts = torch.tensor(window_starts(F, window, stride), device=x.device)
    idx = starts[:, None] + torch.arange(window, device=x.device)  # [R, window] frame indices
    return x[:, idx].flatten(0, 1)  # [B, R, window, ...] -> [B*R, window, ...]

def merge_windows(y, B, frames, window=64, stride=32):
    """Window predictions y [B*R, window, ...] -> video [B, frames, ...]: window 0 whole, then
    frames window-stride .. window-1 (32..63) of each later window (the original's rule)."""
    R = len(window_starts(frames, window, stride))
    if y.shape[0] != B * R or y.shape[1] != min(frames, window):
        need = (B * R, min(frames, window))
        raise ValueError(f"merge_windows: windows {tuple(y.shape[:2])}, expected {need}")
    if frames <= window:
        return y
    y = y.reshape(B, R, window, *y.shape[2:])
    tails = y[:, 1:, window - stride :].flatten(1, 2)  # [B, (R-1)*stride, ...]
    return torch.cat([y[:, 0], tails], dim=1)  # [B, frames, ...]

# --- the LVDM: its UNet call, its sampling loop and its training loss -----------------------------

def predict(unet, x_t, cond, t, ef):
    """The UNet's prediction [B, F, C, h, w] as EchoNet-Synthetic calls it: x_t [B, F, C, h, w]
    noisy latents and cond [B, C, h, w], the conditioning frame repeated over the F frames, on
    channels (8); t 0-dim or [B]; ef [B] (EF / 100 or NULL_EF) as encoder_hidden_states [B, 1, 1];
    added_time_ids zeros [B, 1]. Replicate-padded to a multiple of 8 and cropped back: 14 -> 16
    as the original's pad = (8 - 14 % 8) // 2 (which would pad 16 by 4; we pad 16 by nothing)."""
    B, Fr, C, h, w = x_t.shape
    x = torch.cat([x_t, cond[:, None].expand(B, Fr, C, h, w)], dim=2)  # [B, F, 2C, h, w]
    ph, pw = -h % 8, -w % 8
    pads = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)  # left, right, top, bottom
    if ph or pw:
        x = torch.nn.functional.pad(x.flatten(0, 1), pads, mode="replicate").unflatten(0, (B, Fr))
    ids = torch.zeros(B, 1, device=x.device, dtype=x.dtype)
    v = unet(x, t, ef.reshape(B, 1, 1).to(x.dtype), ids)  # [B, F, C, h + ph, w + pw]
    return v[..., pads[2]:pads[2] + h, pads[0]:pads[0] + w]

@torch.no_grad()
def sample(unet, scheduler, cond, ef, generators, frames, window=64, stride=32, guidance=1.0,
           amp=None, residual=0.0):
    """Denoise B videos of `frames` frames (<= window, or window + k * stride) from pure noise;
    returns latents [B, frames, C, h, w] in fp32. Call scheduler.set_timesteps first.

    cond [B, C, h, w] scaled latents; ef [B] EF / 100; generators: one per video (its initial
    noise, then its step noise), so a video does not depend on its batch. Each step runs all R
    windows of all videos in one UNet call (under `amp`, an autocast context), merges them and
    takes one scheduler step on the whole videos in fp32; guidance != 1 adds the NULL_EF pass
    to the same call. A UNet trained with residual k > 0 (lvdm_loss) denoises k (x0 - cond):
    its x0 clip widens k-fold (still +-4 on x0 - cond) and the latents are cond + x / k."""
    B, C, h, w = cond.shape
    if residual:
        scheduler = copy.copy(scheduler)
        scheduler.config = {**scheduler.config,
                            "clip_sample_range": scheduler.config["clip_sample_range"] * residual}
    x = randn((B, frames, C, h, w), generators, cond.device, torch.float32)
    R = len(window_starts(frames, window, stride))  # 192 frames -> 5
    cond_w, ef_w = cond.repeat_interleave(R, 0), ef.repeat_interleave(R, 0)
    guide = guidance != 1
    if guide:  # one doubled batch: [conditional; null EF]
        cond_w, ef_w = cond_w.repeat(2, 1, 1, 1), torch.cat([ef_w, torch.full_like(ef_w, NULL_EF)])
    for t in scheduler.timesteps:
        x_w = split_windows(x, window, stride)  # [B*R, window, C, h, w]
        with amp or contextlib.nullcontext():
            v = predict(unet, torch.cat([x_w, x_w]) if guide else x_w, cond_w, t, ef_w).float()
        if guide:
            v = guided(*v.chunk(2), guidance)
        x = scheduler.step(merge_windows(v, B, frames, window, stride), t, x, generator=generators)
    return cond[:, None] + x / residual if residual else x

def draw_timesteps(generators, N, t_shift=0.0):
    """One t in [0, N) per generator: uniform (the original's randint), or for t_shift p > 0
    t = N (1 - (1 - u)^p) with u uniform in [0, 1), whose density rises towards t = N."""
    if not t_shift:
        return torch.cat([torch.randint(0, N, (1,), generator=g) for g in generators])
    u = torch.cat([torch.rand(1, generator=g) for g in generators])
    return (N * (1 - (1 - u) ** t_shift)).long().clamp(max=N - 1)

def lvdm_loss(unet, scheduler, x0, cond, ef, n_real, generators, ef_dropout=0.1,
              noise_offset=0.1, amp=None, residual=0.0, t_shift=0.0):
    """The LVDM's training objective (echosyn/lvdm/train.py's, with its EF dropout applied and
    its frame mask fixed): the v-prediction MSE over the real frames, a 0-dim fp32 tensor.

    x0 [B, F, C, h, w] clean scaled latents, zero past n_real [B] real frames; cond [B, C, h, w];
    ef [B] EF / 100; generators: one per clip, drawing its t (uniform in [0, N)), EF dropout and
    offset noise in that order. `amp`: an autocast context for the UNet call.

    Two options for short runs (the phantom demo; 0 = the original): residual k > 0 diffuses
    k (x0 - cond), the motion against the conditioning frame, amplified (sample() undoes it);
    t_shift p > 0 draws t = N (1 - (1 - u)^p), u uniform, putting more clips at high noise,
    where nothing but the EF tells the motion's amplitude (p = 2: half the clips at t >= 750)."""
    N = scheduler.config["num_train_timesteps"]
    if residual:
        x0 = residual * (x0 - cond[:, None])  # frames past n_real are masked out of the loss
    t = draw_timesteps(generators, N, t_shift).to(x0.device)
    ef = torch.cat([drop_ef(ef[i:i + 1], ef_dropout, g) for i, g in enumerate(generators)])
    noise = offset_noise(x0, noise_offset, generators)
    # Forward process (Ho et al. 2020, Eq. 4) and v target (Salimans & Ho 2022), both from the
    # same offset noise as in the original, with a = alpha_bar_t:
    #   x_t = sqrt(a) x0 + sqrt(1 - a) noise,    v = sqrt(a) noise - sqrt(1 - a) x0
    x_t, v = scheduler.add_noise(x0, noise, t), scheduler.get_velocity(x0, noise, t)
    with amp or contextlib.nullcontext():
        v_pred = predict(unet, x_t, cond, t, ef)
    return masked_mse(v_pred, v, n_real)

# --- EMA of the weights ------------------------------------------------------------------------

def ema_decay(step, max_decay=0.9999):
    """diffusers EMAModel's default decay at optimisation step k (1-based): 0 for k = 1, then
    (1 + s) / (10 + s) with s = k - 1 (TensorFlow's ExponentialMovingAverage num_updates rule),
    capped at max_decay: k = 2 -> 0.1818, 10 -> 0.5263, 1000 -> 0.99108; the cap at k >= 89 991."""
    s = max(0, step - 1)
    return 0.0 if s <= 0 else min(max_decay, (1 + s) / (10 + s))

@torch.no_grad()
def ema_update(ema, model, step, max_decay=0.9999):
    """The EMA of the weights after optimizer step `step` (1-based), in place, as diffusers'
    EMAModel: ema <- ema - (1 - d) (ema - w) for each trained weight w, d = ema_decay(step);
    frozen weights and buffers are copied. ema: a copy of `model` (made with
    copy.deepcopy(model).float().eval().requires_grad_(False)); model: the unwrapped module."""
    d = ema_decay(step, max_decay)
    for e, w in zip(ema.parameters(), model.parameters(), strict=True):
        if w.requires_grad:
            e.sub_((1 - d) * (e - w))
        else:
            e.copy_(w)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)

if __name__ == "__main__":  # smoke test: 192 frames, 64 DDPM steps, 5 windows, tanh for a UNet
    scheduler, g = DDPM(), torch.Generator().manual_seed(0)
    scheduler.set_timesteps(64)
    x = randn((2, 192, 4, 14, 14), g)  # [B, F, C, H, W]
    for t in scheduler.timesteps:
        x = scheduler.step(merge_windows(torch.tanh(split_windows(x)), 2, 192), t, x, generator=g)
    print("windows start at", window_starts(192), "-> sample", tuple(x.shape))
