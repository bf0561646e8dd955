"""sample.py: the sampling loop against a diffusers reference loop built like the original's
echosyn/lvdm/sample.py, the files it writes, resuming, seeding and bad input.

Models are the tiny presets with perturbed random weights; windows are 8 frames every 4 (the
tiny UNet's num_frames), so 16 frames stitch 3 windows as 192 frames stitch 5 in the paper run.
"""

import argparse
import csv
import dataclasses
import json
import os
import subprocess
import sys

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from PIL import Image

import data
import diffusion
import model
import sample

try:
    import diffusers
    import diffusers.schedulers.scheduling_ddpm as ddpm_module
except ImportError:
    diffusers = None
needs_diffusers = pytest.mark.skipif(diffusers is None, reason="diffusers (reference) missing")


def perturb(module, scale, seed=0):
    """Noise on every weight, so no layer is zero and no mix factor sits at 0.5."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny UNet and VAE model folders (written by diffusers when it is installed) and a
    conditioning folder of three [4, 14, 14] latents."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    unet_config = dataclasses.asdict(model.UNET_PRESETS["tiny"])
    vae_config = dataclasses.asdict(model.VAE_PRESETS["tiny"])
    if diffusers is not None:
        unet = diffusers.UNetSpatioTemporalConditionModel(**unet_config)
        vae = diffusers.AutoencoderKL(**vae_config)
    else:
        unet = model.UNetSpatioTemporal(model.UNET_PRESETS["tiny"])
        vae = model.AutoencoderKL(model.VAE_PRESETS["tiny"])
    perturb(unet, 0.05).save_pretrained(root / "unet")
    perturb(vae, 0.02, seed=1).save_pretrained(root / "vae")
    os.makedirs(root / "cond")
    g = torch.Generator().manual_seed(2)
    for name in ("b", "a", "c"):
        torch.save(torch.randn(4, 14, 14, generator=g), root / "cond" / f"{name}.pt")
    return root


def run(folders, out, *extra):
    sample.main(["--unet", str(folders / "unet"), "--vae", str(folders / "vae"),
                 "--conditioning", str(folders / "cond"), "--output", str(out),
                 "--num_steps", "2", "--frames", "8", *extra])


# --- the loop against the original's --------------------------------------------------------

def original_loop(unet, scheduler, cond, ef, noise, frames, T, ef_order):
    """The denoising loop of EchoNet-Synthetic's sample.py with diffusers' UNet and scheduler:
    [B, C, F, H, W] latents, conditioning frame repeated over F and concatenated on channels,
    replicate padding 14 -> 16, windows of T frames every T - T // 2 stacked window-major, one
    UNet call, window 0 whole then frames T // 2.. of the others, crop, scheduler.step without a
    generator. Its 64/32 constants are T and T // 2 here. ef_order "original" repeats the EF
    batch-major as the original does; "fixed" repeats it window-major, matching the windows."""
    B, C, H, W = cond.shape
    OT = T // 2
    TR = (frames - T) // (T - OT) + 1 if frames > T else 1
    latents = noise((B, C, frames, H, W))
    lvefs = ef[:, None, None]
    lvefs = lvefs.repeat_interleave(TR, 0) if ef_order == "original" else lvefs.repeat(TR, 1, 1)
    added_time_ids = torch.zeros(B * TR, 1)
    cond_frames = cond[:, :, None].repeat(1, 1, frames, 1, 1)
    for t in scheduler.timesteps:
        x = torch.cat([scheduler.scale_model_input(latents, t), cond_frames], dim=1)
        pad = (2**3 - x.shape[-1] % 2**3) // 2
        x = nnf.pad(x, (pad, pad, pad, pad, 0, 0), mode="replicate").permute(0, 2, 1, 3, 4)
        inputs = torch.cat([x[:, r * (T - OT):r * (T - OT) + T] for r in range(TR)], dim=0)
        pred = unet(inputs, t, encoder_hidden_states=lvefs, added_time_ids=added_time_ids).sample
        outputs = torch.chunk(pred, TR, dim=0)
        pred = torch.cat([o if r == 0 else o[:, OT:] for r, o in enumerate(outputs)], dim=1)
        pred = pred.permute(0, 2, 1, 3, 4)[..., pad:-pad, pad:-pad]
        latents = scheduler.step(pred, t, latents).prev_sample
    return latents.permute(0, 2, 1, 3, 4)  # [B, F, C, H, W]


def compare_with_original(folders, monkeypatch, B, sampler, ef_order, frames=16, steps=3):
    ref = diffusers.UNetSpatioTemporalConditionModel.from_pretrained(folders / "unet").eval()
    ours = model.load_model(str(folders / "unet"))
    ref.requires_grad_(False), ours.requires_grad_(False)  # same grad state: same matmul path
    config = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                  variance_type="fixed_small", clip_sample=True, clip_sample_range=4.0,
                  prediction_type="v_prediction", timestep_spacing="leading", steps_offset=0)
    ref_scheduler = diffusers.DDPMScheduler(**config)
    scheduler = diffusion.DDPM()
    if sampler == "ddim":
        ref_scheduler, scheduler = diffusers.DDIMScheduler.from_config(config), diffusion.DDIM()
    ref_scheduler.set_timesteps(steps), scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(3)
    # 6x6 latents (padded to 8x8) rather than 14x14 (padded to 16x16): the same code, 4x cheaper.
    cond, ef = torch.randn(B, 4, 6, 6, generator=g), torch.tensor([0.2, 0.85, 0.5][:B])

    # The same noise on both sides: the reference's initial latents and its scheduler's noise
    # (the original's step draws from the global RNG) come from our per-video generators.
    twins = [data.item_generator(0, i) for i in range(B)]
    noise = lambda shape, *a, **k: diffusion.randn(  # noqa: E731
        (B, shape[2], shape[1], *shape[3:]), twins).permute(0, 2, 1, 3, 4)
    monkeypatch.setattr(ddpm_module, "randn_tensor", noise)
    with torch.no_grad():
        expected = original_loop(ref, ref_scheduler, cond, ef, noise, frames, 8, ef_order)
        got = diffusion.sample(ours, scheduler, cond, ef,
                                    [data.item_generator(0, i) for i in range(B)], frames, 8, 4)
    return got, expected


@needs_diffusers
@pytest.mark.parametrize("B, sampler, ef_order", [(2, "ddpm", "fixed"), (1, "ddpm", "original"),
                                                  (1, "ddim", "original")])
def test_sampling_loop_equals_original(folders, monkeypatch, B, sampler, ef_order):
    """With the same UNet, conditioning, EFs and noise, our stitched loop (3 windows) gives the
    original's latents exactly (B = 1: the original's exact EF order)."""
    got, expected = compare_with_original(folders, monkeypatch, B, sampler, ef_order)
    assert got.shape == expected.shape == (B, 16, 4, 6, 6)
    assert torch.equal(got, expected), (got - expected).abs().max()


@needs_diffusers
def test_original_ef_order_gives_windows_another_videos_ef(folders, monkeypatch):
    """The original stacks windows window-major but repeats EF batch-major: with 2 videos of
    different EF, some windows get the other video's EF (a bug we do not copy)."""
    got, expected = compare_with_original(folders, monkeypatch, 2, "ddpm", "original", steps=1)
    assert (got - expected).abs().max() > 1e-3


