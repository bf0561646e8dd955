"""FID, FVD and IS of generated echo videos, computed exactly as StyleGAN-V computes them.

    python evaluate.py --real data/reference/dynamic --fake samples/lvdm_dynamic/jpg \\
        --metrics fvd2048_16f,fvd2048_128f,fid50k_full,is50k
    torchrun --nproc_per_node 4 evaluate.py --real ... --fake ...   # statistics summed over GPUs
    python evaluate.py convert inception-2015-12-05.pt i3d_torchscript.pt  # once, see below

Follows `calc_metrics_for_dataset.py --mirror 0 --resolution 112` of StyleGAN-V (Skorokhodov et
al. 2022; universome/stylegan-v), the protocol EchoNet-Synthetic (Reynaud et al. 2024) reports:
the same folder readers, clip offsets, item counts, float64 statistics, Frechet distance and
Inception Score, with both detectors written out below in plain PyTorch:
- Inception-v3 `inception-2015-12-05` (FID and IS), the TF graph of Heusel et al. / Salimans et
  al. as NVIDIA translated it for StyleGAN2-ADA; same parameter names and call;
- I3D `i3d_torchscript.pt` (FVD), tf.hub's i3d-kinetics-400 as used by the FVD code of
  Unterthiner et al., ported by the StyleGAN-V authors; same call.
Their weights are read from safetensors files that `python evaluate.py convert` makes from the
published TorchScript files after checking that both networks give the same outputs.
Differences from StyleGAN-V (all only where it is not reproducible): real FVD clip offsets come
from a generator seeded by --seed, real statistics are cached under a hash of the folder's
contents and the protocol (not of its path), --runs K reports mean and std over K seeds, and
cuDNN runs deterministically. Facts cited as [metrics.md N] / [detectors.md X] come from the
project's reference notes on the StyleGAN-V code.
"""

import argparse
import hashlib
import json
import math
import os
import re
import sys
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import PIL.ImageDraw
import scipy.linalg
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import data

# --- command line ----------------------------------------------------------------------------

parser = argparse.ArgumentParser(
    description="FID / FVD / IS under the StyleGAN-V protocol. `python evaluate.py convert "
    "--help` for the detector weights.",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
group = parser.add_argument_group("Main")
group.add_argument("--real", help="reference folder (<video>/<frame>.jpg), "
                   "StyleGAN-V's --real_data_path")
group.add_argument("--fake", required=True, help="generated folder (<video>/<frame>.jpg, or "
                   "flat images for fid/is), StyleGAN-V's --fake_data_path")
group.add_argument("--metrics", default="fvd2048_16f,fvd2048_128f,fid50k_full,is50k",
                   help="comma-separated, StyleGAN-V names; EchoNet-Synthetic's list by default. "
                   "Small counts parse too: fvd64_16f, fid5k_full, fid500_full, is2k, is100. "
                   "'ef': EF adherence of phantom videos (no --real needed)")
group.add_argument("--resolution", type=int, default=112,
                   help="every frame must be this size (EchoNet-Synthetic passes 112)")
group.add_argument("--seed", type=int, default=0,
                   help="seeds the real FVD clip offsets (unseeded in StyleGAN-V)")
group.add_argument("--filelist", default=None,
                   help="ef: FileList.csv with the requested EF of each fake video (default: "
                   "the one in --fake or its parent, as sample.py writes it)")
group.add_argument("--runs", type=int, default=1,
                   help="repeat each metric with seeds seed..seed+K-1, report mean and std")
group = parser.add_argument_group("I/O")
group.add_argument("--detectors", default="models/detectors",
                   help="folder with the converted detector weights (see `convert`)")
group.add_argument("--out", default="metrics.jsonl",
                   help="append one JSON line per metric here (StyleGAN-V's jsonl records)")
group.add_argument("--cache-dir", default=os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "echolvdm", "metrics"),
                   help="where real-set statistics are cached, keyed by folder contents")
group.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
group = parser.add_argument_group("Performance")
group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device; under torchrun each process uses cuda:LOCAL_RANK")
group.add_argument("--workers", type=int, default=3,
                   help="DataLoader processes decoding jpgs (StyleGAN-V uses 3)")
group.add_argument("--no-progress", action="store_true", help="hide the progress bars")

convert_parser = argparse.ArgumentParser(
    prog="evaluate.py convert", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    description="Convert the published TorchScript detectors into safetensors for this file, "
    "refusing unless both networks agree on random inputs.")
convert_parser.add_argument("files", nargs="+",
                            help="inception-2015-12-05.pt and/or i3d_torchscript.pt")
convert_parser.add_argument("--out", default="models/detectors",
                            help="folder to write <name>.safetensors into (--detectors)")
convert_parser.add_argument("--lengths", default="9,16,17",
                            help="I3D clip lengths to compare at 224x224 (odd T: uneven pads)")
convert_parser.add_argument("--tolerance", type=float, default=1e-4,
                            help="max |ours - theirs| allowed, relative to max(1, max |theirs|)")


class EvalError(Exception):
    """Bad input (folder, weights, protocol); `main()` turns it into a one-line exit."""


# --- Inception-v3 (FID, IS) [detectors.md A] -------------------------------------------------

