"""Training checkpoint -> standalone model folder: the EMA weights and the model config in
diffusers format (`config.json` + `diffusion_pytorch_model.safetensors`), which `sample.py`
(`model.load_model`) and diffusers' `from_pretrained` both load. The original's step 6 did this
by hand: copy `checkpoint-500000/unet_ema/` and the config to `models/lvdm`.

    python export.py                          # newest out/**/checkpoint-*/ -> models/lvdm
    python export.py --checkpoint out/lvdm/checkpoint-500000 --out models/lvdm --force
    python export.py --checkpoint out/vae_phantom --out models/vae_phantom   # a run: its newest
    python export.py --weights model          # the raw weights instead of the EMA

A checkpoint is train.py's `checkpoint-<step>/`: plain state dicts in model.pt, ema.pt
(diffusion.EMA's {"step", "max_decay", "model"}), optimizer.pt, scaler.pt and trainer.pt (step,
RNG states), with model_config.json (model.config_to_dict) and training_config.json. Files are
read with torch.load(weights_only=True): tensors, numbers and strings, nothing else.
"""

import argparse
import json
import os
import re
import shutil
import sys

import torch

import model

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--checkpoint", default=None,
                    help="checkpoint-<step>/ folder, or a run folder (its newest checkpoint) "
                    "(default: the newest one under out/ or out/*/)")
parser.add_argument("--out", default=None,
                    help="model folder to write (default: models/lvdm for a UNet, models/vae for a "
                         "VAE, the paths sample.py reads)")
parser.add_argument("--weights", choices=("ema", "model"), default="ema",
                    help="export the EMA weights (default, as the original) or the raw ones")
parser.add_argument("--force", action="store_true", help="replace an existing --out folder")

TRAIN_OUT = "out"  # train.py's default run folder; runs go to out/<run>/
DEFAULT_OUT = {"UNetSpatioTemporalConditionModel": "models/lvdm", "AutoencoderKL": "models/vae"}


class CheckpointError(model.ModelLoadError):
    """A checkpoint that cannot be read or exported; the message names the file and the problem."""


# --- reading a checkpoint ----------------------------------------------------------------------

def torch_load(path):
    """torch.load(weights_only=True): never unpickles arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated zip files, foreign formats
        raise CheckpointError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None


def is_checkpoint(path):
    """A training checkpoint folder (model.pt or ema.pt), not a model folder."""
    return any(os.path.isfile(os.path.join(path, f)) for f in ("model.pt", "ema.pt"))


def latest_checkpoint(root=TRAIN_OUT):
    """The newest `checkpoint-<step>/` in root or root/<run>/ (by time, then step); None if none."""
    found = []
    folders = [root] + [os.path.join(root, d) for d in sorted(os.listdir(root))] \
        if os.path.isdir(root) else []
    for folder in filter(os.path.isdir, folders):
        for name in os.listdir(folder):
            match, path = re.fullmatch(r"checkpoint-(\d+)", name), os.path.join(folder, name)
            if match and os.path.isdir(path):  # a half-written checkpoint has a temporary name
                found.append((os.path.getmtime(path), int(match[1]), path))
    return max(found)[2] if found else None


def read_json(path):
    """A JSON file's content, or CheckpointError."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None


# --- rebuilding the model ----------------------------------------------------------------------

def build_model(state, model_config, training_config):
    """The module the state dict belongs to (UNet or VAE, told by its keys), built from
    model_config.json; failing that, from the training config's preset; failing that, from the
    preset whose parameter shapes fit (with a warning: heads and num_frames are then guesses)."""
    unet = any(k.startswith("time_embedding.") for k in state)
    name = "UNetSpatioTemporalConditionModel" if unet else "AutoencoderKL"
    cls, config_cls = model.CLASSES[name]
    presets = model.UNET_PRESETS if unet else model.VAE_PRESETS
    candidates = []
    if model_config and model_config.get("_class_name") == name:
        candidates.append(model.config_from_dict(config_cls, model_config))
    if (training_config or {}).get("preset") in presets:
        candidates.append(presets[training_config["preset"]])
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for i, c in enumerate(candidates + list(presets.values())):
        try:
            module = cls(c)
        except (TypeError, ValueError):
            continue
        if {k: tuple(v.shape) for k, v in module.state_dict().items()} == shapes:
            if i >= len(candidates):
                print(f"warning: no {name} config in the checkpoint; the weights fit a preset "
                      f"(block_out_channels {c.block_out_channels})", file=sys.stderr)
            module.load_state_dict(state)
            return module.eval()
    raise CheckpointError(f"no {name} configuration in the checkpoint or the presets matches its "
                          "weights")


def load_checkpoint_model(path, weights="ema"):
    """(module with the EMA or raw weights, in eval mode; {"step", "config"}) of a checkpoint."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint folder")
    file = os.path.join(path, f"{weights}.pt")
    if not os.path.isfile(file):
        raise CheckpointError(f"{path}: no {weights} weights ({weights}.pt)")
    state = torch_load(file)
    state = state.get("model", state) if isinstance(state, dict) else state  # diffusion.EMA
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{file}: not a state dict")
    configs = [os.path.join(path, f) for f in ("model_config.json", "training_config.json")]
    model_config, training_config = [read_json(f) if os.path.isfile(f) else None for f in configs]
    trainer = os.path.join(path, "trainer.pt")
    step = torch_load(trainer).get("step") if os.path.isfile(trainer) else None
    module = build_model(state, model_config, training_config)
    return module, {"step": step, "config": training_config}


def export(checkpoint, out=None, weights="ema", force=False):
    """Write the model folder; returns its path. Written as `<out>.tmp` then renamed."""
    module, info = load_checkpoint_model(checkpoint, weights)
    out = (out or DEFAULT_OUT[module.class_name]).rstrip("/")
    if os.path.exists(out) and not force:
        raise CheckpointError(f"{out} exists (published or earlier weights?): --force replaces it")
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    module.save_pretrained(tmp)
    info = {"checkpoint": os.path.basename(os.path.normpath(checkpoint)), "weights": weights,
            **info}  # the original copied its config.yaml alongside
    with open(os.path.join(tmp, "training_config.json"), "w") as f:
        json.dump(info, f, indent=2, default=str)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def main(argv=None):
    args = parser.parse_args(argv)
    try:
        checkpoint = args.checkpoint or latest_checkpoint()
        if checkpoint and os.path.isdir(checkpoint) and not is_checkpoint(checkpoint):
            checkpoint = latest_checkpoint(checkpoint) or checkpoint  # a run folder: its newest
        if checkpoint is None:
            raise CheckpointError(f"no checkpoint-<step>/ under {TRAIN_OUT}/: train first "
                                  "(python train.py ...), or give --checkpoint")
        out = export(checkpoint, args.out, args.weights, args.force)
    except model.ModelLoadError as e:
        sys.exit(f"error: {e}")
    print(f"exported the {args.weights} weights of {checkpoint} to {out}")


if __name__ == "__main__":
    main()
