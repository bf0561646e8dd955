"""Diffusion for latent echo videos: schedule, forward process, v-prediction, DDPM and DDIM steps,
guidance, long-video windows, the LVDM's sampling loop and loss, the EMA. `python diffusion.py`
runs a smoke test. The schedulers compute what diffusers 0.42.1's DDPMScheduler / DDIMScheduler
do, operation for operation, bit for bit (tests/test_diffusion.py). References: DDPM (Ho et al.
2020), DDIM (Song et al. 2021), v-prediction (Salimans & Ho 2022), classifier-free guidance (Ho &
Salimans 2022), offset noise (Guttenberg 2023), EchoNet-Synthetic (Reynaud et al. 2024). Latent
videos are [B, F, C, H, W]; t is diffusion time; ef the ejection fraction in [0, 1].
"""

import contextlib
import copy

import torch


# --- noise, v-prediction, noise schedule, forward process, DDPM and DDIM steps ------------------
def randn(shape, generator=None, device=None, dtype=None):
    """N(0, I) noise of `shape` drawn as diffusers' randn_tensor, on the generator's device, from
    the global RNG, one generator, or shape[0] (item i from generator i, whatever its batch)."""
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]  # diffusers treats a list of one like a single generator
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype)
                          for g in generator]).to(device)
    rand_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)

def predict_x0_eps(v, x_t, alpha_bar, clip=None):
    """(x0, eps) from v at x_t [B, ...], x0 clamped to +-clip (the original's 4) unless clip is
    None. With a = alpha_bar, x_t = sqrt(a) x0 + sqrt(1 - a) eps (Ho et al. 2020, Eq. 4) and
    v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022, Sec. 4, Appendix D), so
        x0 = sqrt(a) x_t - sqrt(1 - a) v,   eps = sqrt(a) v + sqrt(1 - a) x_t."""
    a, b = alpha_bar, 1 - alpha_bar
    x0 = a**0.5 * x_t - b**0.5 * v
    return x0 if clip is None else x0.clamp(-clip, clip), a**0.5 * v + b**0.5 * x_t

