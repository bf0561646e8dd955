"""export.py: training checkpoints (written here in train.py's format: checkpoint-<step>/ of plain
state dicts) -> model folders that model.load_model, sample.py and diffusers load."""

import json
import os
import random
import time

import numpy as np
import pytest
import torch

import diffusion
import export
import model
import sample


def make_checkpoint(root, step, kind="unet", training_config=None, model_config=True):
    """A checkpoint-<step>/ as train.py writes it: model.pt, ema.pt (diffusion.EMA's state),
    optimizer.pt, scaler.pt, trainer.pt (step, RNG states, numpy's as a tensor),
    training_config.json and model_config.json (model.config_to_dict). The EMA differs from the
    model. Returns (folder, EMA model)."""
    torch.manual_seed(step)
    net = (model.UNetSpatioTemporal(model.UNET_PRESETS["tiny"]) if kind == "unet"
           else model.AutoencoderKL(model.VAE_PRESETS["tiny"]))
    ema = diffusion.EMA(net)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ema.update(net), ema.update(net)  # decay 0, then 0.18: EMA != model
    st = np.random.get_state()
    rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
           "numpy": (st[0], torch.from_numpy(st[1].astype(np.int64)), *st[2:]), "cuda": []}
    folder = root / f"checkpoint-{step}"
    os.makedirs(folder)
    files = {"model.pt": net.state_dict(), "ema.pt": ema.state_dict(),
             "optimizer.pt": optimizer.state_dict(), "scaler.pt": {},
             "trainer.pt": {"step": step, "epoch": 0, "batch": step, "world_size": 1,
                            "rng": [rng]},
             "training_config.json": training_config or {"model": kind, "preset": "tiny",
                                                         "lr": 1e-4, "frames": 8},
             "model_config.json": model.config_to_dict(net) if model_config else None}
    for name, value in files.items():
        if name.endswith(".pt"):
            torch.save(value, folder / name)
        elif value is not None:
            with open(folder / name, "w") as f:
                json.dump(value, f)
    return folder, ema.model


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_export_writes_the_ema_weights(tmp_path):
    """The exported folder holds the EMA weights and the config, and model.load_model loads it."""
    folder, ema = make_checkpoint(tmp_path / "out", 10)
    out = export.export(str(folder), str(tmp_path / "models" / "lvdm"))
    loaded = model.load_model(out, expect="UNetSpatioTemporalConditionModel")
    assert same_weights(loaded, ema) and loaded.config == ema.config
    info = json.load(open(os.path.join(out, "training_config.json")))
    assert info["step"] == 10 and info["weights"] == "ema" and info["config"]["preset"] == "tiny"
    assert not os.path.exists(out + ".tmp")


def test_exported_folder_loads_in_diffusers(tmp_path):
    """diffusers' from_pretrained loads the exported UNet and gives the same output."""
    diffusers = pytest.importorskip("diffusers")
    folder, ema = make_checkpoint(tmp_path / "out", 3)
    out = export.export(str(folder), str(tmp_path / "lvdm"))
    ref = diffusers.UNetSpatioTemporalConditionModel.from_pretrained(out).eval()
    x, ef = torch.randn(1, 4, 8, 16, 16), torch.full((1, 1, 1), 0.6)
    with torch.no_grad():
        expected = ref(x, 500, ef, torch.zeros(1, 1)).sample
        got = ema(x, 500, ef, torch.zeros(1, 1))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_vae_checkpoint_exports_to_models_vae(tmp_path, monkeypatch):
    """A VAE run exports to models/vae by default; --weights model gives the raw weights."""
    monkeypatch.chdir(tmp_path)
    folder, _ = make_checkpoint(tmp_path / "out", 5, kind="vae")
    export.main(["--checkpoint", str(folder), "--weights", "model"])
    raw = torch.load(folder / "model.pt")
    assert model.load_model("models/vae", expect="AutoencoderKL").state_dict().keys() == raw.keys()
    assert all(torch.equal(model.load_model("models/vae").state_dict()[k], v)
               for k, v in raw.items())


@pytest.mark.parametrize("preset", ["tiny", None])
def test_architecture_without_model_config(tmp_path, preset, capsys):
    """Without model_config.json the training config's preset is used; without either, the preset
    whose shapes fit, with a warning."""
    folder, ema = make_checkpoint(tmp_path / "out", 7, training_config={"preset": preset},
                                  model_config=False)
    module, _ = export.load_checkpoint_model(str(folder))
    assert same_weights(module, ema) and module.config == ema.config
    assert ("warning" in capsys.readouterr().err) == (preset is None)


def test_latest_checkpoint_is_the_newest(tmp_path):
    """The newest checkpoint-<step>/ in out/ or out/<run>/ wins; half-written ones are ignored."""
    for i, name in enumerate(["checkpoint-20", "run/checkpoint-5", "checkpoint-30.tmp"]):
        os.makedirs(tmp_path / name)
        os.utime(tmp_path / name, (time.time() + i, time.time() + i))
    assert export.latest_checkpoint(str(tmp_path)) == str(tmp_path / "run" / "checkpoint-5")
    assert export.latest_checkpoint(str(tmp_path / "nowhere")) is None


def test_sample_falls_back_to_the_latest_checkpoint(tmp_path, monkeypatch):
    """Without models/lvdm, sample.py takes the EMA weights of the newest checkpoint in out/."""
    monkeypatch.chdir(tmp_path)
    make_checkpoint(tmp_path / "out", 1)
    _, ema = make_checkpoint(tmp_path / "out", 2)
    unet, path = sample.load_unet("models/lvdm")
    assert path == os.path.join("out", "checkpoint-2") and same_weights(unet, ema)


@pytest.mark.parametrize("case, message", [
    ("no checkpoint", "no checkpoint-<step>/ under out/"),
    ("out exists", "exists (published or earlier weights?): --force replaces it"),
    ("no ema", "no ema weights"),
    ("corrupt", "unreadable"),
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