@needs_diffusers
def test_decode_equals_original(folders):
    """Decoding equals the original's: diffusers' VAE on latents / scaling_factor, (x + 1) * 128,
    clamped, truncated to uint8 (at most 1 level apart, where rounding straddles an integer)."""
    ref = diffusers.AutoencoderKL.from_pretrained(folders / "vae").eval()
    ours = model.load_model(str(folders / "vae"))
    z = torch.randn(1, 3, 4, 14, 14, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        x = ref.decode(z[0] / ref.config.scaling_factor).sample
        expected = ((x + 1) * 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        got = data.decode(ours, z, chunk=2)
    assert got.shape == (1, 3, 112, 112, 3) and got.dtype == np.uint8
    assert np.abs(got[0].astype(int) - expected).max() <= 1


def test_guidance_mixes_in_the_null_ef_prediction():
    """With guidance s the UNet also sees NULL_EF and the step gets v_u + s (v_c - v_u): for a
    stand-in UNet whose v is its EF, that is a plain run at EF NULL_EF + s (ef - NULL_EF)."""
    def unet(x, t, ef, ids):  # [N, F, 8, h, w] -> v = ef everywhere, [N, F, 4, h, w]
        return x[:, :, :4] * 0 + ef.view(-1, 1, 1, 1, 1)

    cond, ef, s = torch.randn(2, 4, 6, 6), torch.tensor([0.3, 0.7]), 2.5
    runs = []
    for e, guidance in ((ef, s), (diffusion.NULL_EF + s * (ef - diffusion.NULL_EF), 1.0)):
        scheduler = diffusion.DDPM()
        scheduler.set_timesteps(3)
        gens = [data.item_generator(1, i) for i in range(2)]
        runs.append(diffusion.sample(unet, scheduler, cond, e, gens, 12, 8, 4, guidance))
    torch.testing.assert_close(runs[0], runs[1], atol=1e-6, rtol=0)


def test_residual_unet_samples_motion_around_the_conditioning_frame():
    """A UNet trained with --residual k denoises k (x0 - cond): diffusion.sample returns
    cond + x / k, where x is the plain sampler's output with its x0 clip widened to 4 k; and
    sample.py reads k from the training config of a checkpoint or an exported folder."""
    def unet(x, t, ef, ids):  # a v that drives x0 far past +-4, so the clip matters
        return x[:, :, :4] * 0 - 30.0 * ef.view(-1, 1, 1, 1, 1)

    cond, ef, k = torch.randn(2, 4, 6, 6), torch.tensor([0.3, 0.7]), 8.0
    runs = []
    for residual, clip in ((k, 4.0), (0.0, 4.0 * k)):
        scheduler = diffusion.DDIM(clip_sample_range=clip)
        scheduler.set_timesteps(4)
        gens = [data.item_generator(1, i) for i in range(2)]
        runs.append(diffusion.sample(unet, scheduler, cond, ef, gens, 8, 8, 4, 1.0,
                                     residual=residual))
    assert runs[1].abs().max() > 4.0  # the widened clip let x0 past +-4
    assert torch.equal(runs[0], cond[:, None] + runs[1] / k)


def test_trained_residual_read_from_checkpoint_or_export(tmp_path):
    for folder, content in (("ck", {"residual": 8.0}), ("ex", {"config": {"residual": 4.0}}),
                            ("paper", {"config": {}}), ("published", None)):
        os.makedirs(tmp_path / folder)
        if content is not None:
            (tmp_path / folder / "training_config.json").write_text(json.dumps(content))
    got = [sample.trained_residual(str(tmp_path / f)) for f in ("ck", "ex", "paper", "published")]
    assert got == [8.0, 4.0, 0.0, 0.0]


# --- files -------------------------------------------------------------------------------------

def test_outputs_readable_and_filelist_matches(folders, tmp_path):
    """jpg folders read as StyleGAN-V reads them (sorted sample_XXXXXX/0000.jpg, 112x112x3),
    avi/mp4 decode with PyAV to the same frame count and size, gif/png/pt are complete, and
    FileList.csv lists exactly the videos with the frame count (not the batch size)."""
    out = tmp_path / "out"
    run(folders, out, "--num_samples", "2", "--batch_size", "2", "--frames", "10",
        "--save_as", "avi,mp4,gif,jpg,png,pt")
    names = ["sample_000000", "sample_000001"]
    assert sorted(os.listdir(out / "jpg")) == names
    for name in names:
        frames = sorted(os.listdir(out / "jpg" / name))
        assert frames == [f"{i:04d}.jpg" for i in range(12)]  # 10 rounded up to 12 (stride 4)
        for f in frames:
            assert np.array(Image.open(out / "jpg" / name / f)).shape == (112, 112, 3)
        assert len(os.listdir(out / "png" / name)) == 12
        for fmt in ("avi", "mp4"):
            with av.open(str(out / fmt / f"{name}.{fmt}")) as container:
                decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
            assert len(decoded) == 12 and decoded[0].shape == (112, 112, 3)
        assert Image.open(out / "gif" / f"{name}.gif").n_frames == 12
        assert torch.load(out / "pt" / f"{name}.pt").shape == (12, 4, 14, 14)
    with open(out / "FileList.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["FileName"] for r in rows] == names
    for r in rows:
        assert (r["FrameHeight"], r["FrameWidth"], r["FPS"], r["NumberOfFrames"], r["Split"]) == \
            ("112", "112", "32", "12", "TRAIN")
        assert 10 <= int(r["EF"]) <= 90
    assert not [n for fmt in sample.FORMATS if (out / fmt).is_dir()
                for n in os.listdir(out / fmt) if n.endswith(".tmp")]


def test_reproducibility_promise(folders, tmp_path):
    """The README's promise: the same command gives byte-identical files; at another batch size
    the latents agree to about 2e-6 and decoded frames differ by a few grey levels at most."""
    files = {}
    for out, batch in (("a", "4"), ("b", "4"), ("c", "1")):
        run(folders, tmp_path / out, "--num_samples", "4", "--batch_size", batch, "--save_as",
            "pt,jpg")
        root = tmp_path / out
        files[out] = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
                      if p.is_file() and p.name != ".lock"}
    assert files["a"] == files["b"] and len(files["a"]) == 4 + 4 * 8 + 2  # + FileList, settings
    for name in [n for n in files["a"] if n.startswith("pt/")]:
        a, c = (torch.load(tmp_path / d / name) for d in ("a", "c"))
        torch.testing.assert_close(a, c, atol=1e-5, rtol=0)
    grey = [np.abs(np.array(Image.open(tmp_path / "a" / n), np.int16)
                   - np.array(Image.open(tmp_path / "c" / n), np.int16)).max()
            for n in files["a"] if n.startswith("jpg/")]
    assert max(grey) <= 4, grey


def test_resume_gives_the_same_videos_as_an_unbroken_run(folders, tmp_path, monkeypatch):
    """A run killed part-way (one video done, one half-written) and started again, at other
    batch sizes, ends with the same 4 videos and FileList as an unbroken run."""
    run(folders, tmp_path / "a", "--num_samples", "4", "--batch_size", "4", "--save_as", "pt,jpg")

    calls, save_video = [], sample.data.save_video

    def killed_at_the_second_video(path, frames, fps, fmt):
        calls.append(path)
        if len(calls) == 2:  # batch 1 (videos 0-2): 0 finished, 1 has pt only, 2 nothing
            open(path + ".tmp", "w").close()  # a temporary file left behind
            raise KeyboardInterrupt
        save_video(path, frames, fps, fmt)

    monkeypatch.setattr(sample.data, "save_video", killed_at_the_second_video)
    with pytest.raises(SystemExit, match="interrupted"):
        run(folders, tmp_path / "b", "--num_samples", "4", "--batch_size", "3", "--save_as",
            "pt,jpg")
    assert sorted(os.listdir(tmp_path / "b" / "pt")) == ["sample_000000.pt", "sample_000001.pt"]
    monkeypatch.setattr(sample.data, "save_video", save_video)
    run(folders, tmp_path / "b", "--num_samples", "4", "--batch_size", "2", "--save_as", "pt,jpg")

    for i in range(4):
        name = f"sample_{i:06d}"
        a, b = (torch.load(tmp_path / d / "pt" / f"{name}.pt") for d in ("a", "b"))
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)  # batch size changes float rounding
        assert len(os.listdir(tmp_path / "b" / "jpg" / name)) == 8
    assert (tmp_path / "a" / "FileList.csv").read_text() == \
        (tmp_path / "b" / "FileList.csv").read_text()
    assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path / "b" / "jpg"))