class _Scheduler:
    """The schedule DDPM and DDIM share, by default the original's: N = 1000 steps, linear betas
    1e-4 .. 0.02 (Ho et al. 2020, Sec. 4), x0 clipped to +-4 (diffusers: 1), steps_offset 0."""
    def __init__(self, num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                 clip_sample=True, clip_sample_range=4.0, steps_offset=0):
        if not 0 < beta_start <= beta_end < 1 or not clip_sample_range > 0 or steps_offset < 0:
            raise ValueError(f"betas {beta_start}..{beta_end}, clip_sample_range "
                             f"{clip_sample_range}, steps_offset {steps_offset}: need 0 < "
                             "beta_start <= beta_end < 1, clip_sample_range > 0, steps_offset >= 0")
        self.clip = clip_sample_range if clip_sample else None  # for predict_x0_eps
        self.config = dict(num_train_timesteps=num_train_timesteps, beta_start=beta_start,
                           beta_end=beta_end, beta_schedule="linear", clip_sample=clip_sample,
                           clip_sample_range=clip_sample_range, steps_offset=steps_offset,
                           prediction_type="v_prediction", timestep_spacing="leading")
        # torch's float32 linspace and cumprod: numpy's float64 linspace cast to float32 differs
        # in 338 of the 1000 betas. alpha_bar[0] = 0.99989998, [945] = 1.1670701e-4.
        self.betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # alpha_bar_t, [N], on CPU
        self.one = torch.tensor(1.0)  # alpha_bar "after" the last step (prev_t = -1)
        self.num_inference_steps = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)  # int64, N-1 .. 0

    def _alpha_bar(self, t, x):
        """alpha_bar_t in x's dtype and device, shaped [B, 1, ..., 1] to broadcast over x."""
        alpha_bar = self.alphas_cumprod.to(device=x.device).to(dtype=x.dtype)
        a = alpha_bar[torch.as_tensor(t, device=x.device)].flatten()
        return a.view(-1, *[1] * (x.ndim - 1))

    def add_noise(self, x0, noise, t):
        """x_t ~ q(x_t | x0) (Ho et al. 2020, Eq. 4): sqrt(a) x0 + sqrt(1 - a) noise; t [B], 0-d."""
        a = self._alpha_bar(t, x0)
        return a**0.5 * x0 + (1 - a) ** 0.5 * noise

    def get_velocity(self, x0, noise, t):
        """The v-prediction target (Salimans & Ho 2022, Sec. 4): sqrt(a) noise - sqrt(1 - a) x0."""
        a = self._alpha_bar(t, x0)
        return a**0.5 * noise - (1 - a) ** 0.5 * x0

    def set_timesteps(self, n):
        """`.timesteps`: n of the N training steps, "leading" as the original's, int64, descending,
        plus steps_offset: N = 1000, n = 64 -> 945, 930, ..., 15, 0 (1000 // 64 = 15 apart)."""
        N = self.config["num_train_timesteps"]
        if not (isinstance(n, int) and 1 <= n <= N):
            raise ValueError(f"set_timesteps({n!r}): need an int in [1, {N}] (training steps)")
        self.timesteps = torch.arange(n).flip(0) * (N // n) + self.config["steps_offset"]
        self.num_inference_steps = n

class DDPM(_Scheduler):
    """Ancestral DDPM sampler (Ho et al. 2020, Algorithm 2) over the chosen timesteps, with
    diffusers' variance_type "fixed_small" (the original's)."""
    def step(self, model_output, t, x_t, generator=None, return_x0=False):
        """x_t [B, ...] -> x_prev (and the clipped x0 with return_x0) from the UNet's v at t, an
        entry of `.timesteps` (prev_t the next, -1 after the last: before set_timesteps, all N
        steps, so prev_t = t - 1); noise drawn only if t > 0."""
        t = int(t)
        if t not in self.timesteps.tolist():
            raise ValueError(f"t={t} is not one of the timesteps set by set_timesteps")
        later = self.timesteps[self.timesteps < t]  # .timesteps descend: prev_t = later[0]
        a_t = self.alphas_cumprod[t]
        a_p = self.alphas_cumprod[int(later[0])] if len(later) else self.one
        b_t, b_p = 1 - a_t, 1 - a_p
        # A jump t -> prev_t is one step of alpha = a_t / a_p (Nichol & Dhariwal 2021, Sec. 4).
        alpha, beta = a_t / a_p, 1 - a_t / a_p
        x0, _ = predict_x0_eps(model_output, x_t, a_t, self.clip)
        # Posterior mean of q(x_prev | x_t, x0), Ho et al. 2020, Eq. 7:
        #   mu = sqrt(a_p) beta / (1 - a_t) x0 + sqrt(alpha) (1 - a_p) / (1 - a_t) x_t
        x_prev = (a_p**0.5 * beta) / b_t * x0 + alpha**0.5 * b_p / b_t * x_t
        if t > 0:  # sigma^2 = beta~ = (1 - a_p) / (1 - a_t) beta (Eq. 7)
            var = torch.clamp(b_p / b_t * beta, min=1e-20)
            z = randn(model_output.shape, generator, model_output.device, model_output.dtype)
            x_prev = x_prev + var**0.5 * z
        return (x_prev, x0) if return_x0 else x_prev

class DDIM(_Scheduler):
    """DDIM sampler (Song et al. 2021, Eq. 12); eta = 0 is deterministic, eta = 1 is DDPM-like;
    a_p = 1 after the last step (diffusers' set_alpha_to_one=True, the original's)."""
    def __init__(self, eta=0.0, **overrides):
        if not eta >= 0:
            raise ValueError(f"eta={eta!r}: need eta >= 0")
        super().__init__(**overrides)
        self.eta = eta

    def step(self, model_output, t, x_t, generator=None, return_x0=False):
        """As DDPM.step, prev_t = t - N // n; noise drawn at every step if eta > 0, else never."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(n) before DDIM.step")
        t = int(t)
        prev_t = t - self.config["num_train_timesteps"] // self.num_inference_steps
        a_t = self.alphas_cumprod[t]
        a_p = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        b_t, b_p = 1 - a_t, 1 - a_p
        x0, eps = predict_x0_eps(model_output, x_t, a_t, self.clip)
        # Song et al. 2021, Eq. 16: sigma = eta sqrt((1 - a_p) / (1 - a_t)) sqrt(1 - a_t / a_p),
        # and Eq. 12: x_prev = sqrt(a_p) x0 + sqrt(1 - a_p - sigma^2) eps + sigma z.
        sigma = self.eta * ((b_p / b_t) * (1 - a_t / a_p)) ** 0.5
        x_prev = a_p**0.5 * x0 + (1 - a_p - sigma**2) ** 0.5 * eps
        if self.eta > 0:
            z = randn(model_output.shape, generator, model_output.device, model_output.dtype)
            x_prev = x_prev + sigma * z
        return (x_prev, x0) if return_x0 else x_prev

class DPMSolver(_Scheduler):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): DDIM's ODE solved in x0 and the log-SNR
    lambda = log(alpha / sigma), second order from the step before's x0 (why: docs/diffusion.md).
    diffusers' DPMSolverMultistepScheduler with its defaults, bit for bit; x0 is not clipped."""
    def __init__(self, **overrides):
        super().__init__(**overrides)
        self.clip, self.config["clip_sample"] = None, False  # x0 not clipped, as diffusers'
        self.all_sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5

    def set_timesteps(self, n):
        """n timesteps rounded from linspace(0, N - 1, n + 1), descending, the last dropped."""
        N = self.config["num_train_timesteps"]
        if not (isinstance(n, int) and 1 <= n < N):  # n = N would repeat a timestep (h = 0)
            raise ValueError(f"set_timesteps({n!r}): need an int in [1, {N - 1}] (DPMSolver)")
        self.num_inference_steps = n
        ts = (torch.arange(n + 1, dtype=torch.float64) * ((N - 1) / n)).round()  # numpy's
        self.timesteps = ts.long().flip(0)[:-1]  # linspace, which torch's rounds differently
        self.sigmas = torch.cat([self.all_sigmas[self.timesteps], torch.zeros(1)])  # sigma_K = 0
        self.x0_before = None

    def alpha_sigma_lambda(self, i):
        """alpha_t = 1 / sqrt(1 + sigma^2), sigma_t = sigma alpha_t and lambda at step i."""
        alpha = 1 / ((self.sigmas[i] ** 2 + 1) ** 0.5)
        sigma = self.sigmas[i] * alpha
        return alpha, sigma, torch.log(alpha) - torch.log(sigma)

    def step(self, model_output, t, x_t, generator=None, return_x0=False):
        """As DDIM.step, deterministic; the steps must come in the order of `.timesteps`."""
        steps = self.timesteps.tolist()
        if int(t) not in steps:
            raise ValueError(f"t={int(t)} is not one of the timesteps set by set_timesteps")
        i = steps.index(int(t))
        a_s, s_s, lam_s = self.alpha_sigma_lambda(i)
        a_t, s_t, lam_t = self.alpha_sigma_lambda(i + 1)
        x0 = a_s * x_t - s_s * model_output  # v -> x0, in diffusers' order of operations
        h = lam_t - lam_s
        e = a_t * (torch.exp(-h) - 1.0)
        x_prev = (s_t / s_s) * x_t.float() - e * x0  # first order (DDIM's step)
        if 0 < i < len(steps) - 1:  # second order but at the first and the last step: the
            r = (lam_s - self.alpha_sigma_lambda(i - 1)[2]) / h  # last step's h over this one's
            x_prev = x_prev - 0.5 * e * ((1.0 / r) * (x0 - self.x0_before))
        self.x0_before = x0
        x_prev = x_prev.to(model_output.dtype)
        return (x_prev, x0) if return_x0 else x_prev

# --- training noise, EF dropout, masked MSE, guidance -------------------------------------------
def offset_noise(x0, strength=0.1, generator=None):
    """randn_like(x0) + strength * randn(B, 1, C, 1, 1) for x0 [B, F, C, H, W] (Guttenberg 2023)."""
    if x0.ndim != 5:
        raise ValueError(f"offset_noise wants latents [B, F, C, H, W], got {tuple(x0.shape)}")
    B, F, C, H, W = x0.shape
    noise = randn(x0.shape, generator, x0.device, x0.dtype)
    return noise + strength * randn((B, 1, C, 1, 1), generator, x0.device, x0.dtype)

# The UNet's cross-attention to its one EF token returns to_out(to_v(ef)) (model.Attention), and
# to_v(ef) = ef w_v: real ef in [0, 1] span 0 .. w_v, NULL_EF = -1 gives -w_v, unlike any real EF.
NULL_EF = -1.0

def drop_ef(ef, p, generator=None):
    """ef [B] or [B, 1, 1], each item NULL_EF with probability p (the original never used it)."""
    if not 0 <= p <= 1:
        raise ValueError(f"drop_ef: p={p!r} must be in [0, 1]")
    device = generator.device if generator is not None else ef.device
    drop = torch.rand(ef.shape[0], generator=generator, device=device).to(ef.device) < p
    return torch.where(drop.view(-1, *[1] * (ef.ndim - 1)), torch.full_like(ef, NULL_EF), ef)

def masked_mse(pred, target, n_real=None):
    """The float32 MSE (0-dim) of pred, target [B, F, ...] over frames index < n_real [B]."""
    err = (pred.float() - target.float()) ** 2
    if n_real is None:
        return err.mean()
    B, F = err.shape[:2]
    n_real = torch.as_tensor(n_real, device=err.device).view(B, 1)
    # The original kept a padded frame too and shrank a padded clip's loss by n_real / F.
    real = (torch.arange(F, device=err.device) < n_real).view(B, F, *[1] * (err.ndim - 2))
    return torch.where(real, err, 0.0).sum() / (real.sum() * err[0, 0].numel()).clamp(min=1)

def guided(v_cond, v_uncond, scale):
    """Classifier-free guidance (Ho & Salimans 2022, Eq. 6, scale = 1 + w; as valid for v)."""
    return v_uncond + scale * (v_cond - v_uncond)

# --- long videos: window stitching -------------------------------------------------------------
# Videos longer than the 64 training frames are denoised as 64-frame windows every 32 frames, in
# one batch (192 frames -> R = 5 windows), predicted as window 0, then frames 32-63 of the others.

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
    """x [B, F, ...] -> [R*B, window, ...], window-major as the original stacks them (the same
    batch layout, so its UNet call and ours round alike); ef.repeat(R) fits (the
    original's batch-major repeat gave windows other videos' EFs). F <= window: x itself."""
    F = x.shape[1]
    if F <= window:
        return x
    starts = torch.tensor(window_starts(F, window, stride), device=x.device)
    idx = starts[:, None] + torch.arange(window, device=x.device)  # [R, window] frame indices
    return x[:, idx].transpose(0, 1).flatten(0, 1)  # [R, B, window, ...] -> [R*B, window, ...]

def merge_windows(y, B, frames, window=64, stride=32):
    """Window predictions y [R*B, window, ...] -> video [B, frames, ...]: window 0 whole, then
    frames window-stride .. window-1 (32..63) of each later window (the original's rule)."""
    R = len(window_starts(frames, window, stride))
    if y.shape[0] != B * R or y.shape[1] != min(frames, window):
        raise ValueError(f"merge_windows: windows {tuple(y.shape[:2])}, expected "
                         f"{(B * R, min(frames, window))}")
    if frames <= window:
        return y
    y = y.reshape(R, B, window, *y.shape[2:]).transpose(0, 1)
    tails = y[:, 1:, window - stride :].flatten(1, 2)  # [B, (R-1)*stride, ...]
    return torch.cat([y[:, 0], tails], dim=1)  # [B, frames, ...]

# --- the LVDM: its UNet call, its sampling loop and its training loss -----------------------------
def predict(unet, x_t, cond, t, ef):
    """The UNet's v for x_t [B, F, C, h, w] as the original calls it: cond [B, C, h, w] on channels,
    ef [B] as a [B, 1, 1] token, replicate-padded to a multiple of 8 (14 -> 16) and cropped."""
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
    """Latents [B, frames, C, h, w] (fp32) denoised from noise after set_timesteps; cond [B, C, h,
    w]; ef [B]; one generator per video. Each step: one UNet call on all windows of all videos
    (under amp; guidance != 1 adds the NULL_EF pass), one fp32 step; residual: see lvdm_loss."""
    B, C, h, w = cond.shape
    if residual and scheduler.clip:  # +-4 on k (x0 - cond): +-4k on x0
        scheduler = copy.copy(scheduler)
        scheduler.clip = scheduler.clip * residual
    x = randn((B, frames, C, h, w), generators, cond.device, torch.float32)
    R = len(window_starts(frames, window, stride))  # 192 frames -> 5
    cond_w, ef_w = cond.repeat(R, 1, 1, 1), ef.repeat(R)  # window-major, as split_windows
    if guide := guidance != 1:  # one doubled batch: [conditional; null EF]
        cond_w, ef_w = cond_w.repeat(2, 1, 1, 1), torch.cat([ef_w, torch.full_like(ef_w, NULL_EF)])
    for t in scheduler.timesteps:
        x_w = split_windows(x, window, stride)  # [R*B, window, C, h, w]
        with amp or contextlib.nullcontext():
            v = predict(unet, torch.cat([x_w, x_w]) if guide else x_w, cond_w, t, ef_w).float()
        if guide:
            v = guided(*v.chunk(2), guidance)
        x = scheduler.step(merge_windows(v, B, frames, window, stride), t, x, generator=generators)
    return cond[:, None] + x / residual if residual else x  # x = k (x0 - cond)

def draw_timesteps(generators, N, t_shift=0.0):
    """One t in [0, N) per generator: uniform (the original), or N (1 - (1 - u)^t_shift)."""
    if not t_shift:
        return torch.cat([torch.randint(0, N, (1,), generator=g) for g in generators])
    u = torch.cat([torch.rand(1, generator=g) for g in generators])
    return (N * (1 - (1 - u) ** t_shift)).long().clamp(max=N - 1)

def lvdm_loss(unet, scheduler, x0, cond, ef, n_real, generators, ef_dropout=0.1,
              noise_offset=0.1, amp=None, residual=0.0, t_shift=0.0):
    """echosyn/lvdm/train.py's objective, its EF dropout applied and frame mask fixed: the v MSE
    (0-dim, fp32) over x0 [B, F, C, h, w]'s n_real [B] real frames; one generator per clip its t,
    EF dropout and offset noise. For short runs (the demo; 0 = the original): residual k > 0
    diffuses k (x0 - cond), the amplified motion (sample() undoes it); t_shift p > 0 puts more
    clips at high noise, where only the EF tells the motion's amplitude."""
    if residual:
        x0 = residual * (x0 - cond[:, None])  # frames past n_real are masked out of the loss
    t = draw_timesteps(generators, scheduler.config["num_train_timesteps"], t_shift).to(x0.device)
    ef = torch.cat([drop_ef(ef[i:i + 1], ef_dropout, g) for i, g in enumerate(generators)])
    noise = offset_noise(x0, noise_offset, generators)
    # x_t = sqrt(a) x0 + sqrt(1 - a) noise and v = sqrt(a) noise - sqrt(1 - a) x0, a = alpha_bar_t
    # (Ho et al. 2020, Eq. 4; Salimans & Ho 2022), both from the offset noise, as the original
    x_t, v = scheduler.add_noise(x0, noise, t), scheduler.get_velocity(x0, noise, t)
    with amp or contextlib.nullcontext():
        v_pred = predict(unet, x_t, cond, t, ef)
    return masked_mse(v_pred, v, n_real)

# --- EMA of the weights ------------------------------------------------------------------------
def ema_decay(step, max_decay=0.9999):
    """diffusers EMAModel's default decay after step k (1-based): 0 for k = 1, then (1 + s) /
    (10 + s), s = k - 1, up to max_decay: k = 2 -> 0.1818, 1000 -> 0.99108, >= 89 991 -> cap."""
    return 0.0 if step <= 1 else min(max_decay, step / (9 + step))  # = (1 + s) / (10 + s)

@torch.no_grad()
def ema_update(ema, model, step, max_decay=0.9999):
    """In place, as diffusers' EMAModel: ema <- ema - (1 - d) (ema - w), d = ema_decay(step), for
    each trained weight w, others copied; ema starts as a deepcopy, float, eval, frozen."""
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
