"""export.py: training checkpoints (written here in train.py's format: checkpoint-<step>/ of plain
state dicts) -> model folders that model.load_model, sample.py and diffusers load; which
checkpoint of a run folder is the newest (model.list_checkpoints)."""

import copy
import json
import os
import shutil
import time

import pytest
import torch

import diffusion
import export
import model
import sample


def make_checkpoint(root, step, kind="unet", training_config=None, model_config=True):
    """A checkpoint-<step>/ as train.py writes it: model.pt, ema.pt ({"step", "max_decay",
    "model"}), optimizer.pt, scaler.pt, trainer.pt, training_config.json and model_config.json
    (model.config_to_dict). The EMA differs from the model. Returns (folder, EMA model)."""
    torch.manual_seed(step)
    net = (model.UNetSpatioTemporal(model.UNET_PRESETS["tiny"]) if kind == "unet"
           else model.AutoencoderKL(model.VAE_PRESETS["tiny"]))
    ema = copy.deepcopy(net).float().eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    diffusion.ema_update(ema, net, 1), diffusion.ema_update(ema, net, 2)  # decay 0.18: != net
    folder = root / f"checkpoint-{step}"
    os.makedirs(folder)
    files = {"model.pt": net.state_dict(),
             "ema.pt": {"step": 2, "max_decay": 0.9999, "model": ema.state_dict()},
             "optimizer.pt": optimizer.state_dict(), "scaler.pt": {},
             "trainer.pt": {"step": step, "epoch": 0, "batch": step, "world_size": 1},
             "training_config.json": training_config or {"model": kind, "preset": "tiny",
                                                         "lr": 1e-4, "frames": 8},
             "model_config.json": model.config_to_dict(net) if model_config else None}
    for name, value in files.items():
        if name.endswith(".pt"):
            torch.save(value, folder / name)
        elif value is not None:
            with open(folder / name, "w") as f:
                json.dump(value, f)
    return folder, ema


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_export_writes_the_ema_weights(tmp_path):
    """The exported folder holds the EMA weights and the config, and model.load_model loads it."""
    folder, ema = make_checkpoint(tmp_path / "out", 10)
    out, used = export.export(str(folder), str(tmp_path / "models" / "lvdm"))
    assert used == str(folder)
    loaded = model.load_model(out, expect="UNetSpatioTemporalConditionModel")
    assert same_weights(loaded, ema) and loaded.config == ema.config
    info = json.load(open(os.path.join(out, "training_config.json")))
    assert info["step"] == 10 and info["weights"] == "ema" and info["config"]["preset"] == "tiny"
    assert not os.path.exists(out + ".tmp")


def test_exported_folder_loads_in_diffusers(tmp_path):
    """diffusers' from_pretrained loads the exported UNet and gives the same output."""
    diffusers = pytest.importorskip("diffusers")
    folder, ema = make_checkpoint(tmp_path / "out", 3)
    out, _ = export.export(str(folder), str(tmp_path / "lvdm"))
    ref = diffusers.UNetSpatioTemporalConditionModel.from_pretrained(out).eval()
    x, ef = torch.randn(1, 4, 8, 16, 16), torch.full((1, 1, 1), 0.6)
    with torch.no_grad():
        expected = ref(x, 500, ef, torch.zeros(1, 1)).sample
        got = ema(x, 500, ef, torch.zeros(1, 1))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_vae_checkpoint_exports_to_models_vae(tmp_path, monkeypatch):
    """A VAE run exports to models/vae by default, its EMA weights."""
    monkeypatch.chdir(tmp_path)
    folder, ema = make_checkpoint(tmp_path / "out", 5, kind="vae")
    export.main(["--checkpoint", str(folder)])
    assert same_weights(model.load_model("models/vae", expect="AutoencoderKL"), ema)


def test_a_checkpoint_without_its_model_config_is_refused(tmp_path):
    """Every checkpoint train.py writes has model_config.json; one without it is named as
    incomplete (no guessing of the architecture from presets)."""
    folder, _ = make_checkpoint(tmp_path / "out", 7, model_config=False)
    with pytest.raises(model.ModelLoadError, match="incomplete checkpoint.*model_config.json"):
        model.load_checkpoint(str(folder))