def test_conditioning_files_taken_in_turn_in_name_order(folders):
    """Video i uses file i mod N of the sorted names (a.pt, b.pt, c.pt, a.pt, ...)."""
    paths = sample.list_conditioning(str(folders / "cond"))
    assert [os.path.basename(paths[i % len(paths)][0]) for i in range(5)] == \
        ["a.pt", "b.pt", "c.pt", "a.pt", "b.pt"]


def test_image_conditioning_is_a_seeded_posterior_sample(folders, tmp_path):
    """Frames are encoded as the original: x / 128 - 1, a posterior sample (from the video's own
    generator) times the scaling factor; gray and png files work."""
    frame = np.random.default_rng(0).integers(0, 256, (112, 112), dtype=np.uint8)
    Image.fromarray(frame).save(tmp_path / "f.png")
    vae = model.load_model(str(folders / "vae"))
    with torch.no_grad():
        got = sample.conditioning([(str(tmp_path / "f.png"), 0)], (4, 14, 14), vae,
                                  [data.item_generator(5, 7)], "cpu")
        x = torch.from_numpy(frame).float()[None, None].repeat(1, 3, 1, 1) / 128 - 1
        expected = vae.encode(x).sample(data.item_generator(5, 7)) * vae.config.scaling_factor
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


# --- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("case, message", [
    ("missing conditioning", "missing --conditioning"),
    ("empty conditioning", "no .pt latents"),
    ("wrong latent shape", "shape (4, 16, 16), expected (4, 14, 14)"),
    ("vae as unet", "holds a AutoencoderKL, expected a UNetSpatioTemporalConditionModel"),
    ("missing vae", "HReynaud/EchoNet-Synthetic"),
    ("min above max", "need 0 <= min_lvef <= max_lvef <= 100"),
    ("ef above 100", "need 0 <= min_lvef <= max_lvef <= 100"),
    ("dpm 1000 steps", "--num_steps 1000: --sampler dpm takes at most 999"),
    ("settings changed", "other settings (seed 0 -> 1)"),
])
def test_bad_input_gives_one_line_error(folders, tmp_path, capsys, case, message):
    """Bad input exits non-zero with a one-line message naming the problem, no traceback."""
    cond, unet, vae = folders / "cond", folders / "unet", folders / "vae"
    extra = []
    if case == "missing conditioning":
        cond = tmp_path / "nowhere"
    elif case == "empty conditioning":
        cond = tmp_path / "empty"
        os.makedirs(cond)
    elif case == "wrong latent shape":
        cond = tmp_path / "wrong"
        os.makedirs(cond)
        torch.save(torch.zeros(4, 16, 16), cond / "x.pt")
    elif case == "vae as unet":
        unet = vae
    elif case == "missing vae":
        vae = tmp_path / "no-vae"
    elif case == "min above max":
        extra = ["--min_lvef", "60", "--max_lvef", "40"]
    elif case == "ef above 100":
        extra = ["--max_lvef", "120"]
    elif case == "dpm 1000 steps":
        extra = ["--sampler", "dpm", "--num_steps", "1000"]
    elif case == "settings changed":  # a folder with a video of seed 0
        extra = ["--frames", "8", "--save_as", "pt", "--num_samples", "1"]
        sample.main(["--unet", str(unet), "--vae", str(vae), "--conditioning", str(cond),
                     "--output", str(tmp_path / "out"), "--num_steps", "1", *extra])
        extra += ["--seed", "1"]
    with pytest.raises(SystemExit) as e:
        sample.main(["--unet", str(unet), "--vae", str(vae), "--conditioning", str(cond),
                     "--output", str(tmp_path / "out"), "--num_steps", "1", *extra])
    assert e.value.code not in (0, None)
    assert str(e.value).startswith("error: ") and message in str(e.value)
    assert "\n" not in str(e.value) and "Traceback" not in capsys.readouterr().err


