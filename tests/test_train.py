"""Tests for train.py on the CPU: config resolution and errors, bad data, the UNet call and the
masked loss, EF dropout reaching the model, overfitting one batch, resume = straight run,
2-process DDP (torchrun, gloo) = 1 process with accumulation, NaN stop, previews, VAE mode.
Datasets are tiny random latents written to tmp_path; OMP_NUM_THREADS=1 keeps runs exact."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import diffusion
import model
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.json")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def make_latents(root, lengths=(5, 8, 12, 20, 9, 30), val=()):
    """An EchoNet-layout latent root: FileList.csv + Latents/v<i>.pt of [T, 4, 14, 14].

    NumberOfFrames says 100 whatever the latent's length T, so that T < frames gives padded
    clips (n_real = T): the loss normalisation is then tested with uneven real-frame counts."""
    os.makedirs(os.path.join(root, "Latents"), exist_ok=True)
    g = torch.Generator().manual_seed(len(lengths))
    rows = []
    for i, T in enumerate(lengths):
        latent = torch.randn(T, 4, 14, 14, generator=g)
        torch.save(latent, os.path.join(root, "Latents", f"v{i}.pt"))
        rows.append({"FileName": f"v{i}", "EF": 20 + 9 * i, "ESV": 1, "EDV": 2, "FrameHeight": 112,
                     "FrameWidth": 112, "FPS": 32, "NumberOfFrames": 100,
                     "Split": "VAL" if i in val else "TRAIN"})
    with open(os.path.join(root, "FileList.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(root)


def run(*argv):
    """train.main(argv) in this process; returns its exit code (0 when it returns)."""
    try:
        train.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return 0


def weights(out, step, name="model.pt"):
    return torch.load(os.path.join(out, f"checkpoint-{step}", name), weights_only=True)


def assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=atol), (k, (a[k] - b[k]).abs().max())


# --- config --------------------------------------------------------------------------------


def test_shipped_configs_resolve(capsys):
    """Every configs/*.json resolves (--dry-run); lvdm.json is the paper run; the Makefile
    samples the demo's videos at lvdm_phantom.json's clip length and rate."""
    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        assert run("--config", os.path.join(ROOT, "configs", name), "--dry-run") == 0, name
        cfg = json.loads(capsys.readouterr().out)
        if name == "lvdm.json":
            assert (cfg["preset"], cfg["frames"], cfg["batch_size"], cfg["batch_per_gpu"],
                    cfg["max_steps"], cfg["lr"], cfg["warmup"], cfg["ema_decay"]) == (
                "lvdm", 64, 128, 16, 500_000, 1e-4, 500, 0.9999)
        if name == "lvdm_phantom.json":  # make demo samples the clips its LVDM trained on
            with open(os.path.join(ROOT, "Makefile")) as f:
                make = dict(line.split(" ?= ") for line in f.read().splitlines() if " ?= " in line)
            assert (float(make["FRAMES"]), float(make["FPS"])) == (cfg["frames"], cfg["fps"])


def test_dry_run_merges_defaults_file_and_flags(capsys):
    """--dry-run prints defaults < config file < flags (one spelling: --max-steps), and exits."""
    assert run("--config", TINY, "--lr", "2e-4", "--max-steps", "7", "--preview-efs", "10",
               "20", "--no-tf32", "--dry-run") == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["lr"] == 2e-4 and cfg["max_steps"] == 7 and cfg["preview_efs"] == [10, 20]
    assert cfg["preset"] == "tiny" and cfg["frames"] == 8  # from the file
    assert cfg["weight_decay"] == 1e-2 and cfg["tf32"] is False  # default, flag
    assert "config" not in cfg and "dry_run" not in cfg
    assert run("--config", TINY, "--max_steps", "7", "--dry-run") == 2  # no second spelling


@pytest.mark.parametrize("content, named, code", [
    ({"lrr": 1}, "'lrr'", 1),                  # unknown key: one line naming it
    ({"preset": "huge"}, "'huge'", 1),         # unknown preset
    ({"lr": "fast"}, "--lr", 2),               # wrong type: argparse names the flag
    ({"precision": "fp8"}, "--precision", 2),  # not one of the choices
])
def test_bad_config_key_or_value_is_named(tmp_path, capsys, content, named, code):
    """A bad key or value in the config file stops the run with a message naming it."""
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**json.load(open(TINY)), **content}))
    assert run("--config", path, "--data", make_latents(tmp_path / "d"), "--out",
               tmp_path / "o") == code
    err = capsys.readouterr().err.strip()
    assert named in err.splitlines()[-1] and "Traceback" not in err
    if code == 1:
        assert err.startswith("error: ") and "\n" not in err


def test_unknown_flag_is_rejected(capsys):
    """An unknown command-line flag stops argparse with a usage message naming it."""
    assert run("--config", TINY, "--learning-rate", "1") == 2
    assert "--learning-rate" in capsys.readouterr().err


# --- bad data ------------------------------------------------------------------------------


def _no_filelist(root):
    os.remove(os.path.join(root, "FileList.csv"))
    return "FileList.csv"


def _no_latents(root):
    os.rename(os.path.join(root, "Latents"), os.path.join(root, "Other"))
    return "Latents"


def _wrong_shape(root):
    for i in range(6):
        torch.save(torch.zeros(20, 3, 14, 14), os.path.join(root, "Latents", f"v{i}.pt"))
    return os.path.join("Latents", "v")  # the file


def _missing_column(root):
    path = os.path.join(root, "FileList.csv")
    rows = list(csv.DictReader(open(path)))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "EF"])
        writer.writeheader()
        writer.writerows([{k: v for k, v in r.items() if k != "EF"} for r in rows])
    return "EF"


def _too_short(root):
    path = os.path.join(root, "FileList.csv")
    text = open(path).read().replace(",100,", ",3,")  # NumberOfFrames: 3 frames < 8 / 32 s
    open(path, "w").write(text)
    return "no TRAIN video longer"


@pytest.mark.parametrize("breaks", [_no_filelist, _no_latents, _wrong_shape, _missing_column,
                                    _too_short])
def test_bad_data_gives_one_line_error(tmp_path, capsys, breaks):
    """Broken data roots stop with one line naming the file and what is wrong, exit code 1."""
    root = make_latents(tmp_path / "d")
    named = breaks(root)
    workers = 1 if breaks is _wrong_shape else 0  # an error raised inside a loader worker too
    code = run("--config", TINY, "--data", root, "--out", tmp_path / "o", "--workers", workers)
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert named in err and (breaks is _too_short or str(tmp_path) in err)


# --- the model call and the loss -----------------------------------------------------------


def test_predict_pads_14_to_16_replicate_and_crops():
    """diffusion.predict concatenates the conditioning frame, pads 14x14 to 16x16 by replicating
    edge pixels, and crops the output back: the UNet sees what the original's does."""
    seen = {}

    def fake_unet(x, t, ef, ids):
        seen.update(x=x, ef=ef, ids=ids)
        return x[:, :, :4] * 2

    x_t, cond = torch.randn(2, 3, 4, 14, 14), torch.randn(2, 4, 14, 14)
    v = diffusion.predict(fake_unet, x_t, cond, torch.tensor([5, 7]), torch.tensor([0.5, -1.0]))
    x = seen["x"]
    assert x.shape == (2, 3, 8, 16, 16) and v.shape == (2, 3, 4, 14, 14)
    assert torch.equal(v, 2 * x_t) and torch.equal(x[:, :, 4:, 1:-1, 1:-1], cond[:, None].expand(
        2, 3, 4, 14, 14))
    assert torch.equal(x[..., 0, 1:-1], x[..., 1, 1:-1]) and torch.equal(x[..., 0], x[..., 1])
    assert seen["ef"].shape == (2, 1, 1) and torch.equal(seen["ids"], torch.zeros(2, 1))


def test_loss_ignores_padded_frames():
    """diffusion.lvdm_loss has no gradient through the prediction at padded frames."""
    preds = []

    def fake_unet(x, t, ef, ids):
        out = torch.zeros(x.shape[0], x.shape[1], 4, *x.shape[3:], requires_grad=True)
        preds.append(out)
        return out

    x0, cond = torch.randn(2, 6, 4, 14, 14), torch.randn(2, 4, 14, 14)
    gens = [data.item_generator(0, 0, i) for i in range(2)]
    loss = diffusion.lvdm_loss(fake_unet, diffusion.DDPM(), x0, cond, torch.tensor([0.3, 0.6]),
                               torch.tensor([6, 2]), gens, ef_dropout=0.0, noise_offset=0.1)
    loss.backward()
    grad = preds[0].grad.abs().sum(dim=(2, 3, 4))  # [B, F]
    assert (grad[0] > 0).all() and (grad[1, :2] > 0).all() and (grad[1, 2:] == 0).all()


def test_residual_and_t_shift_options_of_the_loss():
    """The demo's options of diffusion.lvdm_loss: residual k is the plain loss of k (x0 - cond);
    t_shift 0 is the original's uniform draw, bit for bit; t_shift 2 puts half the clips at
    t >= 750 (uniform: a quarter), every t in [0, 1000)."""
    seen = []

    def fake_unet(x, t, ef, ids):
        seen.append(t.clone())
        return x[:, :, :4] * 0.5 + x[:, :, 4:].mean()  # depends on x_t and cond

    g = torch.Generator().manual_seed(3)
    x0, cond = torch.randn(2, 6, 4, 14, 14, generator=g), torch.randn(2, 4, 14, 14, generator=g)
    ef, n = torch.tensor([0.3, 0.6]), torch.tensor([6, 4])

    def loss(x, **kw):
        gens = [data.item_generator(0, 0, i) for i in range(2)]
        return diffusion.lvdm_loss(fake_unet, diffusion.DDPM(), x, cond, ef, n, gens, **kw)

    assert torch.equal(loss(x0, residual=8.0), loss(8.0 * (x0 - cond[:, None])))
    assert torch.equal(loss(x0, t_shift=0.0), loss(x0))
    gens = [data.item_generator(0, 0, i) for i in range(4000)]
    uniform = diffusion.draw_timesteps([data.item_generator(0, 0, i) for i in range(4000)], 1000)
    assert torch.equal(uniform, torch.cat([torch.randint(0, 1000, (1,), generator=g)
                                           for g in gens]))
    gens = [data.item_generator(0, 0, i) for i in range(4000)]
    shifted = diffusion.draw_timesteps(gens, 1000, 2.0)
    assert 0 <= int(shifted.min()) and int(shifted.max()) <= 999
    assert 0.47 < (shifted >= 750).float().mean() < 0.53  # 0.5 +- 0.008 (binomial sd)
    assert 0.22 < (uniform >= 750).float().mean() < 0.28


def test_tiny_config_overfits_one_batch():
    """The tiny UNet with tiny.json's optimizer settings fits one fixed batch (fixed noise, t and
    EF, one padded clip): the loss falls more than 10x in 25 steps. Objective, conditioning and
    masking are wired so that the target is learnable."""
    cfg, _ = train.resolve_config(["--config", TINY])
    net, _, opt, params = train.build_model(cfg, torch.device("cpu"))  # as train.py builds it
    g = torch.Generator().manual_seed(0)
    x0, cond = torch.randn(2, 8, 4, 14, 14, generator=g), torch.randn(2, 4, 14, 14, generator=g)
    x0[1, 5:] = 0  # zero padding, as the dataset pads
    losses = []
    for _ in range(25):
        gens = [data.item_generator(0, 0, i) for i in range(2)]  # the same noise, t and dropout
        loss = diffusion.lvdm_loss(net, diffusion.DDPM(), x0, cond, torch.tensor([0.3, 0.6]),
                                   torch.tensor([8, 5]), gens, cfg["ef_dropout"],
                                   cfg["noise_offset"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[0] / losses[-1] > 10, losses


def test_ef_dropout_reaches_the_unet(tmp_path, monkeypatch):
    """In the training loop the UNet's encoder_hidden_states hold NULL_EF at the dropout rate
    (0.5 here: 32 clips) and the clip's EF / 100 otherwise."""
    seen = []
    forward = model.UNetSpatioTemporal.forward

    def spy(self, sample, timestep, encoder_hidden_states, added_time_ids):
        seen.append(encoder_hidden_states.detach().flatten())
        return forward(self, sample, timestep, encoder_hidden_states, added_time_ids)

    monkeypatch.setattr(model.UNetSpatioTemporal, "forward", spy)
    root = make_latents(tmp_path / "d")
    assert run("--config", TINY, "--data", root, "--out", tmp_path / "o", "--ef-dropout", 0.5,
               "--frames", 4, "--batch-size", 4, "--batch-per-gpu", 4, "--max-steps", 8,
               "--preview-every", 0) == 0
    ef = torch.cat(seen)
    null = ef == diffusion.NULL_EF
    assert len(ef) == 32 and 6 <= int(null.sum()) <= 26  # Binomial(32, 0.5): 16 +- 2.8
    real = {round((20 + 9 * i) / 100, 4) for i in range(6)}
    assert {round(float(e), 4) for e in ef[~null]} <= real


# --- runs: resume, DDP, NaN, previews, VAE -------------------------------------------------


def test_resume_matches_straight_run(tmp_path):
    """4 steps straight = 2 steps, a crash, and a resume for 2 more (mid-epoch): same weights,
    EMA and optimizer state, bit for bit; the log has each step once; checkpoints are pruned."""
    root = make_latents(tmp_path / "d")  # 6 clips, batch 2: 3 steps per epoch
    common = ["--config", TINY, "--data", root, "--checkpoint-every", 2, "--preview-every", 0]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(*common, "--out", a, "--max-steps", 4, "--keep", 1) == 0
    assert run(*common, "--out", b, "--max-steps", 2) == 0
    os.makedirs(b / ".tmp-checkpoint-3")  # what a crash while saving step 3 leaves
    with open(b / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 9.0}) + "\n")  # logged after the checkpoint
    assert run(*common, "--out", b, "--max-steps", 4) == 0
    listed = [sorted(n for n in os.listdir(d) if n != ".lock") for d in (a, b)]  # .lock: pid
    assert listed[0] == ["checkpoint-4", "config.json", "log.jsonl"]
    assert listed[1] == ["checkpoint-2", "checkpoint-4", "config.json", "log.jsonl"]
    assert_same(weights(a, 4), weights(b, 4))
    assert_same(weights(a, 4, "ema.pt")["model"], weights(b, 4, "ema.pt")["model"])
    opt_a, opt_b = weights(a, 4, "optimizer.pt"), weights(b, 4, "optimizer.pt")
    for k in opt_a["state"]:
        assert_same(opt_a["state"][k], opt_b["state"][k])
    steps = [json.loads(line)["step"] for line in open(b / "log.jsonl")]
    assert steps == [1, 2, 3, 4]
    state = weights(b, 4, "trainer.pt")
    assert (state["step"], state["epoch"], state["batch"]) == (4, 1, 1)
    config = json.load(open(b / "checkpoint-4" / "training_config.json"))
    assert config["max_steps"] == 4 and config["preset"] == "tiny"
    assert json.load(open(b / "checkpoint-4" / "model_config.json"))["_class_name"] == (
        "UNetSpatioTemporalConditionModel")


def test_pruning_never_leaves_a_half_deleted_checkpoint(tmp_path, monkeypatch):
    """An old checkpoint is renamed before it is deleted: a crash during the deletion leaves a
    .tmp- folder (removed at the next start), never a checkpoint-<step> missing files."""
    cfg, _ = train.resolve_config(["--config", TINY, "--out", tmp_path, "--keep", 1])
    net, ema, opt, _ = train.build_model(cfg, torch.device("cpu"))
    train.save_checkpoint(cfg, 1, net, ema, opt, None, {"step": 1})
    rmtree = train.shutil.rmtree

    def killed_while_deleting(path, *args, **kwargs):
        if "removed" not in str(path):
            return rmtree(path, *args, **kwargs)
        os.remove(os.path.join(path, "ema.pt"))
        raise KeyboardInterrupt

    monkeypatch.setattr(train.shutil, "rmtree", killed_while_deleting)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(cfg, 2, net, ema, opt, None, {"step": 2})
    assert sorted(os.listdir(tmp_path)) == [".tmp-removed-checkpoint-1", "checkpoint-2"]
    assert model.list_checkpoints(str(tmp_path)) == [(2, str(tmp_path / "checkpoint-2"))]
    monkeypatch.setattr(train.shutil, "rmtree", rmtree)
    train.prepare_run_folder(cfg, 2)  # the next start
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "config.json", "previews"]


def test_resume_takes_the_highest_complete_step_whatever_the_times(tmp_path, capsys):
    """--resume latest takes the highest complete checkpoint by step (model.list_checkpoints, as
    export.py and sample.py): not the newest by modification time (checkpoint-1 here, as a copy
    can leave it), nor a half-deleted one (checkpoint-3 without ema.pt, which is saved anew)."""
    root = make_latents(tmp_path / "d")
    common = ["--config", TINY, "--data", root, "--out", tmp_path / "o", "--checkpoint-every", 1,
              "--keep", 5, "--preview-every", 0]
    assert run(*common, "--max-steps", 3) == 0
    os.remove(tmp_path / "o" / "checkpoint-3" / "ema.pt")
    for age, name in enumerate(["checkpoint-1", "checkpoint-3", "checkpoint-2"]):
        os.utime(tmp_path / "o" / name, (1e9 - 100 * age, 1e9 - 100 * age))  # 1 newest
    capsys.readouterr()
    assert run(*common, "--max-steps", 3) == 0
    assert f"resumed from {tmp_path / 'o' / 'checkpoint-2'} at step 2" in capsys.readouterr().out
    assert [s for s, _ in model.list_checkpoints(str(tmp_path / "o"))] == [1, 2, 3]
    assert [json.loads(line)["step"] for line in open(tmp_path / "o" / "log.jsonl")] == [1, 2, 3]


def test_torchrun_two_processes_match_one_process_and_resume(tmp_path):
    """torchrun, 2 gloo processes x 2 clips: 2 steps, then a resume for 2 more, give the weights
    of 1 process with 2 accumulation steps of 2 clips (same global batch of 4, uneven real
    frames per process), to 1e-6, and the loss of 1 process with one batch of 4. Only rank 0
    prints."""
    root = make_latents(tmp_path / "d", lengths=(5, 8, 3, 20, 6, 30))  # n_real 5, 8, 3, 8, 6, 8
    common = ["--config", TINY, "--data", root, "--batch-size", 4, "--batch-per-gpu", 2,
              "--checkpoint-every", 2, "--preview-every", 0]
    ddp = tmp_path / "ddp"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
              "2", os.path.join(ROOT, "train.py"), *map(str, common), "--out", str(ddp)]
    for steps in (2, 4):
        p = subprocess.run([*launch, "--max-steps", str(steps)], cwd=tmp_path, env=ENV,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        assert p.stdout.count("done:") == 1 and "2 processes x 1 accumulation x 2" in p.stdout
    assert "resumed from" in p.stdout
    # One thread here as in each torchrun process (ENV): the matmuls then round the same way,
    # and Adam's normalised steps do not amplify thread-count rounding into the comparison.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run(*common, "--out", tmp_path / "one", "--max-steps", 4) == 0
    finally:
        torch.set_num_threads(threads)
    assert_same(weights(ddp, 4), weights(tmp_path / "one", 4), atol=1e-6)
    assert_same(weights(ddp, 4, "ema.pt")["model"],
                weights(tmp_path / "one", 4, "ema.pt")["model"], atol=1e-6)
    assert weights(ddp, 4, "trainer.pt")["world_size"] == 2  # and no RNG states: none needed
    assert "rng" not in weights(ddp, 4, "trainer.pt")
    # The loss is the mean over the global batch's real frames: 1 process with one micro-batch
    # of 4 logs the same first loss (a mean of per-process means would not: 13 vs 16 frames).
    assert run(*common, "--out", tmp_path / "full", "--max-steps", 1, "--batch-per-gpu", 4) == 0
    first = [json.loads(open(o / "log.jsonl").readline())["loss"] for o in (ddp, tmp_path / "full")]
    assert first[0] == pytest.approx(first[1], rel=1e-6, abs=0)


def test_nan_loss_stops_before_the_update(tmp_path, capsys, monkeypatch):
    """A NaN loss at step 2 stops the run with one clear line; checkpoint-1 (weights and EMA)
    stays intact and nothing is written for step 2."""
    calls = []
    forward = model.UNetSpatioTemporal.forward

    def poisoned(self, *args):
        calls.append(1)
        return forward(self, *args) * (float("nan") if len(calls) > 1 else 1.0)

    monkeypatch.setattr(model.UNetSpatioTemporal, "forward", poisoned)
    out = tmp_path / "o"
    code = run("--config", TINY, "--data", make_latents(tmp_path / "d"), "--out", out,
               "--checkpoint-every", 1, "--preview-every", 0)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and err.startswith("error: loss is nan at step 2")
    assert sorted(n for n in os.listdir(out) if "checkpoint" in n) == ["checkpoint-1"]
    ema = weights(out, 1, "ema.pt")["model"]
    assert all(torch.isfinite(v).all() for v in ema.values())


def test_preview_png_and_gif_decoded_with_a_vae(tmp_path):
    """A preview decodes with the VAE folder of the config and writes a GIF and a PNG strip:
    conditioning frame | real clip | one column per EF, 112 px each, 4 frames tall."""
    vae_dir = tmp_path / "vae"
    model.AutoencoderKL(model.VAE_PRESETS["tiny"]).save_pretrained(str(vae_dir))
    out = tmp_path / "o"
    assert run("--config", TINY, "--data", make_latents(tmp_path / "d", val=(5,)), "--out", out,
               "--vae", vae_dir, "--frames", 4, "--max-steps", 1, "--preview-every", 1,
               "--preview-steps", 2, "--preview-efs", 0, 100, "--preview-guidance", 2) == 0
    from PIL import Image

    png = Image.open(out / "previews" / "step-1.png")
    assert png.size == (4 * 112, 12 + 4 * 112)
    gif = Image.open(out / "previews" / "step-1.gif")
    assert gif.size == (4 * 112, 12 + 112) and gif.n_frames == 4


def test_vae_mode_trains_and_previews(tmp_path):
    """--model vae trains AutoencoderKL on phantom frames with the same loop: log, checkpoint
    (AutoencoderKL config; unit_latents, as the demo's config asks: scaling_factor = 1 / std of
    the checkpoint's posterior means of 64 evenly spaced TRAIN frames) and a real | reconstructed
    PNG."""
    import data
    import export

    root = tmp_path / "phantom"
    data.make_phantom(str(root), num_videos=2, seed=0)
    out = tmp_path / "o"
    assert run("--config", os.path.join(ROOT, "configs", "vae_phantom.json"), "--data", root,
               "--out", out, "--preset", "tiny", "--batch-size", 2, "--max-steps", 2,
               "--workers", 0, "--preview-every", 2, "--checkpoint-every", 2, "--log-every", 1) == 0
    from PIL import Image

    assert Image.open(out / "previews" / "step-2.png").size == (2 * 112, 12 + 8 * 112)
    config = json.load(open(out / "checkpoint-2" / "model_config.json"))
    assert config["_class_name"] == "AutoencoderKL"
    export.export(str(out), str(tmp_path / "vae"))
    vae = model.load_model(str(tmp_path / "vae"))
    frames = data.FrameDataset(str(root), "TRAIN")
    picks = np.linspace(0, len(frames) - 1, 64).round().astype(int)
    with torch.no_grad():
        z = vae.encode(torch.stack([frames[int(i)] for i in picks])).mode()
    assert config["scaling_factor"] == vae.config.scaling_factor != 0.18215
    assert abs(vae.config.scaling_factor * z.std().item() - 1) < 1e-6
    losses = [json.loads(line)["loss"] for line in open(out / "log.jsonl")]
    assert len(losses) == 2 and all(0 < x < 10 for x in losses)


def test_gradient_checkpointing_gives_the_same_weights(tmp_path):
    """--grad-checkpointing recomputes activations in the backward pass: same weights after 2
    steps; a missing --resume folder is named."""
    root = make_latents(tmp_path / "d")
    common = ["--config", TINY, "--data", root, "--max-steps", 2, "--preview-every", 0]
    assert run(*common, "--out", tmp_path / "a") == 0
    assert run(*common, "--out", tmp_path / "b", "--grad-checkpointing") == 0
    assert_same(weights(tmp_path / "a", 2), weights(tmp_path / "b", 2), atol=1e-6)
    assert run(*common, "--out", tmp_path / "c", "--resume", tmp_path / "nowhere") == 1