def tf1_resize(x, out_h: int, out_w: int):
    """TF1 `resize_bilinear` (align_corners=False, half_pixel_centers=False) of [N, C, H, W].

    Output pixel (i, j) samples the input at (i * H / out_h, j * W / out_w), clamped to the last
    pixel: an affine grid shifted by 1/W - 1/out_w, as the published TorchScript builds it,
    in float32 and in this order [detectors.md A.3]. Returns [N, C, out_h, out_w].
    """
    N, C, H, W = x.shape
    theta = torch.eye(2, 3, device=x.device)                  # float32, like the TorchScript
    theta[0, 2] += theta[0, 0] / W - theta[0, 0] / out_w
    theta[1, 2] += theta[1, 1] / H - theta[1, 1] / out_h
    theta = theta.to(x.dtype).unsqueeze(0).repeat(N, 1, 1)
    grid = F.affine_grid(theta, [N, C, out_h, out_w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class Conv2dLayer(nn.Module):
    """Conv (no bias) -> batch norm without scale, eps 1e-3 -> ReLU [detectors.md A.4]."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride = stride
        self.padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
        self.weight = nn.Parameter(torch.randn(cout, cin, kh, kw) * (2 / (cin * kh * kw)) ** 0.5)
        self.beta = nn.Parameter(torch.zeros(cout))
        self.register_buffer("mean", torch.zeros(cout))
        self.register_buffer("var", torch.ones(cout))

    def forward(self, x):
        x = F.conv2d(x, self.weight.to(x.dtype), None, self.stride, self.padding)
        x = F.batch_norm(x, self.mean.to(x.dtype), self.var.to(x.dtype), None,
                         self.beta.to(x.dtype), False, 0.0, 1e-3)
        return F.relu(x)


def tower(**units):
    """A branch of units applied in order; its children keep the TorchScript's names."""
    return nn.Sequential(OrderedDict(units))


def avg_pool_3x3():
    """3x3 stride-1 average pool that ignores the zero padding (TF's SAME average pool)."""
    return nn.AvgPool2d(3, 1, 1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 -> 224 + t channels [A.6]."""

    def __init__(self, cin: int, t: int):
        super().__init__()
        self.conv = Conv2dLayer(cin, 64, 1)
        self.tower = tower(conv=Conv2dLayer(cin, 48, 1), conv_1=Conv2dLayer(48, 64, 5, 1, 2))
        self.tower_1 = tower(conv=Conv2dLayer(cin, 64, 1), conv_1=Conv2dLayer(64, 96, 3, 1, 1),
                             conv_2=Conv2dLayer(96, 96, 3, 1, 1))
        self.tower_2 = tower(pool=avg_pool_3x3(), conv=Conv2dLayer(cin, t, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class InceptionB(nn.Module):
    """35 -> 17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2 -> 480 + cin channels [A.6]."""

    def __init__(self, cin: int):
        super().__init__()
        self.conv = Conv2dLayer(cin, 384, 3, 2)
        self.tower = tower(conv=Conv2dLayer(cin, 64, 1), conv_1=Conv2dLayer(64, 96, 3, 1, 1),
                           conv_2=Conv2dLayer(96, 96, 3, 2))
        self.pool = nn.MaxPool2d(3, 2)

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (t channels inside) -> 768 [A.6]."""

    def __init__(self, cin: int, t: int):
        super().__init__()
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))             # (kernel, padding) pairs
        self.conv = Conv2dLayer(cin, 192, 1)
        self.tower = tower(conv=Conv2dLayer(cin, t, 1), conv_1=Conv2dLayer(t, t, row[0], 1, row[1]),
                           conv_2=Conv2dLayer(t, 192, col[0], 1, col[1]))
        self.tower_1 = tower(
            conv=Conv2dLayer(cin, t, 1), conv_1=Conv2dLayer(t, t, col[0], 1, col[1]),
            conv_2=Conv2dLayer(t, t, row[0], 1, row[1]),
            conv_3=Conv2dLayer(t, t, col[0], 1, col[1]),
            conv_4=Conv2dLayer(t, 192, row[0], 1, row[1]))
        self.tower_2 = tower(pool=avg_pool_3x3(), conv=Conv2dLayer(cin, 192, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class InceptionD(nn.Module):
    """17 -> 8 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2 -> 512 + cin [A.6]."""

    def __init__(self, cin: int):
        super().__init__()
        self.tower = tower(conv=Conv2dLayer(cin, 192, 1), conv_1=Conv2dLayer(192, 320, 3, 2))
        self.tower_1 = tower(
            conv=Conv2dLayer(cin, 192, 1), conv_1=Conv2dLayer(192, 192, (1, 7), 1, (0, 3)),
            conv_2=Conv2dLayer(192, 192, (7, 1), 1, (3, 0)), conv_3=Conv2dLayer(192, 192, 3, 2))
        self.pool = nn.MaxPool2d(3, 2)

    def forward(self, x):
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], 1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 towers -> 2048; average pool in mixed_9, max in mixed_10."""

    def __init__(self, cin: int, use_avg_pool: bool):
        super().__init__()
        self.conv = Conv2dLayer(cin, 320, 1)
        self.tower_conv = Conv2dLayer(cin, 384, 1)
        self.tower_mixed_conv = Conv2dLayer(384, 384, (1, 3), 1, (0, 1))
        self.tower_mixed_conv_1 = Conv2dLayer(384, 384, (3, 1), 1, (1, 0))
        self.tower_1_conv = Conv2dLayer(cin, 448, 1)
        self.tower_1_conv_1 = Conv2dLayer(448, 384, 3, 1, 1)
        self.tower_1_mixed_conv = Conv2dLayer(384, 384, (1, 3), 1, (0, 1))
        self.tower_1_mixed_conv_1 = Conv2dLayer(384, 384, (3, 1), 1, (1, 0))
        self.tower_2_pool = avg_pool_3x3() if use_avg_pool else nn.MaxPool2d(3, 1, 1)
        self.tower_2_conv = Conv2dLayer(cin, 192, 1)

    def forward(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], 1)


class InceptionV3(nn.Module):
    """`inception-2015-12-05`: the parameter names and call of NVIDIA's TorchScript [A.2, A.5].

    forward(img [N, 3, H, W] on the 0..255 scale, any dtype and size) returns the 2048-d pool_3
    features [N, 2048] (return_features=True, FID) or the softmax over 1008 classes [N, 1008],
    with the output bias left out when no_output_bias=True (IS).
    """

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(OrderedDict(
            conv=Conv2dLayer(3, 32, 3, 2), conv_1=Conv2dLayer(32, 32, 3),          # 149, 147
            conv_2=Conv2dLayer(32, 64, 3, 1, 1), pool0=nn.MaxPool2d(3, 2),         # 147, 73
            conv_3=Conv2dLayer(64, 80, 1), conv_4=Conv2dLayer(80, 192, 3),         # 73, 71
            pool1=nn.MaxPool2d(3, 2),                                             # 35
            mixed=InceptionA(192, 32), mixed_1=InceptionA(256, 64), mixed_2=InceptionA(288, 64),
            mixed_3=InceptionB(288),                                              # 17
            mixed_4=InceptionC(768, 128), mixed_5=InceptionC(768, 160),
            mixed_6=InceptionC(768, 160), mixed_7=InceptionC(768, 192),
            mixed_8=InceptionD(768),                                              # 8
            mixed_9=InceptionE(1280, True), mixed_10=InceptionE(2048, False),
            pool2=nn.AvgPool2d(8, 8)))                                            # 1
        self.output = nn.Linear(2048, 1008)

    def forward(self, img, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False):
        N, C, H, W = img.shape
        if C != 3:
            raise ValueError(f"InceptionV3 takes 3 channels, got {C}")
        x = img.to(torch.float16 if use_fp16 else torch.float32)
        x = tf1_resize(x, 299, 299)
        x = (x - 128) / 128                                     # 0 -> -1, 255 -> 0.9921875
        features = self.layers(x).reshape(-1, 2048).to(torch.float32)   # pool_3
        if return_features:
            return features
        if no_output_bias:
            logits = F.linear(features, self.output.weight)
        else:
            logits = self.output(features)
        return F.softmax(logits, dim=1)


# --- I3D (FVD) [detectors.md B] --------------------------------------------------------------

def tf_same_pad(x, kernel, stride, value: float = 0.0):
    """TF "SAME" padding of [B, C, T, H, W] for a kernel and stride: output ceil(n / s), total
    pad max((ceil(n / s) - 1) s + k - n, 0), the odd cell at the end [B.6]. Returns (x, pad):
    when every dim pads evenly x is untouched and pad [T, H, W] goes to the conv or pool (whose
    own padding counts as zeros, or as -inf for max pools, as in TF); otherwise x is padded
    with `value` and pad is 0."""
    pads = [max((-(-n // s) - 1) * s + k - n, 0) for n, k, s in zip(x.shape[2:], kernel, stride)]
    if all(p % 2 == 0 for p in pads):
        return x, [p // 2 for p in pads]
    flat = [q for p in reversed(pads) for q in (p // 2, p - p // 2)]    # F.pad wants W first
    return F.pad(x, flat, value=value), 0


class Unit3D(nn.Module):
    """Conv3d (no bias, TF SAME) -> batch norm without scale, eps 1e-3 -> ReLU [B.4, B.5]."""

    def __init__(self, cin, cout, kernel=(1, 1, 1), stride=(1, 1, 1)):
        super().__init__()
        self.kernel, self.stride = kernel, stride
        fan_in = cin * math.prod(kernel)
        self.weight = nn.Parameter(torch.randn(cout, cin, *kernel) * (2 / fan_in) ** 0.5)
        self.beta = nn.Parameter(torch.zeros(cout))
        self.register_buffer("mean", torch.zeros(cout))
        self.register_buffer("var", torch.ones(cout))

    def forward(self, x):
        x, pad = tf_same_pad(x, self.kernel, self.stride)
        x = F.conv3d(x, self.weight, None, self.stride, pad)
        return F.relu(F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.0, 1e-3))


class MaxPool3dSame(nn.Module):
    """Max pool with TF SAME padding (padded cells never win, as in TF)."""

    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x):
        x, pad = tf_same_pad(x, self.kernel, self.stride, -math.inf)
        return F.max_pool3d(x, self.kernel, self.stride, pad)


class Mixed(nn.Module):
    """Inception block [c0; c1a->c1b; c2a->c2b; c3]: 1x1 | 1x1-3x3 | 1x1-3x3 | pool-1x1 [B.4]."""

    def __init__(self, cin, c0, c1a, c1b, c2a, c2b, c3):
        super().__init__()
        k3 = (3, 3, 3)
        self.branch_0 = Unit3D(cin, c0)
        self.branch_1 = nn.Sequential(Unit3D(cin, c1a), Unit3D(c1a, c1b, k3))
        self.branch_2 = nn.Sequential(Unit3D(cin, c2a), Unit3D(c2a, c2b, k3))
        self.branch_3 = nn.Sequential(MaxPool3dSame(k3, (1, 1, 1)), Unit3D(cin, c3))

    def forward(self, x):
        return torch.cat([self.branch_0(x), self.branch_1(x), self.branch_2(x),
                          self.branch_3(x)], 1)


def _resize_frames(x, size, fn):
    """Apply a 2D resize `fn` to every frame of [B, C, T, H, W] -> [B, C, T, size, size]."""
    B, C, T, H, W = x.shape
    y = fn(x.transpose(1, 2).reshape(B * T, C, H, W), size)       # (B*T, C, size, size)
    return y.reshape(B, T, C, size, size).transpose(1, 2)


# Candidates for the TorchScript's `resize=True` (not public [B.2]); `convert` reads or tests
# which one it is and stores the name. Per-frame bilinear equals trilinear with T unchanged.
I3D_RESIZES = {
    "bilinear": lambda f, s: F.interpolate(f, (s, s), mode="bilinear", align_corners=False),
    "bilinear_align_corners": lambda f, s: F.interpolate(f, (s, s), mode="bilinear",
                                                         align_corners=True),
    "bicubic": lambda f, s: F.interpolate(f, (s, s), mode="bicubic", align_corners=False),
    "nearest": lambda f, s: F.interpolate(f, (s, s), mode="nearest"),
    "area": lambda f, s: F.interpolate(f, (s, s), mode="area"),
    "tf1_bilinear": lambda f, s: tf1_resize(f, s, s),
}


class I3D(nn.Module):
    """Inception-I3D of tf.hub i3d-kinetics-400 with the call of `i3d_torchscript.pt` [B.2, B.4].

    Module names follow hassony2/kinetics_i3d_pytorch (`mixed_4f.branch_2.1`), parameters those
    of the Inception above (weight, beta, mean, var). forward(x [B, 3, T, H, W]) with T >= 9:
    rescale maps 0..255 to -1..1, resize makes every frame 224x224 (method `resize_mode`);
    returns the 400 Kinetics logits averaged over time [B, 400] (return_features=True, FVD) or
    their softmax. T = 16 leaves 1 logit step, T = 128 leaves 15 [B.3].
    """

    def __init__(self, resize_mode="bilinear"):
        super().__init__()
        self.resize_mode = resize_mode
        self.conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))        # ceil(T/2) x 112 x 112
        self.maxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))     # 56
        self.conv3d_2b_1x1 = Unit3D(64, 64)
        self.conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.maxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))     # 28
        self.mixed_3b = Mixed(192, 64, 96, 128, 16, 32, 32)             # 256 channels
        self.mixed_3c = Mixed(256, 128, 128, 192, 32, 96, 64)           # 480
        self.maxPool3d_4a_3x3 = MaxPool3dSame((3, 3, 3), (2, 2, 2))     # ceil(T/4) x 14 x 14
        self.mixed_4b = Mixed(480, 192, 96, 208, 16, 48, 64)            # 512
        self.mixed_4c = Mixed(512, 160, 112, 224, 24, 64, 64)           # 512
        self.mixed_4d = Mixed(512, 128, 128, 256, 24, 64, 64)           # 512
        self.mixed_4e = Mixed(512, 112, 144, 288, 32, 64, 64)           # 528
        self.mixed_4f = Mixed(528, 256, 160, 320, 32, 128, 128)         # 832
        self.maxPool3d_5a_2x2 = MaxPool3dSame((2, 2, 2), (2, 2, 2))     # T3 = ceil(T/8) x 7 x 7
        self.mixed_5b = Mixed(832, 256, 160, 320, 32, 128, 128)         # 832
        self.mixed_5c = Mixed(832, 384, 192, 384, 48, 128, 128)         # 1024
        self.avg_pool = nn.AvgPool3d((2, 7, 7), 1)                      # VALID: T3 - 1 x 1 x 1
        self.conv3d_0c_1x1 = nn.Conv3d(1024, 400, 1)                    # logits, with bias

    def forward(self, x, rescale=False, resize=False, return_features=False):
        x = x.float()
        if rescale:
            x = x / 255 * 2 - 1
        if resize:
            x = _resize_frames(x, 224, I3D_RESIZES[self.resize_mode])
        for name, layer in self.named_children():                 # conv3d_1a_7x7 ... avg_pool
            x = layer(x)
            if name == "avg_pool":
                break
        x = self.conv3d_0c_1x1(x)                # (B, 400, T3 - 1, 1, 1); TF's dropout is off
        logits = x.squeeze(3).squeeze(3).mean(2)  # squeeze H, W (when 1), average over time
        return logits if return_features else F.softmax(logits, dim=1)


# --- detector weights ------------------------------------------------------------------------

INCEPTION_FILE, I3D_FILE = "inception-2015-12-05.safetensors", "i3d_torchscript.safetensors"
I3D_SHA256 = "bec6519f66ea534e953026b4ae2c65553c17bf105611c746d904657e5860a5e2"
INCEPTION_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                 "inception-2015-12-05.pt")                  # as in StyleGAN-V's code
I3D_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1"
WHERE = {INCEPTION_FILE: ("inception-2015-12-05.pt", f"NVIDIA (StyleGAN2-ADA) at {INCEPTION_URL}"),
         I3D_FILE: ("i3d_torchscript.pt", f"the StyleGAN-V authors at {I3D_URL}")}


class MissingWeightsError(EvalError):
    """A converted detector file is absent."""


def sha256_file(path):
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_detector(model, folder, name, device):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        source, publisher = WHERE[name]
        raise MissingWeightsError(
            f"{path} not found (--detectors): download {source}, published by {publisher}, "
            f"then run `python evaluate.py convert {source} --out {folder}`")
    model.load_state_dict(load_file(path))
    with safe_open(path, "pt") as f:
        model.metadata = f.metadata() or {}
    model.weights_sha256 = sha256_file(path)          # names the weights in cache keys
    return model.eval().requires_grad_(False).to(device)


def build_inception(folder="models/detectors", device="cpu"):
    """The FID/IS Inception-v3 with the weights `convert` wrote into `folder`."""
    return _load_detector(InceptionV3(), folder, INCEPTION_FILE, device)


def build_i3d(folder="models/detectors", device="cpu"):
    """The FVD I3D with the weights (and resize method) `convert` wrote into `folder`."""
    model = _load_detector(I3D(), folder, I3D_FILE, device)
    model.resize_mode = model.metadata.get("resize_mode", "bilinear")
    if model.resize_mode not in I3D_RESIZES:
        raise EvalError(f"{folder}/{I3D_FILE}: unknown resize_mode {model.resize_mode!r}")
    return model


# --- mapping other ports' weights ------------------------------------------------------------

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
    """Our InceptionV3 state dict from the TorchScript's (same names) or a torchvision-layout
    port of the same TF graph (pytorch-fid's FIDInceptionV3: `Mixed_6b.branch7x7_2.conv.weight`,
    `.bn.{weight,bias,running_mean,running_var}`, `fc` with 1008 outputs); a BN scale other
    than 1 is folded into the conv. Raises EvalError on keys or shapes it cannot place."""
    if "layers.conv.weight" in sd:                  # the TorchScript's own names [A.7]
        extra = sorted(set(sd) - set(InceptionV3().state_dict()))
        if extra:
            raise EvalError(f"Inception: unexpected keys {extra[:5]}")
        return dict(sd)
    units = {}
    for key, value in sd.items():
        if key.startswith("AuxLogits") or key.endswith("num_batches_tracked"):
            continue
        if key.startswith("fc."):
            units.setdefault("output", {})[key[3:]] = value
            continue
        parts = key.split(".")                          # block [unit] conv|bn param
        if parts[0] not in _TV_BLOCKS:
            raise EvalError(f"cannot place Inception key {key!r}")
        block = _TV_BLOCKS[parts[0]]
        if len(parts) == 3:
            path = f"layers.{block}"
        else:
            table = (_TV_UNITS_B if block == "mixed_3" else
                     _TV_UNITS_E if block in ("mixed_9", "mixed_10") else _TV_UNITS)
            if parts[1] not in table:
                raise EvalError(f"cannot place Inception key {key!r}")
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


_BN_NAMES = {"beta": ("bias", "beta"), "mean": ("running_mean", "mean", "moving_mean"),
             "var": ("running_var", "var", "moving_variance"), "gamma": ("weight", "gamma")}


def _i3d_unit_id(path):
    """(block,) or (block, branch) or ('logits',) parsed from a module path in the layouts of
    hassony2 (`mixed_4f.branch_2.1`), piergiaj (`Mixed_4f.b2b`), TF (`Mixed_4f/Branch_2/...`)
    and ours; None if unrecognised."""
    p = path.lower().replace("/", ".")
    if "logit" in p or "0c_1x1" in p:
        return ("logits",)
    m = re.search(r"(?:conv3d|mixed)_?(\d[a-f])", p)
    if not m:
        return None
    if not m.group(0).startswith("mixed"):
        return (m.group(1),)
    b = re.search(r"(?:branch|b)_?(\d)", p[m.end():])
    return (m.group(1), int(b.group(1))) if b else None


def i3d_state_dict_from(sd, log=None):
    """Our I3D state dict from another port's (hassony2, piergiaj, TorchScript, ours).

    Units are found as 5-D conv weights; their BN vectors are the 1-D tensors under the same
    module (bias/beta, running_mean/mean, running_var/var, weight/gamma, folded if not 1). Units
    are placed by parsed module path (block, branch; the 1x1 before the 3x3 inside a branch,
    which differ in kernel), else, if paths are unreadable, by registration order, and the
    shape of every tensor is checked either way: never by shape alone, since shapes repeat
    (Mixed_3c's branch 0 and 1a are both [128, 256, 1, 1, 1]). Other tensors are reported
    through `log` and left out. Raises EvalError."""
    log = log or (lambda s: None)
    ours = I3D()
    targets = [(n, m) for n, m in ours.named_modules() if isinstance(m, Unit3D)]
    targets.append(("conv3d_0c_1x1", ours.conv3d_0c_1x1))
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    used, units = set(), []
    for key, w in sd.items():
        if w.ndim != 5:
            continue
        module = key.rsplit(".", 1)[0]
        for prefix in (module, module.rsplit(".", 1)[0] if "." in module else ""):
            vecs = {k: v for k, v in sd.items() if v.ndim == 1 and k.startswith(prefix + ".")}
            if vecs:
                break
        p = {}
        for k, v in vecs.items():
            leaf = k.rsplit(".", 1)[1].lower()
            role = next((r for r, names in _BN_NAMES.items() if leaf in names), None)
            if role is None or role in p or k in used:
                raise EvalError(f"I3D: cannot place {k!r} (unit {prefix!r})")
            p[role] = (k, v)
        used.update(k for k, _ in p.values())
        used.add(key)
        units.append((prefix, key, w, p))
    left = sorted(set(sd) - used)
    if left:                    # e.g. stored constants; the output comparison has the last word
        log(f"  ignored, not part of a conv unit: {left}")
    if len(units) != len(targets):
        raise EvalError(f"I3D: found {len(units)} conv units, expected {len(targets)}")
    # Order the source units like ours: by parsed path if every path parses, else as registered.
    ids = [_i3d_unit_id(prefix) for prefix, *_ in units]
    target_ids = [_i3d_unit_id(n) for n, _ in targets]
    order = list(range(len(units)))
    if None not in ids:
        order.sort(key=lambda i: (target_ids.index(ids[i]) if ids[i] in target_ids else -1,
                                  units[i][2].shape[2]))                # 1x1x1 before 3x3x3
        matched = [ids[i] for i in order] == target_ids
    else:
        matched = False
    log(f"  I3D units placed by {'module path' if matched else 'registration order'}")
    out = {}
    for (name, module), i in zip(targets, order if matched else range(len(units))):
        prefix, key, w, p = units[i]
        want = dict(module.state_dict())
        if w.shape != want["weight"].shape:
            raise EvalError(f"I3D: {key} has shape {list(w.shape)}, {name} needs "
                            f"{list(want['weight'].shape)}")
        if name == "conv3d_0c_1x1":
            if set(p) != {"beta"}:
                raise EvalError(f"I3D: logits unit {prefix!r} should have only a bias")
            out.update({f"{name}.weight": w, f"{name}.bias": p["beta"][1]})
            continue
        if not {"beta", "mean", "var"} <= set(p):
            raise EvalError(f"I3D: unit {prefix!r} lacks batch-norm vectors, has {sorted(p)}")
        gamma = p["gamma"][1] if "gamma" in p else None
        tensors = _fold_bn(w, gamma, p["beta"][1], p["mean"][1], p["var"][1])
        for param, t in zip(("weight", "beta", "mean", "var"), tensors):
            if t.shape != want[param].shape:
                raise EvalError(f"I3D: {prefix}.{param} has shape {list(t.shape)}, "
                                f"{name} needs {list(want[param].shape)}")
            out[f"{name}.{param}"] = t
    return out


# --- convert: published TorchScript -> safetensors, verified ---------------------------------

def i3d_resize_from_code(code):
    """Name in I3D_RESIZES of the resize a TorchScript's code calls, or None if not found."""
    modes = "bilinear|trilinear|bicubic|nearest|area"          # interpolate(x, size, None,
    m = (re.search(rf'"({modes})",\s*(True|False|None)', code)  # mode, align_corners, ...)
         or re.search(rf"upsample_({modes})\dd\([^)]*?(True|False)", code))
    if not m:
        return None
    mode, align = m.groups()
    if mode in ("bilinear", "trilinear"):
        return "bilinear_align_corners" if align == "True" else "bilinear"
    return mode if mode in I3D_RESIZES else None


def _script_code(ts):
    """All TorchScript source of a loaded module and its submodules, as one string."""
    code = []
    for _, m in ts.named_modules():
        try:
            code.append(m.code)
        except (RuntimeError, AttributeError):
            pass
    return "\n".join(code)


def _rel_diff(a, b):
    """(max |a - b|, that divided by max(1, max |b|)) of two output tensors."""
    diff = (a - b).abs().max().item()
    return diff, diff / max(1.0, b.abs().max().item())


@torch.no_grad()
def _compare(theirs, ours, cases, tol, log):
    """Run both modules on every (label, input, kwargs) case; returns the worst relative diff."""
    worst = 0.0
    for label, x, kwargs in cases:
        with torch.jit.optimized_execution(False):      # the plain interpreter: no fusers
            a, b = ours(x, **kwargs), theirs(x, **kwargs)
        if not isinstance(b, torch.Tensor) or a.shape != b.shape:
            raise EvalError(f"{label}: ours gives {list(a.shape)}, the TorchScript "
                            f"{list(b.shape) if isinstance(b, torch.Tensor) else type(b)}")
        diff, rel = _rel_diff(a, b)
        worst = max(worst, rel)
        log(f"  {label:<48s} max|diff| {diff:.2e}  relative {rel:.2e}"
            f"{'' if rel <= tol else '  FAIL'}")
    return worst


@torch.no_grad()
def _check_i3d_resize(ts, ours, tol, log):
    """Set ours.resize_mode to the TorchScript's resize: the one its code calls if readable,
    else the first candidate whose output agrees; then compare the softmax output (unused by
    FVD, form not public [B.2]: a mismatch is only reported). Returns the features' worst
    relative difference."""
    clip = torch.randint(0, 256, (1, 3, 9, 112, 112), generator=torch.Generator().manual_seed(1),
                         dtype=torch.uint8)
    kwargs = dict(rescale=True, resize=True)
    with torch.jit.optimized_execution(False):
        ref = ts(clip, return_features=True, **kwargs)
        probs = ts(clip, **kwargs)
    found = i3d_resize_from_code(_script_code(ts))
    log(f"  resize in the TorchScript's code: {found or 'not found, trying each candidate'}")
    results = {}
    for mode in ([found] if found else []) + [m for m in I3D_RESIZES if m != found]:
        ours.resize_mode = mode
        features = ours(clip, return_features=True, **kwargs)
        results[mode] = _rel_diff(features, ref)[1]
        log(f"  T=9 112x112 uint8, rescale+resize ({mode}){'':<15s} relative "
            f"{results[mode]:.2e}{'' if results[mode] <= tol else '  FAIL'}")
        if results[mode] <= tol:
            break
    ours.resize_mode = min(results, key=results.get)
    if not isinstance(probs, torch.Tensor) or probs.shape != features.shape:
        log("  note: the TorchScript's softmax output has another form; FVD does not use it")
    else:
        log(f"  softmax output (unused by FVD): max|diff| "
            f"{_rel_diff(F.softmax(features, 1), probs)[0]:.2e}")
    return results[ours.resize_mode]


def convert(path, out_dir="models/detectors", lengths=(9, 16, 17), sizes=(112, 256, 299),
            tol=1e-4, log=print):
    """Convert a published TorchScript detector into `out_dir/<name>.safetensors`.

    Loads it on CPU, maps its state dict onto our module (names and shapes checked), runs both
    on random inputs (I3D: 224x224 clips of `lengths` frames; Inception: `sizes`-square images)
    and writes the file only if every output agrees within `tol` (max |diff| / max(1, max
    |theirs|)). For the I3D the resize method is read from the
    TorchScript's code, or else found by trying every candidate, and stored in the file's
    metadata. Returns the written path; raises EvalError (nothing written) on disagreement.
    """
    sha = sha256_file(path)
    ts = torch.jit.load(path, map_location="cpu").eval()
    sd = ts.state_dict()
    gen = torch.Generator().manual_seed(0)
    log(f"{path}: sha256 {sha}, {len(sd)} tensors")
    if "layers.conv.weight" in sd:                                      # Inception-v3
        name, ours, meta = INCEPTION_FILE, InceptionV3().eval(), {}
        ours.load_state_dict(inception_state_dict_from(sd))
        imgs = [torch.randint(0, 256, (1, 3, s, s), generator=gen, dtype=torch.uint8)
                for s in sizes]
        cases = [(f"{x.shape[-1]}x{x.shape[-1]} uint8, return_features", x,
                  dict(return_features=True)) for x in imgs]
        cases += [("softmax no_output_bias (IS)", imgs[0], dict(no_output_bias=True)),
                  ("softmax with bias", imgs[0], {})]
        worst = _compare(ts, ours, cases, tol, log)
    else:                                                               # I3D
        name, ours = I3D_FILE, I3D().eval()
        if sha != I3D_SHA256:
            log(f"  note: not the published i3d_torchscript.pt ({I3D_SHA256[:12]}...)")
        ours.load_state_dict(i3d_state_dict_from(sd, log))
        cases = [(f"T={t} 224x224 in [-1, 1], return_features", torch.rand(
            1, 3, t, 224, 224, generator=gen) * 2 - 1, dict(return_features=True))
            for t in lengths]
        worst = _compare(ts, ours, cases, tol, log)
        if worst > tol:
            raise EvalError(f"{path}: the networks differ by {worst:.2e} > {tol:g} (before any "
                            "resize); nothing written")
        worst = max(worst, _check_i3d_resize(ts, ours, tol, log))
        meta = {"resize_mode": ours.resize_mode}
    if worst > tol:
        raise EvalError(f"{path}: outputs differ by {worst:.2e} > {tol:g}; nothing written")
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, name)
    meta.update(source=os.path.basename(path), source_sha256=sha, max_rel_diff=f"{worst:.3e}")
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, out + ".tmp", meta)
    os.replace(out + ".tmp", out)
    log(f"  wrote {out} (worst relative difference {worst:.2e})")
    return out


# --- folder readers [metrics.md 2] -----------------------------------------------------------

def is_image(name):
    """True for the extensions PIL registers (StyleGAN-V keeps every PIL.Image.EXTENSION)."""
    PIL.Image.init()
    return os.path.splitext(name)[1].lower() in PIL.Image.EXTENSION


def check_folder(path, flag):
    """Raise EvalError unless `path` (given by `flag`) is a readable folder."""
    if not path or not os.path.isdir(path):
        raise EvalError(f"{flag} {path!r}: no such folder")


def list_images(root):
    """FID/IS reader: every image file under `root`, any depth, as relative paths sorted as
    strings (`sample_000000/0000.jpg`, `.../0001.jpg`, ..., `sample_000001/0000.jpg`)."""
    check_folder(root, "folder")
    files = sorted(os.path.relpath(os.path.join(d, f), root)
                   for d, _, names in os.walk(root) for f in names if is_image(f))
    if not files:
        raise EvalError(f"{root}: no image files found")
    return files


def list_videos(root):
    """FVD reader: [(video, [frame, ...])] for each sub-folder holding images, both sorted by
    name (the order StyleGAN-V's depth-2 listing gives); nothing deeper is read."""
    check_folder(root, "folder")
    videos = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if os.path.isdir(path):
            frames = sorted(f for f in os.listdir(path) if is_image(f))
            if frames:
                videos.append((name, frames))
        elif is_image(name):
            raise EvalError(f"{root}: image {name} lies directly in the folder; FVD reads one "
                            "sub-folder of frames per video (flat folders: fid/is only)")
    if not videos:
        raise EvalError(f"{root}: no videos (sub-folders of frames) found")
    return videos


def read_image(path):
    """Decode with Pillow as stored, no mode conversion: uint8 [C, H, W], C = 1 or 3 [2.3]."""
    with PIL.Image.open(path) as im:
        a = np.array(im)
    return (a[:, :, None] if a.ndim == 2 else a).transpose(2, 0, 1)


def probe(root, rel, resolution):
    """Shape [C, H, W] of the first file, which every other file must share."""
    shape = read_image(os.path.join(root, rel)).shape
    if shape[1:] != (resolution, resolution):
        raise EvalError(f"{os.path.join(root, rel)} is {shape[1]}x{shape[2]}, expected "
                        f"{resolution}x{resolution} (--resolution)")
    if shape[0] not in (1, 3):
        raise EvalError(f"{os.path.join(root, rel)} has {shape[0]} channels, expected 1 or 3")
    return shape


class Frames(torch.utils.data.Dataset):
    """Images `files` under `root` as uint8 [C, H, W] tensors, each checked against `shape`;
    with `clips` ([(video, first, step, n)]) item i is instead the clip [n, C, H, W] of frames
    first, first + step, ... of video i (`files` then maps a video to its sorted frames)."""

    def __init__(self, root, files, shape, clips=None):
        self.root, self.files, self.shape, self.clips = root, files, tuple(shape), clips

    def __len__(self):
        return len(self.clips if self.clips is not None else self.files)

    def load(self, rel):
        img = read_image(os.path.join(self.root, rel))
        if img.shape != self.shape:
            raise EvalError(f"{os.path.join(self.root, rel)} has shape {list(img.shape)}, the "
                            f"first file {list(self.shape)} (mixed sizes or channel counts)")
        return torch.from_numpy(img)

    def __getitem__(self, i):
        if self.clips is None:
            return self.load(self.files[i])
        video, first, step, n = self.clips[i]
        frames = self.files[video]
        return torch.stack([self.load(os.path.join(video, frames[first + j * step]))
                            for j in range(n)])


def select_clips(videos, n, step, max_items, random_offset, seed):
    """The FVD clips [(video, first frame, step, n)] StyleGAN-V reads [metrics.md 3].

    Real (random_offset=True): videos shorter than n * step are dropped first, then the first
    `max_items`; each clip starts at an offset drawn uniformly from 0 ... N - n * step + step - 1
    by a numpy generator seeded with `seed` (StyleGAN-V draws them unseeded). Fake: the first
    `max_items` videos from frame 0; a shorter one raises EvalError naming it.
    """
    need = n * step
    if random_offset:
        videos = [v for v in videos if len(v[1]) >= need][:max_items]
        if not videos:
            raise EvalError(f"no video has the {need} frames a clip needs")
        highs = np.array([len(frames) - need + step for _, frames in videos])
        firsts = np.random.default_rng(seed).integers(0, highs)
    else:
        videos = videos[:max_items]
        for name, frames in videos:
            if len(frames) < need:
                raise EvalError(f"fake video {name!r} has {len(frames)} frames, fewer than the "
                                f"{need} a clip needs (StyleGAN-V crashes here)")
        firsts = np.zeros(len(videos), dtype=np.int64)
    return [(name, int(o), step, n) for (name, _), o in zip(videos, firsts)]


# --- statistics [metrics.md 6, 7] ------------------------------------------------------------

def mean_cov(s1, s2, n):
    """Mean [D] and biased covariance [D, D] from float64 raw moments: s1 = sum x [D],
    s2 = sum x x^T [D, D] over n items; sigma = s2 / n - mu mu^T (divide by n, not n - 1)."""
    mu = s1 / n
    return mu, s2 / n - np.outer(mu, mu)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """StyleGAN-V's Frechet distance, float64: |mu1 - mu2|^2 + tr(s1 + s2 - 2 sqrtm(s1 s2)).

    mu [D], sigma [D, D]; StyleGAN-V passes (fake, real), and the product order is s1 @ s2. The
    principal square root comes from scipy.linalg.sqrtm; its error estimate (`disp=False`,
    deprecated in SciPy 1.16, removed in 1.18) was never used, so we do not ask for it. The real
    part of the total is taken at the end; no epsilon, no check of the imaginary part.
    """
    m = np.square(mu1 - mu2).sum()
    with warnings.catch_warnings():                   # singular products: StyleGAN-V is silent
        warnings.simplefilter("ignore")
        s = scipy.linalg.sqrtm(np.dot(sigma1, sigma2))
    return float(np.real(m + np.trace(sigma1 + sigma2 - s * 2)))


def inception_score(probs, num_gen=50000, num_splits=10):
    """StyleGAN-V's Inception Score of probabilities [M, K] (float32 math, as there).

    Split i is rows i * num_gen // num_splits ... (i + 1) * num_gen // num_splits - 1: bounds
    from the nominal count, so with M < num_gen the last splits are short or empty (NaN).
    Per split exp(mean_j KL(p_j || mean p)); returns (mean, population std) of the scores.
    """
    probs = np.asarray(probs, dtype=np.float32)
    scores = []
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(num_splits):
            part = probs[i * num_gen // num_splits: (i + 1) * num_gen // num_splits]
            kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
            scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores)), float(np.std(scores))