def test_dpm_sampler_runs_and_differs_from_ddim(folders, tmp_path):
    """--sampler dpm writes finite latents over the same timesteps' count that differ from
    DDIM's (its second-order steps), and records the sampler in the run's settings."""
    for sampler in ("dpm", "ddim"):
        run(folders, tmp_path / sampler, "--num_samples", "1", "--save_as", "pt",
            "--sampler", sampler, "--num_steps", "3")
    dpm, ddim = (torch.load(tmp_path / s / "pt" / "sample_000000.pt") for s in ("dpm", "ddim"))
    assert torch.isfinite(dpm).all() and dpm.shape == ddim.shape and not torch.equal(dpm, ddim)
    with open(tmp_path / "dpm" / "settings.json") as f:
        assert json.load(f)["sampler"] == "dpm"


def test_unknown_format_is_a_usage_error(capsys):
    """--save_as with an unknown format is refused by the argument parser (exit 2)."""
    with pytest.raises(SystemExit) as e:
        sample.main(["--save_as", "avi,webm"])
    assert e.value.code == 2 and "choose from avi,mp4,gif,jpg,png,pt" in capsys.readouterr().err


# --- issue 14: settings recorded, numbers checked, one run per folder ----------------------------

@pytest.mark.parametrize("flag, value", [("guidance", "nan"), ("guidance", "inf"),
                                         ("guidance", "-1"), ("fps", "nan"), ("fps", "0"),
                                         ("num_steps", "1001"), ("decode_chunk", "0"),
                                         ("seed", "-1"), ("batch_size", "0"),
                                         ("ef_shift", "nan"), ("ef_shift", "60")])
