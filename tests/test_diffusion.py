"""Tests for diffusion.py: parity with diffusers' DDPM/DDIM schedulers and EMAModel (the
reference, skipped when diffusers is missing), v-prediction algebra, stitching, training helpers."""

import copy
import io
import math

import pytest
import torch

import diffusion
from diffusion import DDIM, DDPM, NULL_EF

try:
    import diffusers
    from diffusers.training_utils import EMAModel
except ImportError:
    diffusers = None
needs_diffusers = pytest.mark.skipif(diffusers is None, reason="diffusers (reference) missing")

SHAPE = (2, 8, 4, 6, 6)  # a small latent video batch [B, F, C, H, W]
# EchoNet-Synthetic's lvdm noise_scheduler config, given to diffusers.
REF_CONFIG = dict(
    num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
    variance_type="fixed_small", clip_sample=True, clip_sample_range=4.0,
    prediction_type="v_prediction", timestep_spacing="leading", steps_offset=0,
)  # fmt: skip


def reference(kind="ddpm", **overrides):
    """diffusers' scheduler built from the original's config plus overrides."""
    ddpm = diffusers.DDPMScheduler(**{**REF_CONFIG, **overrides})
    return ddpm if kind == "ddpm" else diffusers.DDIMScheduler.from_config(ddpm.config)


def fake_model(x_t, t):
    """A deterministic stand-in for the UNet; large enough at high t that x0 gets clipped."""
    return 3.0 * torch.sin(x_t) + int(t) / 200.0 - 1.0


def sample_loop(scheduler, n, generator, ref=False, **step_kwargs):
    """Runs n denoising steps of scheduler on fixed initial noise; returns the final sample."""
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(123))
    scheduler.set_timesteps(n)
    for t in scheduler.timesteps:
        out = scheduler.step(fake_model(x, t), t, x, generator=generator, **step_kwargs)
        x = out.prev_sample if ref else out
    return x


def gens(seed, n=None):
    """One seeded CPU generator, or a list of n with seeds seed, seed+1, ..."""
    if n is None:
        return torch.Generator().manual_seed(seed)
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


# --- schedule and timesteps ----------------------------------------------------------------------


@needs_diffusers
def test_schedule_equals_diffusers_bit_exact():
    """betas and alphas_cumprod are bit-identical to diffusers' for DDPM and DDIM."""
    for ours, ref in ((DDPM(), reference("ddpm")), (DDIM(), reference("ddim"))):
        assert torch.equal(ours.betas, ref.betas)
        assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)


def test_alpha_bar_reference_values():
    """alpha_bar matches the values recorded in reference/diffusers.md 4.1."""
    a = DDPM().alphas_cumprod
    assert a.dtype == torch.float32 and a.shape == (1000,)
    values = {0: 0.99989998, 930: 1.5510776e-4, 945: 1.1670701e-4, 999: 4.0358304e-5}
    for t, value in values.items():
        assert math.isclose(a[t].item(), value, rel_tol=1e-7)


def test_64_leading_timesteps_start_at_945():
    """64 leading steps are 945, 930, ..., 15, 0, int64, for DDPM and DDIM."""
    for scheduler in (DDPM(), DDIM()):
        scheduler.set_timesteps(64)
        assert scheduler.timesteps.dtype == torch.int64
        assert scheduler.timesteps.tolist() == list(range(945, -1, -15))


@needs_diffusers
def test_timesteps_equal_diffusers():
    """set_timesteps gives diffusers' "leading" timesteps for many step counts."""
    for n in (1, 7, 10, 25, 48, 50, 64, 100, 128, 333, 976, 1000):
        for kind, ours in (("ddpm", DDPM), ("ddim", DDIM)):
            ours, ref = ours(), reference(kind)
            ours.set_timesteps(n), ref.set_timesteps(n)
            assert torch.equal(ours.timesteps, ref.timesteps), (n, kind)
    ours, ref = DDPM(steps_offset=1), reference(steps_offset=1)
    ours.set_timesteps(50), ref.set_timesteps(50)
    assert torch.equal(ours.timesteps, ref.timesteps)