# --- running the detectors -------------------------------------------------------------------

@dataclass
class Options:
    """Everything a metric needs; `main()` fills it from the command line."""
    real: str | None                    # reference folder
    fake: str                           # generated folder
    resolution: int = 112               # expected frame size
    detectors: str = "models/detectors"
    device: str = "cpu"
    seed: int = 0                       # real FVD offsets
    filelist: str | None = None         # ef: requested EFs
    workers: int = 0                    # DataLoader processes
    cache_dir: str | None = None        # None: no disk cache
    progress: bool = True
    rank: int = 0                       # torchrun process
    world: int = 1                      # torchrun processes
    nets: dict = field(default_factory=dict)    # loaded detectors by name
    memo: dict = field(default_factory=dict)    # statistics computed in this process


def detector(opts, name):
    """The Inception ('inception') or I3D ('i3d'), built once per process."""
    if name not in opts.nets:
        build = build_inception if name == "inception" else build_i3d
        opts.nets[name] = build(opts.detectors, opts.device)
    return opts.nets[name]


@torch.inference_mode()
def detector_outputs(opts, dataset, net, kwargs, batch_size, desc):
    """Yield net(batch, **kwargs) as float32 [b, D] for this process's items of `dataset`.

    Process r of G takes items r, r + G, ... Batches are uint8 [b, C, H, W] images or
    [b, n, C, H, W] clips, permuted to contiguous [b, C, n, H, W]; one channel is repeated to
    three [metrics.md 3, 4]."""
    if len(dataset) < opts.world:
        raise EvalError(f"{desc}: {len(dataset)} items for {opts.world} processes")
    device = torch.device(opts.device)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=range(opts.rank, len(dataset), opts.world),
        num_workers=opts.workers, pin_memory=device.type == "cuda",
        prefetch_factor=2 if opts.workers else None)
    bar = tqdm(total=len(dataset), desc=desc, unit="item", leave=False,
               disable=not opts.progress or opts.rank != 0)
    for x in loader:
        if x.ndim == 5:
            x = x.permute(0, 2, 1, 3, 4).contiguous()           # (b, C, n, H, W)
        if x.shape[1] == 1:
            x = x.repeat_interleave(3, dim=1)
        yield net(x.to(device, non_blocking=True), **kwargs).float()
        bar.update(len(x) * opts.world)
    bar.close()