def test_numeric_flags_must_be_finite_and_in_range(folders, tmp_path, flag, value):
    """Every numeric flag is checked before any work: NaN, inf and out-of-range values give a
    one-line error naming the flag, and no output folder is made."""
    with pytest.raises(SystemExit) as e:
        run(folders, tmp_path / "out", f"--{flag}", value)
    assert str(e.value).startswith(f"error: --{flag} ") and "must be a finite number" in \
        str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_ef_shift_moves_only_the_ef_the_unet_sees(folders, tmp_path, monkeypatch):
    """--ef_shift adds EF points to what the UNet is given, not to what FileList.csv records
    (the requested EF, which is scored); 0 leaves the run as it was, settings.json included."""
    seen, real_sample = [], diffusion.sample
    def spy(unet, scheduler, x, ef, *args):
        seen.append(ef.clone())
        return real_sample(unet, scheduler, x, ef, *args)
    monkeypatch.setattr(diffusion, "sample", spy)
    for shift in ("0", "5"):
        run(folders, tmp_path / shift, "--num_samples", "2", "--save_as", "pt",
            "--num_steps", "2", "--ef_shift", shift)
    lists = [(tmp_path / s / "FileList.csv").read_text() for s in ("0", "5")]
    assert lists[0] == lists[1]
    efs = [int(r["EF"]) for r in csv.DictReader(lists[0].splitlines())]
    assert torch.equal(seen[0], torch.tensor(efs) / 100)          # bit for bit as without it
    assert torch.allclose(seen[1], (torch.tensor(efs) + 5.0) / 100)
    settings = [json.loads((tmp_path / s / "settings.json").read_text()) for s in ("0", "5")]
    assert "ef_shift" not in settings[0] and settings[1]["ef_shift"] == 5.0