# --- forward process and v-prediction -----------------------------------------------------------


@needs_diffusers
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_add_noise_and_velocity_equal_diffusers(dtype):
    """add_noise and get_velocity equal diffusers' on 5-D latents with per-item timesteps."""
    g = gens(0)
    x0, noise = torch.randn(SHAPE, generator=g).to(dtype), torch.randn(SHAPE, generator=g).to(dtype)
    t = torch.tensor([3, 977])
    ours, ref = DDPM(), reference()
    assert torch.equal(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))
    assert torch.equal(ours.get_velocity(x0, noise, t), ref.get_velocity(x0, noise, t))
    assert ours.add_noise(x0, noise, t).dtype == dtype


def test_v_prediction_roundtrips():
    """x0 and eps rebuilt from (x_t, v) match the x0 and eps that produced them, for every t."""
    scheduler = DDPM()
    t = torch.arange(1000)
    x0, eps = torch.randn(1000, 3, 4, generator=gens(1)), torch.randn(1000, 3, 4, generator=gens(2))
    x_t, v = scheduler.add_noise(x0, eps, t), scheduler.get_velocity(x0, eps, t)
    a = scheduler.alphas_cumprod.view(-1, 1, 1)
    x0_v, eps_v = diffusion.predict_x0_eps(v, x_t, a)
    assert (x0_v - x0).abs().max() < 1e-5 and (eps_v - eps).abs().max() < 1e-5


# --- sampling loops against diffusers -----------------------------------------------------------


@needs_diffusers
@pytest.mark.parametrize("n", [10, 25, 50, 64, 100, 1000])
def test_ddpm_loop_equals_diffusers(n):
    """A whole DDPM loop (v-prediction, clip 4, leading) equals diffusers' with one generator."""
    ours = sample_loop(DDPM(), n, gens(7))
    ref = sample_loop(reference(), n, gens(7), ref=True)
    assert torch.equal(ours, ref)


@needs_diffusers
def test_ddpm_loop_with_generator_list_equals_diffusers():
    """One generator per video gives diffusers' result (noise drawn per item, then concatenated)."""
    ours = sample_loop(DDPM(), 64, gens(7, SHAPE[0]))
    ref = sample_loop(reference(), 64, gens(7, SHAPE[0]), ref=True)
    assert torch.equal(ours, ref)


@needs_diffusers
@pytest.mark.parametrize("n", [10, 50, 64, 100])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_loop_equals_diffusers(n, eta):
    """A whole DDIM loop equals diffusers' for eta 0 (no noise) and eta > 0 (same generator)."""
    ours = sample_loop(DDIM(eta=eta), n, gens(3))
    ref = sample_loop(reference("ddim"), n, gens(3), ref=True, eta=eta)
    assert torch.equal(ours, ref)


def reference_dpm():
    """diffusers' DPMSolverMultistepScheduler on the original's schedule, its own defaults."""
    return diffusers.DPMSolverMultistepScheduler(**{k: REF_CONFIG[k] for k in (
        "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")})


@needs_diffusers
def test_dpm_solver_timesteps_and_sigmas_equal_diffusers():
    """DPMSolver's "linspace" timesteps and sigmas equal diffusers' for every step count."""
    for n in range(1, 1000):
        ours, ref = diffusion.DPMSolver(), reference_dpm()
        ours.set_timesteps(n), ref.set_timesteps(n)
        assert torch.equal(ours.timesteps, ref.timesteps), n
        assert torch.equal(ours.sigmas, ref.sigmas), n


@needs_diffusers
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 25, 999])
def test_dpm_solver_loop_equals_diffusers(n):
    """A whole DPM-Solver++(2M) loop (first order first and last) equals diffusers' bit for bit,
    twice in a row on the same scheduler (sample.py reuses it for every batch)."""
    ours = diffusion.DPMSolver()
    for _ in range(2):
        assert torch.equal(sample_loop(ours, n, None), sample_loop(reference_dpm(), n, None, True))