def scrambled_run(root):
    """A run folder as a crash and a copy leave it: checkpoint-1 (EMA != checkpoint-3's) with the
    newest modification time; checkpoint-2 half deleted (no ema.pt, newer than checkpoint-3);
    checkpoint-3 complete and the oldest by time; checkpoint-20 a leftover temporary name; a
    stray file. Returns checkpoint-3's EMA model."""
    make_checkpoint(root, 1)
    folder, _ = make_checkpoint(root, 2)
    os.remove(folder / "ema.pt")
    _, ema = make_checkpoint(root, 3)
    shutil.copytree(root / "checkpoint-3", root / ".tmp-checkpoint-20")
    (root / "notes.txt").write_text("not a checkpoint")
    now = time.time()
    for age, name in enumerate(["checkpoint-1", "checkpoint-2", "checkpoint-3",
                                ".tmp-checkpoint-20"]):
        os.utime(root / name, (now - 100 * age, now - 100 * age))  # 1 newest, .tmp oldest
    return ema


def test_newest_checkpoint_is_the_highest_complete_step(tmp_path):
    """list_checkpoints orders by step, not by time, and leaves out incomplete folders."""
    scrambled_run(tmp_path / "run")
    assert model.list_checkpoints(str(tmp_path / "run")) == [
        (1, str(tmp_path / "run" / "checkpoint-1")), (3, str(tmp_path / "run" / "checkpoint-3"))]
    assert model.list_checkpoints(str(tmp_path / "nowhere")) == []


def test_export_and_sample_of_a_scrambled_run_take_the_highest_complete_step(tmp_path):
    """export.py and sample.py given a run folder with scrambled modification times and a
    half-deleted checkpoint both take checkpoint-3's EMA weights."""
    ema = scrambled_run(tmp_path / "run")
    out, used = export.export(str(tmp_path / "run"), str(tmp_path / "lvdm"))
    assert used == str(tmp_path / "run" / "checkpoint-3")
    assert same_weights(model.load_model(out), ema)
    assert json.load(open(os.path.join(out, "training_config.json")))["step"] == 3
    unet, path = sample.load_unet(str(tmp_path / "run"))
    assert path == str(tmp_path / "run" / "checkpoint-3") and same_weights(unet, ema)


def test_sample_falls_back_to_the_default_run_folder(tmp_path, monkeypatch):
    """Without models/lvdm, sample.py takes the EMA weights of out/lvdm's newest checkpoint
    (train.py's default run folder), as export.py does with no --checkpoint."""
    monkeypatch.chdir(tmp_path)
    make_checkpoint(tmp_path / "out" / "lvdm", 1)
    _, ema = make_checkpoint(tmp_path / "out" / "lvdm", 2)
    unet, path = sample.load_unet("models/lvdm")
    assert path == os.path.join("out", "lvdm", "checkpoint-2") and same_weights(unet, ema)
    export.main([])
    assert same_weights(model.load_model("models/lvdm"), ema)


@pytest.mark.parametrize("case, message", [
    ("no checkpoint", "out/lvdm: no complete checkpoint-<step>/ folder"),
    ("out exists", "exists (published or earlier weights?): --force replaces it"),
    ("no ema", "an incomplete checkpoint (no ema.pt)"),
    ("corrupt", "ema.pt: unreadable"),
])
def test_bad_checkpoint_gives_one_line_error(tmp_path, monkeypatch, case, message):
    """Missing or broken checkpoints and an existing --out exit non-zero with a clear message."""
    monkeypatch.chdir(tmp_path)
    argv = []
    if case != "no checkpoint":
        folder, _ = make_checkpoint(tmp_path / "out", 4)
        argv = ["--checkpoint", str(folder)]
    if case == "out exists":
        os.makedirs("models/lvdm")
    elif case == "no ema":
        os.remove(folder / "ema.pt")
    elif case == "corrupt":
        (folder / "ema.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as e:
        export.main(argv)
    assert str(e.value).startswith("error: ") and message in str(e.value)
    assert "\n" not in str(e.value)