def test_resume_at_another_fps_is_refused(folders, tmp_path):
    """--fps changes the written files, so it is recorded: a folder of 32 fps videos refuses
    --fps 16 (it would mix 16 and 32 fps videos under one FileList FPS)."""
    run(folders, tmp_path / "out", "--num_samples", "1", "--save_as", "pt")
    with pytest.raises(SystemExit, match=r"other settings \(fps 32 -> 16.0\)"):
        run(folders, tmp_path / "out", "--num_samples", "2", "--save_as", "pt", "--fps", "16")
    assert os.listdir(tmp_path / "out" / "pt") == ["sample_000000.pt"]


def test_run_failing_before_its_first_video_does_not_block_the_fix(folders, tmp_path):
    """A run that stops before writing any video (here: its second conditioning file has the
    wrong shape) leaves settings that do not refuse the corrected command (another seed and
    conditioning folder)."""
    bad = tmp_path / "bad"
    os.makedirs(bad)
    torch.save(torch.zeros(4, 14, 14), bad / "a.pt")
    torch.save(torch.zeros(4, 16, 16), bad / "b.pt")
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="b.pt: shape"):
        sample.main(["--unet", str(folders / "unet"), "--vae", str(folders / "vae"),
                     "--conditioning", str(bad), "--output", str(out), "--num_steps", "2",
                     "--frames", "8", "--num_samples", "2", "--save_as", "pt", "--seed", "1"])
    assert (out / "settings.json").is_file() and not os.listdir(out / "pt")
    run(folders, out, "--num_samples", "2", "--save_as", "pt", "--seed", "2")
    assert sorted(os.listdir(out / "pt")) == ["sample_000000.pt", "sample_000001.pt"]


def test_second_run_into_a_locked_folder_is_refused_and_a_dead_holders_lock_taken_over(
        folders, tmp_path):
    """While another process holds <output>/.lock the run is refused with a one-line message
    naming the holder's pid; once that process is dead (killed), its lock is taken over."""
    out = tmp_path / "out"
    os.makedirs(out)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys\n"
        f"f = open({str(out / '.lock')!r}, 'a+')\n"
        "fcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.truncate(0); f.write(f'pid {os.getpid()} on here'); f.flush()\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(SystemExit) as e:
            run(folders, out, "--num_samples", "1", "--save_as", "pt")
        assert f"in use by another run (pid {holder.pid} on here" in str(e.value)
        assert "\n" not in str(e.value) and not (out / "pt").exists()
    finally:
        holder.kill()
        holder.wait()
    run(folders, out, "--num_samples", "1", "--save_as", "pt")
    assert os.listdir(out / "pt") == ["sample_000000.pt"]
    assert (out / ".lock").read_text().startswith(f"pid {os.getpid()} on ")