@needs_diffusers
@pytest.mark.parametrize(
    "overrides",
    [
        dict(clip_sample=False),
        dict(clip_sample_range=1.0),
        dict(steps_offset=1),
        dict(num_train_timesteps=500, beta_start=2e-4, beta_end=0.03),
    ],
)
def test_other_configs_equal_diffusers(overrides):
    """Overridden configs still equal diffusers, for DDPM, DDIM eta 0 and DDIM eta 0.3."""
    ours = sample_loop(DDPM(**overrides), 25, gens(5))
    assert torch.equal(ours, sample_loop(reference(**overrides), 25, gens(5), ref=True))
    for eta in (0.0, 0.3):
        ours = sample_loop(DDIM(eta=eta, **overrides), 25, gens(5))
        ref = sample_loop(reference("ddim", **overrides), 25, gens(5), ref=True, eta=eta)
        assert torch.equal(ours, ref)


@needs_diffusers
def test_step_returns_clipped_x0_and_accepts_int_t():
    """step(return_x0=True) gives diffusers' clipped x0; int and 0-dim tensor t agree."""
    ours, ref = DDPM(), reference()
    ours.set_timesteps(64), ref.set_timesteps(64)
    x = torch.randn(SHAPE, generator=gens(0))
    out_ref = ref.step(fake_model(x, 945), torch.tensor(945), x, generator=gens(1))
    x_prev, x0 = ours.step(fake_model(x, 945), 945, x, generator=gens(1), return_x0=True)
    assert torch.equal(x_prev, out_ref.prev_sample)
    assert torch.equal(x0, out_ref.pred_original_sample)
    assert x0.min() == -4.0  # the fake model's x0 reaches the clip range at t = 945


def test_no_noise_drawn_at_t0_or_for_ddim_eta0():
    """The last DDPM step and every eta-0 DDIM step leave the generator untouched."""
    x = torch.randn(SHAPE, generator=gens(0))
    for scheduler in (DDPM(), DDIM()):
        scheduler.set_timesteps(64)
        g = gens(9)
        state = g.get_state()
        scheduler.step(fake_model(x, 0), 0, x, generator=g)
        if isinstance(scheduler, DDIM):
            scheduler.step(fake_model(x, 945), 945, x, generator=g)
        assert torch.equal(g.get_state(), state)


# --- training helpers ---------------------------------------------------------------------------


def test_offset_noise_is_one_offset_per_video_and_channel():
    """offset_noise = randn + 0.1 * randn(B, 1, C, 1, 1), drawn in that order from the generator."""
    x0 = torch.zeros(SHAPE)
    noise = diffusion.offset_noise(x0, 0.1, gens(4))
    g = gens(4)
    base = torch.randn(SHAPE, generator=g)
    offset = 0.1 * torch.randn(SHAPE[0], 1, SHAPE[2], 1, 1, generator=g)
    assert torch.equal(noise, base + offset)
    diff = noise - base  # constant over frames and pixels, different across channels
    assert torch.allclose(diff, diff[:, :1, :, :1, :1].expand_as(diff), atol=1e-6)
    assert diff[0, 0, :, 0, 0].unique().numel() == SHAPE[2]


def test_drop_ef_replaces_about_p_with_null_and_is_seeded():
    """drop_ef swaps about p of the items for NULL_EF, keeps the rest, same seed same mask."""
    ef = torch.rand(20000, generator=gens(0))
    out = diffusion.drop_ef(ef, 0.1, gens(1))
    dropped = out == NULL_EF
    assert abs(dropped.float().mean().item() - 0.1) < 0.01
    assert torch.equal(out[~dropped], ef[~dropped])
    assert torch.equal(out, diffusion.drop_ef(ef, 0.1, gens(1)))
    ef3 = ef[:8].view(8, 1, 1)  # the UNet's [B, 1, 1] layout
    assert torch.equal(diffusion.drop_ef(ef3, 0.0), ef3)
    assert (diffusion.drop_ef(ef3, 1.0) == NULL_EF).all()
    assert NULL_EF < 0  # outside the valid [0, 1]


