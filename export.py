"""Training checkpoint -> standalone model folder: the EMA weights and the model config in
diffusers format (`config.json` + `diffusion_pytorch_model.safetensors`), which `sample.py`
(`model.load_model`) and diffusers' `from_pretrained` both load. The original's step 6 did this
by hand: copy `checkpoint-500000/unet_ema/` and the config to `models/lvdm`.

    python export.py                          # out/lvdm's newest checkpoint -> models/lvdm
    python export.py --checkpoint out/lvdm/checkpoint-500000 --out models/lvdm --force
    python export.py --checkpoint out/vae_phantom --out models/vae_phantom   # a run: its newest
    python export.py --weights model          # the raw weights instead of the EMA

Checkpoints are train.py's `checkpoint-<step>/` folders, read by model.load_checkpoint (the
highest complete step of a run folder, never the newest by modification time).
"""

import argparse
import json
import os
import shutil
import sys

import model

# --- checkpoint -> model folder ----------------------------------------------------------------

DEFAULT_OUT = {"UNetSpatioTemporalConditionModel": "models/lvdm", "AutoencoderKL": "models/vae"}

def export(checkpoint, out=None, weights="ema", force=False):
    """Writes the model folder of a checkpoint (or of a run folder's newest one); returns
    (out, checkpoint folder). Written as `<out>.tmp` then renamed; `force` replaces `out`."""
    module, checkpoint = model.load_checkpoint(checkpoint, weights)
    out = (out or DEFAULT_OUT[module.class_name]).rstrip("/")
    if os.path.exists(out) and not force:
        raise model.ModelLoadError(f"{out} exists (published or earlier weights?): --force "
                                   "replaces it")
    shutil.rmtree(out + ".tmp", ignore_errors=True)
    module.save_pretrained(out + ".tmp")
    # Where the weights came from, as the original copied its config.yaml alongside.
    try:
        with open(os.path.join(checkpoint, "training_config.json")) as f:
            config = json.load(f)
    except ValueError as e:
        raise model.ModelLoadError(f"{checkpoint}/training_config.json: unreadable ({e})") from None
    info = {"checkpoint": os.path.basename(checkpoint), "weights": weights, "config": config,
            "step": model.torch_load(os.path.join(checkpoint, "trainer.pt")).get("step")}
    with open(os.path.join(out + ".tmp", "training_config.json"), "w") as f:
        json.dump(info, f, indent=2)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(out + ".tmp", out)
    return out, checkpoint

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="out/lvdm", help="a training run folder (its "
                        "newest complete checkpoint) or a checkpoint-<step>/ folder (default: "
                        "%(default)s, train.py's default run folder)")
    parser.add_argument("--out", default=None, help="model folder to write (default: models/lvdm "
                        "for a UNet, models/vae for a VAE: the paths sample.py reads)")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema",
                        help="export the EMA weights (default, as the original) or the raw ones")
    parser.add_argument("--force", action="store_true", help="replace an existing --out folder")
    args = parser.parse_args(argv)
    try:
        out, checkpoint = export(args.checkpoint, args.out, args.weights, args.force)
    except model.ModelLoadError as e:
        sys.exit(f"error: {e}")
    print(f"exported the {args.weights} weights of {checkpoint} to {out}")

if __name__ == "__main__":
    main()