def moments(opts, dataset, net, kwargs, batch_size, desc):
    """(s1 [D], s2 [D, D], n): float64 sums of features and their outer products over the
    dataset, summed over processes (exact on any GPU count)."""
    s1 = s2 = None
    for f in detector_outputs(opts, dataset, net, kwargs, batch_size, desc):
        f = f.double()
        if s1 is None:
            s1 = torch.zeros(f.shape[1], dtype=torch.float64, device=f.device)
            s2 = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64, device=f.device)
        s1 += f.sum(0)
        s2 += f.T @ f
    if opts.world > 1:
        dist.all_reduce(s1)
        dist.all_reduce(s2)
    return s1.cpu().numpy(), s2.cpu().numpy(), len(dataset)


def all_outputs(opts, dataset, net, kwargs, batch_size, desc):
    """All outputs [M, D] in dataset order (gathered over processes, interleaved by rank)."""
    out = torch.cat(list(detector_outputs(opts, dataset, net, kwargs, batch_size, desc)))
    if opts.world > 1:
        rows = -(-len(dataset) // opts.world)
        out = F.pad(out, (0, 0, 0, rows - len(out)))
        parts = [torch.empty_like(out) for _ in range(opts.world)]
        dist.all_gather(parts, out)
        out = torch.stack(parts, 1).flatten(0, 1)[:len(dataset)]    # item i*G + r
    return out.cpu().numpy()


def fingerprint(root, rels):
    """sha256 of the names, sizes and mtimes of the files `rels` under `root`."""
    h = hashlib.sha256()
    for rel in rels:
        st = os.stat(os.path.join(root, rel))
        h.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cached_stats(opts, key, compute, disk):
    """mean_cov() of `compute()`, memoised in this process under `key` (a dict) and, with
    `disk` and a cache folder, stored as .npz under a hash of it [metrics.md 8, improved]."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    if digest in opts.memo:
        return opts.memo[digest]
    path = None
    if disk and opts.cache_dir:
        path = os.path.join(opts.cache_dir, f"{key['net']}-{digest[:24]}.npz")
        hit = torch.tensor(float(os.path.isfile(path)), device=opts.device)  # rank 0 decides
        if opts.world > 1:
            dist.broadcast(hit, 0)
        if hit.item():
            with np.load(path) as z:
                opts.memo[digest] = (z["mu"], z["sigma"])
            return opts.memo[digest]
    opts.memo[digest] = mean_cov(*compute())
    if path and opts.rank == 0:
        os.makedirs(opts.cache_dir, exist_ok=True)
        np.savez(path + ".tmp.npz", mu=opts.memo[digest][0], sigma=opts.memo[digest][1])
        os.replace(path + ".tmp.npz", path)
    return opts.memo[digest]


# --- metrics [metrics.md 4] ------------------------------------------------------------------

def note_short(opts, what, have, want):
    """Say on stderr when a set is smaller than its metric's count (StyleGAN-V is silent)."""
    if have < want and opts.rank == 0:
        print(f"note: {what}: {have} items, fewer than {want}", file=sys.stderr)


def image_stats(opts, root, max_items, batch_size, desc, disk):
    """Inception pool_3 (mu, sigma) of the first `max_items` images of `root` (None: all)."""
    files = list_images(root)
    note_short(opts, f"{desc} ({root})", len(files), max_items or 0)
    files = files[:max_items]
    dataset = Frames(root, files, probe(root, files[0], opts.resolution))
    net = detector(opts, "inception")
    key = dict(net="inception", files=fingerprint(root, files), res=opts.resolution,
               call="return_features", weights=net.weights_sha256)
    return cached_stats(opts, key, lambda: moments(
        opts, dataset, net, dict(return_features=True), batch_size, desc), disk)


def fid(opts, count):
    """fid{N}k_full: all real frames vs the first N fake frames, Inception features."""
    fake = image_stats(opts, opts.fake, count, 32, "fid fake", disk=False)    # errors first
    real = image_stats(opts, opts.real, None, 64, "fid real", disk=True)
    return frechet_distance(*fake, *real)


def clip_stats(opts, root, n, max_items, real):
    """I3D (mu, sigma) of `max_items` n-frame clips of the videos in `root`."""
    videos = list_videos(root)
    clips = select_clips(videos, n, 1, max_items, random_offset=real, seed=opts.seed)
    note_short(opts, f"fvd{n} {'real' if real else 'fake'} clips ({root})", len(clips),
               max_items)
    frames = dict(videos)
    rels = [os.path.join(v, f) for v, *_ in clips for f in frames[v]]
    dataset = Frames(root, frames, probe(root, rels[0], opts.resolution), clips)
    net = detector(opts, "i3d")
    kwargs = dict(rescale=True, resize=True, return_features=True)
    key = dict(net="i3d", files=fingerprint(root, rels), clips=[c[1:] for c in clips],
               res=opts.resolution, call=sorted(kwargs), resize=net.resize_mode,
               weights=net.weights_sha256)
    desc = f"fvd{n} {'real' if real else 'fake'}"
    return cached_stats(opts, key, lambda: moments(
        opts, dataset, net, kwargs, max(1, 128 // n), desc), disk=real)   # 128-frame batches


def fvd(opts, count, n):
    """fvd{N}_{n}f: N real clips (random offset) vs N fake clips (frame 0) of n frames."""
    fake = clip_stats(opts, opts.fake, n, count, real=False)     # a short video fails first
    real = clip_stats(opts, opts.real, n, count, real=True)
    return frechet_distance(*fake, *real)


def inception_score_metric(opts, count):
    """is{N}k: softmax without output bias over the first N fake frames, 10 splits of N / 10."""
    files = list_images(opts.fake)[:count]
    note_short(opts, f"is fake frames ({opts.fake}); splits keep the nominal bounds as in "
               "StyleGAN-V, so the last are short or empty (NaN)", len(files), count)
    key = ("is", fingerprint(opts.fake, files), count)
    if key not in opts.memo:
        dataset = Frames(opts.fake, files, probe(opts.fake, files[0], opts.resolution))
        probs = all_outputs(opts, dataset, detector(opts, "inception"),
                            dict(no_output_bias=True), 64, "is fake")
        opts.memo[key] = inception_score(probs, num_gen=count, num_splits=10)
    return opts.memo[key]


def read_fake_videos(root):
    """(name, uint8 frames [F, H, W, C]) of each fake video: a dataset root with Videos/*.avi
    (e.g. the phantoms themselves), or one folder of frames per video (sample.py's jpg/png)."""
    videos = os.path.join(root, "Videos")
    if os.path.isdir(videos):
        for name in sorted(os.listdir(videos)):
            if name.lower().endswith((".avi", ".mp4")):
                yield os.path.splitext(name)[0], data.read_video(os.path.join(videos, name))[0]
        return
    for name, frames in list_videos(root):
        stack = [read_image(os.path.join(root, name, f)).transpose(1, 2, 0) for f in frames]
        yield name, np.stack(stack)


def ef_strip(path, rows, thumbs, real=None, n=6):
    """A picture for people: up to n generated videos spread over the requested EFs, one per row
    (8 frames across the clip, labelled), each next to the real video of nearest EF when `real`
    is an EchoNet-layout root (e.g. the phantoms), 8 frames over the same duration."""
    rows = sorted(rows, key=lambda r: r[1])
    rows = [rows[i] for i in sorted(set(np.linspace(0, len(rows) - 1, n).round().astype(int)))]
    truth = []
    if real and os.path.isfile(os.path.join(real, "FileList.csv")):
        truth = data.read_filelist(real, probe=False)
    lines = []
    for name, asked, measured in rows:
        frames, seconds = thumbs[name]
        parts, label = [frames], f"asked {asked:.0f}\nmeasured {measured:.0f}"
        if truth:
            near = min(truth, key=lambda t: abs(t["EF"] - asked))
            video, fps = data.read_video(os.path.join(real, "Videos", near["FileName"] + ".avi"))
            last = min(len(video), round(fps * seconds)) - 1
            parts.append(video[np.linspace(0, last, 8).round().astype(int)])
            label += f"\nreal: EF {near['EF']:.0f}"
        strip = np.concatenate([np.concatenate(list(p), axis=1) for p in parts], axis=1)
        head = PIL.Image.new("RGB", (96, strip.shape[0]))
        PIL.ImageDraw.Draw(head).multiline_text((4, 4), label, fill=(255, 255, 0))
        lines.append(np.concatenate([np.asarray(head), strip[..., :3]], axis=1))
    PIL.Image.fromarray(np.concatenate(lines, axis=0)).save(path)


def ef_metric(opts):
    """ef: each video's EF measured from its LV cavity (data.measure_ef: phantom videos only)
    against the EF it was asked for (FileList.csv): Pearson r and mean absolute error in EF
    points. Writes ef_measured.csv (per video) and ef_strip.png (a picture, generated next to
    real when --real is the phantom dataset) beside the FileList."""
    candidates = [opts.filelist] if opts.filelist else [
        os.path.join(opts.fake, "FileList.csv"), os.path.join(opts.fake, "..", "FileList.csv")]
    filelist = next((p for p in candidates if os.path.isfile(p)), None)
    if filelist is None:
        raise EvalError(f"ef: no FileList.csv with the requested EFs at {candidates} "
                        "(give --filelist)")
    try:
        listed = {row["FileName"]: row
                  for row in data.read_filelist(os.path.dirname(filelist), probe=False)}
    except data.DataError as err:
        raise EvalError(f"ef: {err}") from None
    rows, thumbs = [], {}
    videos = read_fake_videos(opts.fake)
    for name, frames in tqdm(videos, desc="ef", disable=not opts.progress, unit="video"):
        if name not in listed:
            raise EvalError(f"ef: video {name} of {opts.fake} is not in {filelist}")
        rows.append((name, listed[name]["EF"], data.measure_ef(frames)["ef"]))
        if len(thumbs) < 64:  # frames for the picture (and their duration), first videos only
            thumbs[name] = (frames[np.linspace(0, len(frames) - 1, 8).round().astype(int)],
                            len(frames) / float(listed[name].get("FPS") or 32))
    if not rows:
        raise EvalError(f"ef: no videos in {opts.fake}")
    folder = os.path.dirname(filelist)
    if opts.rank == 0:
        with open(os.path.join(folder, "ef_measured.csv"), "w") as f:
            f.write("FileName,RequestedEF,MeasuredEF\n")
            f.writelines(f"{n},{r:.2f},{m:.2f}\n" for n, r, m in rows)
        ef_strip(os.path.join(folder, "ef_strip.png"), [r for r in rows if r[0] in thumbs],
                 thumbs, opts.real)
    scores = data.ef_adherence([r[1] for r in rows], [r[2] for r in rows])
    return {"ef_pearson_r": scores["pearson_r"], "ef_mae": scores["mae"], "ef_n": scores["n"]}


def _count(digits, k):
    return int(digits) * (1000 if k else 1)


# metric name pattern -> function(opts, match) returning {result key: value}; add new ones here.
METRICS = {
    r"fid(\d+)(k?)_full": lambda o, m: {m[0]: fid(o, _count(m[1], m[2]))},
    r"fvd(\d+)_(\d+)f": lambda o, m: {m[0]: fvd(o, int(m[1]), int(m[2]))},
    r"is(\d+)(k?)": lambda o, m: dict(zip(
        (m[0] + "_mean", m[0] + "_std"), inception_score_metric(o, _count(m[1], m[2])))),
    r"ef": lambda o, m: ef_metric(o),
}


def calc_metric(opts, name):
    """Results dict of one metric by its StyleGAN-V name, e.g. {'fid50k_full': 12.3}."""
    for pattern, fn in METRICS.items():
        m = re.fullmatch(pattern, name)
        if m:
            return fn(opts, m)
    raise EvalError(f"--metrics: unknown metric {name!r}; known patterns: {list(METRICS)}")


# --- main ------------------------------------------------------------------------------------

def run(args):
    """Compute every metric of the parsed command line; print and append JSON lines."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = args.device
    if world > 1:
        cuda = device.startswith("cuda")
        if cuda:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    # Metrics must match the reference: no TF32 (moves features ~1e-3) [metrics.md 1], and
    # deterministic cuDNN so the same command gives the same numbers (StyleGAN-V benchmarks).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    names = [m for m in args.metrics.split(",") if m]
    for name in names:                                  # fail before any long computation
        if not any(re.fullmatch(p, name) for p in METRICS):
            raise EvalError(f"--metrics: unknown metric {name!r}; known: {list(METRICS)}")
        if not name.startswith(("is", "ef")):
            check_folder(args.real, "--real")
    check_folder(args.fake, "--fake")
    if args.runs < 1:
        raise EvalError("--runs must be at least 1")
    opts = Options(real=args.real, fake=args.fake, resolution=args.resolution,
                   filelist=args.filelist,
                   detectors=args.detectors, device=device, workers=args.workers,
                   cache_dir=None if args.no_cache else args.cache_dir,
                   progress=not args.no_progress, rank=rank, world=world)
    table = []
    for name in names:
        start = time.time()
        runs = []
        for k in range(args.runs):
            opts.seed = args.seed + k
            runs.append(calc_metric(opts, name))
        summary = {key: [float(f([r[key] for r in runs])) for f in (np.mean, np.std)]
                   for key in runs[0]}
        table += [(key, *stats) for key, stats in summary.items()]
        results = runs[0]
        if args.runs > 1:        # StyleGAN-V's --num_runs layout: <key>_runNN, _mean, _std
            results = {f"{key}_run{i + 1:02d}": r[key] for i, r in enumerate(runs) for key in r}
            for key, (mean, std) in summary.items():
                results.update({f"{key}_mean": mean, f"{key}_std": std})
        total = time.time() - start
        record = dict(results=results, metric=name, total_time=total,
                      total_time_str=f"{total:.0f}s", num_gpus=world, real=args.real,
                      fake=args.fake, seed=args.seed, runs=args.runs, timestamp=time.time())
        if rank == 0:
            print(json.dumps(record), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(record) + "\n")
    if rank == 0:
        print(f"\n{'metric':<20s} {'value':>14s}" + (f" {'std over runs':>14s}"
                                                     if args.runs > 1 else ""))
        for key, mean, std in table:
            print(f"{key:<20s} {mean:14.4f}" + (f" {std:14.4f}" if args.runs > 1 else ""))
    if world > 1:
        dist.destroy_process_group()
    return table


def main(argv=None):
    """Command line entry point: `convert ...` or an evaluation."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["convert"]:
            cargs = convert_parser.parse_args(argv[1:])
            lengths = [int(t) for t in cargs.lengths.split(",")]
            for path in cargs.files:
                if not os.path.isfile(path):
                    raise EvalError(f"{path}: no such file")
                convert(path, cargs.out, lengths, tol=cargs.tolerance)
            return None
        return run(parser.parse_args(argv))
    except EvalError as err:
        # Raised in a DataLoader worker, the message arrives with the worker's traceback in
        # front of it: keep the last line, which is ours.
        msg = re.sub(r"^[\w.]*Error: ", "", str(err).strip().splitlines()[-1])
        raise SystemExit(f"evaluate.py: error: {msg}") from None


if __name__ == "__main__":
    main()