def test_masked_mse_ignores_padded_frames():
    """Padded frames (index >= n_real, not >) do not change the loss; mean over real elements."""
    pred, target = torch.randn(3, 8, 4, 2, 2, generator=gens(0)), torch.randn(3, 8, 4, 2, 2)
    n_real = torch.tensor([8, 5, 1])
    loss = diffusion.masked_mse(pred, target, n_real)
    changed = pred.clone()
    changed[1, 5:], changed[2, 1:] = 1e6, -1e6  # frame 5 of item 1 is padding: < n_real, not <=
    assert torch.equal(diffusion.masked_mse(changed, target, n_real), loss)
    err = (pred - target) ** 2
    expected = torch.cat([err[0, :8].flatten(), err[1, :5].flatten(), err[2, :1].flatten()]).mean()
    assert torch.allclose(loss, expected, rtol=1e-6)
    assert torch.allclose(diffusion.masked_mse(pred, target), err.mean())


def test_guidance_formula():
    """guided = v_uncond + s (v_cond - v_uncond). (That sample() doubles the batch with NULL_EF:
    tests/test_sample.py, test_guidance_mixes_in_the_null_ef_prediction.)"""
    v_c, v_u = torch.randn(2, 3, generator=gens(0)), torch.randn(2, 3, generator=gens(1))
    assert torch.equal(diffusion.guided(v_c, v_u, 2.5), v_u + 2.5 * (v_c - v_u))
    assert torch.allclose(diffusion.guided(v_c, v_u, 1.0), v_c, atol=1e-6)
    assert torch.equal(diffusion.guided(v_c, v_u, 0.0), v_u)


# --- long videos --------------------------------------------------------------------------------


def test_window_starts_concrete_numbers():
    """192 frames -> 5 windows at 0, 32, 64, 96, 128; 64 -> one; 96 -> two; <= 64 -> one."""
    assert diffusion.window_starts(192) == [0, 32, 64, 96, 128]
    assert diffusion.window_starts(128) == [0, 32, 64]
    assert diffusion.window_starts(96) == [0, 32]
    assert diffusion.window_starts(64) == [0] and diffusion.window_starts(32) == [0]
    assert [diffusion.round_frames(f) for f in (1, 32, 33, 100, 192)] == [32, 32, 64, 128, 192]


def test_split_windows_window_major_and_merge_rule():
    """split gives [R*B, 64, ...] window-major (the original's layout); merge takes window 0
    whole then frames 32-63 of each later window of the same video."""
    B, frames = 2, 192
    x = torch.arange(B * frames).view(B, frames, 1).float()  # value = video * 192 + frame
    w = diffusion.split_windows(x)
    assert w.shape == (B * 5, 64, 1)
    assert w[:, 0, 0].tolist() == [0, 192, 32, 224, 64, 256, 96, 288, 128, 320]
    assert torch.equal(diffusion.merge_windows(w, B, frames), x)  # merge(split(x)) = x
    # Which window each output frame comes from: tag every window with its index.
    tags = torch.arange(B * 5).view(-1, 1, 1).expand(-1, 64, 1).float()
    source = diffusion.merge_windows(tags, B, frames)[0, :, 0]
    expected = [0] * 64 + [2] * 32 + [4] * 32 + [6] * 32 + [8] * 32  # video 0: windows 0, 2, ..
    assert source.tolist() == expected


def test_short_videos_are_one_window():
    """frames <= 64: the window is the video itself (32 frames stay 32, no padding to 64)."""
    x = torch.randn(3, 32, 4, 2, 2)
    assert diffusion.split_windows(x) is x
    assert diffusion.merge_windows(x, 3, 32) is x


# --- EMA ----------------------------------------------------------------------------------------