def test_cond_frame_ed_takes_each_test_heart_at_end_diastole(tmp_path):
    """--cond_frame ed: the frame of a TEST phantom's largest measured cavity is one the
    generator drew at end-diastole (contraction level 0), and that frame of its latent video is
    the conditioning latent."""
    rows = data.make_phantom(str(tmp_path), num_videos=20, seed=3)
    for r in rows:  # a latent video whose frame t is filled with t
        t = torch.arange(r["NumberOfFrames"], dtype=torch.float32)
        os.makedirs(tmp_path / "Latents", exist_ok=True)
        torch.save(t[:, None, None, None].expand(-1, 4, 14, 14).clone(),
                   tmp_path / "Latents" / f"{r['FileName']}.pt")
    items = sample.list_conditioning(str(tmp_path), "ed")
    assert len(items) == 2 and [i for _, i in sample.list_conditioning(str(tmp_path))] == [0, 0]
    for path, frame in items:
        index = int(os.path.basename(path)[len("phantom_"):-3])
        rng = np.random.default_rng([3, index])
        n, fps = int(rng.integers(112, 251)), int(rng.integers(45, 56))
        level = data.heart_motion(rng, n, fps)[2]
        assert level[frame] == 0 and level.max() > 0
        assert sample.read_conditioning((path, frame), (4, 14, 14)).unique().tolist() == [frame]


def test_demo_calibration_uses_only_val_hearts_and_other_efs(tmp_path, monkeypatch):
    """benchmarks/time_to_quality.py calibrate (make demo's GUIDANCE=auto): conditioning latents
    of the VAL phantoms only, each at its end-diastolic frame; sampling at seed + 1000; the
    guidance of the smallest EF MAE among the candidates and the scale where their EF slopes'
    line reaches 1 is printed and recorded, with the EF shift that cancels its mean error."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("time_to_quality", os.path.join(
        os.path.dirname(__file__), "..", "benchmarks", "time_to_quality.py"))
    ttq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ttq)
    rows = data.make_phantom(str(tmp_path / "w"), num_videos=20, seed=3)
    os.makedirs(tmp_path / "w" / "Latents")
    for r in rows:
        t = torch.arange(r["NumberOfFrames"], dtype=torch.float32)
        torch.save(t[:, None, None, None].expand(-1, 4, 14, 14).clone(),
                   tmp_path / "w" / "Latents" / f"{r['FileName']}.pt")
    calls = []
    def score(unet, args, out, guidance, sampler, steps, cond=None):
        # a model whose EF slope rises 0.4 per unit of guidance, 1 at 2.5
        calls.append((guidance, args.seed, cond))
        os.makedirs(out)
        slope = 1 + 0.4 * (guidance - 2.5)
        with open(os.path.join(out, "ef_measured.csv"), "w") as f:
            f.write("FileName,RequestedEF,MeasuredEF\n" + "".join(
                f"{n},{ef:.2f},{46 + slope * (ef - 50):.2f}\n" for n, ef in enumerate([20, 80, 50]))
                + "x,60.00,nan\n")
        error = abs(1 - slope) * 20
        return {"ef_mae": abs(error) + 1}
    monkeypatch.setattr(ttq, "score", score)
    args = argparse.Namespace(unet="u", data=str(tmp_path / "w"), out=str(tmp_path / "c"),
                              seed=7, candidates=[1.5, 3.0], sampler="dpm", steps=8,
                              samples=16, refine=True, refine_range=[1.0, 6.0])
    os.makedirs(args.out)
    ttq.calibrate(args)
    # the two candidates, then where the line through their EF slopes reaches 1
    assert [(g, s) for g, s, _ in calls] == [(1.5, 1007), (3.0, 1007), (2.5, 1007)]
    val = sorted(r["FileName"] for r in rows if r["Split"] == "VAL")
    assert sorted(n[:-3] for n in os.listdir(calls[0][2])) == val
    for name in val:
        frame = int(torch.load(os.path.join(calls[0][2], name + ".pt")).flatten()[0])
        assert frame == data.end_diastole(args.data, name)
    with open(tmp_path / "c" / "calibrate.json") as f:
        saved = json.load(f)
    assert saved["guidance"] == 2.5 and abs(saved["val_ef_slope"]["1.5"] - 0.6) < 1e-3
    # the videos land 4 points low at every scale: the shift that cancels it is +4
    assert saved["ef_shift"] == 4.0 and (tmp_path / "c" / "ef_shift").read_text() == "4\n"
