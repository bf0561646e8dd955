"""Autoguidance (sample.py --guide_unet, diffusion.sample(weak=...)): guidance's null-EF pass
made by a weaker model, an earlier checkpoint of the same run (Karras et al. 2024)."""

import dataclasses
import json

import pytest
import torch
from test_sample import folders, perturb, run  # noqa: F401  (folders: a fixture)

import data
import diffusion
import model


def stand_in(scale, shift):
    """A UNet whose v is scale * EF + shift everywhere: [N, F, 8, h, w] -> [N, F, 4, h, w]."""
    def unet(x, t, ef, ids):
        return x[:, :, :4] * 0 + scale * ef.view(-1, 1, 1, 1, 1) + shift
    return unet


def sample(unet, ef, guidance, weak=None):
    scheduler = diffusion.DDIM()
    scheduler.set_timesteps(3)
    generators = [data.item_generator(1, i) for i in range(len(ef))]
    cond = torch.randn(len(ef), 4, 6, 6, generator=torch.Generator().manual_seed(0))
    return diffusion.sample(unet, scheduler, cond, ef, generators, 12, 8, 4, guidance,
                            weak=weak)


def test_weak_model_makes_the_null_ef_pass():
    """v = v_weak(NULL_EF) + s (v(ef) - v_weak(NULL_EF)): for stand-ins linear in the EF, a plain
    run at the EF that gives the same v; the model itself as weak is classifier-free guidance."""
    ef, s = torch.tensor([0.3, 0.7]), 2.5
    unet, weak = stand_in(1.0, 0.0), stand_in(2.0, 0.5)
    null = 2.0 * diffusion.NULL_EF + 0.5
    plain = sample(unet, null + s * (ef - null), 1.0)
    torch.testing.assert_close(sample(unet, ef, s, weak), plain, atol=1e-6, rtol=0)
    assert torch.equal(sample(unet, ef, s, unet), sample(unet, ef, s))
    assert torch.equal(sample(unet, ef, 1.0, weak), sample(unet, ef, 1.0))  # no guidance: unused


def test_guide_unet_flag(folders, tmp_path):  # noqa: F811
    """sample.py --guide_unet: recorded in settings.json, changes the videos, and is refused
    without guidance, when missing, or when it is not a model of the same run's kind."""
    weak = perturb(model.load_model(str(folders / "unet")), 0.05, seed=3)
    weak.save_pretrained(tmp_path / "weak")
    run(folders, tmp_path / "cfg", "--guidance", "2", "--save_as", "pt")
    run(folders, tmp_path / "auto", "--guidance", "2", "--save_as", "pt",
        "--guide_unet", str(tmp_path / "weak"))
    settings = json.loads((tmp_path / "auto" / "settings.json").read_text())
    assert settings["guide_unet"] == str(tmp_path / "weak")
    a, b = (torch.load(tmp_path / d / "pt" / "sample_000000.pt") for d in ("cfg", "auto"))
    assert a.shape == b.shape and not torch.allclose(a, b)
    other = model.UNetSpatioTemporal(dataclasses.replace(weak.config, num_frames=16))
    other.save_pretrained(tmp_path / "other")
    for extra, message in ((["--guidance", "1", "--guide_unet", str(tmp_path / "weak")],
                            "guides only with --guidance != 1"),
                           (["--guidance", "2", "--guide_unet", str(tmp_path / "nowhere")],
                            "not found"),
                           (["--guidance", "2", "--guide_unet", str(tmp_path / "other")],
                            "num_frames or residual differ")):
        with pytest.raises(SystemExit) as e:
            run(folders, tmp_path / "bad", *extra)
        assert message in str(e.value) and "--guide_unet" in str(e.value)