def small_model():
    """A small module with a frozen parameter and a buffer, seeded."""
    with torch.random.fork_rng():  # seeded init without touching the global RNG state
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(3, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 2)
        )
    model[2].bias.requires_grad_(False)
    return model


def fake_optimizer_step(model, g):
    """Moves every parameter (frozen ones too) and the buffers, like a training step."""
    with torch.no_grad():
        for p in list(model.parameters()) + [model[1].running_mean]:
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_ema_decay_schedule_values():
    """The decay is 0 at step 1, then (1+s)/(10+s), capped at 0.9999 (diffusers EMAModel)."""
    values = {k: diffusion.ema_decay(k) for k in (1, 2, 3, 10, 100, 1000, 89991, 10**6)}
    assert values[1] == 0.0 and values[10**6] == 0.9999 and values[89991] == 0.9999
    assert [round(values[k], 5) for k in (2, 3, 10, 100, 1000)] == [
        0.18182, 0.25, 0.52632, 0.91743, 0.99108,
    ]  # fmt: skip


def ema_copy(model):
    """The EMA as train.py starts it: an exact fp32 copy, in eval mode, without gradients."""
    return copy.deepcopy(model).float().eval().requires_grad_(False)


@needs_diffusers
def test_ema_equals_diffusers_emamodel():
    """EMA weights equal diffusers' EMAModel shadow params after every one of 15 steps."""
    model, g = small_model(), gens(0)
    ema, ref = ema_copy(model), EMAModel(model.parameters())
    for step in range(1, 16):
        fake_optimizer_step(model, g)
        diffusion.ema_update(ema, model, step), ref.step(model.parameters())
        for ours, theirs in zip(ema.parameters(), ref.shadow_params):
            assert torch.equal(ours, theirs)
    assert torch.equal(ema[1].running_mean, model[1].running_mean)  # buffers copied
    assert torch.equal(ema[2].bias, model[2].bias)  # a frozen parameter is copied


def test_ema_state_dict_resume_continues_identically():
    """An EMA restored from its state dict continues with the same weights at the same step."""
    model, g = small_model(), gens(0)
    ema = ema_copy(model)
    for step in range(1, 6):
        fake_optimizer_step(model, g), diffusion.ema_update(ema, model, step)
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    resumed = ema_copy(small_model())
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for step in range(6, 11):
        fake_optimizer_step(model, g)
        diffusion.ema_update(ema, model, step), diffusion.ema_update(resumed, model, step)
    for a, b in zip(ema.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: DDIM(eta=-1.0), "eta"),
        (lambda: DDPM(beta_start=0.03, beta_end=0.02), "beta"),
        (lambda: DDPM().set_timesteps(1001), "1000"),
        (lambda: DDIM().set_timesteps(0), "set_timesteps"),
        (lambda: diffusion.DPMSolver().set_timesteps(1000), "999"),
        (lambda: DDIM().step(torch.zeros(1), 999, torch.zeros(1)), "set_timesteps"),
        (lambda: diffusion.window_starts(100), "round"),
        (lambda: diffusion.merge_windows(torch.zeros(4, 64), 1, 192), "merge_windows"),
        (lambda: diffusion.drop_ef(torch.zeros(3), 1.5), "p="),
        (lambda: diffusion.offset_noise(torch.zeros(2, 4, 8, 8)), "B, F, C, H, W"),
        (lambda: diffusion.randn((3, 2), gens(0, 2)), "generators"),
    ],
)
def test_bad_arguments_raise_clear_value_errors(call, message):
    """Unsupported options and bad shapes raise ValueError naming the problem."""
    with pytest.raises(ValueError, match=message):
        call()


def test_step_rejects_t_not_in_timesteps():
    """DDPM.step after set_timesteps refuses a t that is not one of the timesteps."""
    scheduler = DDPM()
    scheduler.set_timesteps(64)
    with pytest.raises(ValueError, match="not one of the timesteps"):
        scheduler.step(torch.zeros(1), 944, torch.zeros(1))
