"""Time to quality of the phantom demo: how well a trained LVDM follows the EF it is asked for,
scored exactly as a user scores it (sample.py writes the videos, evaluate.py --metrics ef
measures their EF), against training minutes and steps, and over guidance and samplers.

    python benchmarks/time_to_quality.py curve --run demo/runs/lvdm --data demo/phantom \
        --vae demo/models/vae --out demo/curve          # every checkpoint -> curve.png
    python benchmarks/time_to_quality.py sweep --unet demo/models/lvdm --data demo/phantom \
        --vae demo/models/vae --out demo/sweep          # guidance x samplers -> sweep.md
    python benchmarks/time_to_quality.py calibrate --unet demo/models/lvdm --data demo/phantom \
        --vae demo/models/vae --out demo/calibrate      # the guidance make demo samples with

`make demo-curve` and `make demo-sweep` run these after `make demo`. The videos are
conditioned on the TEST phantoms' frames (sample.py's default split); nothing here is tuned
on them: calibrate chooses the guidance on the VAL phantoms (other hearts) at other requested
EFs (seed + 1000), and prints it, and measures there the EF shift that cancels the videos' mean
EF error (<out>/ef_shift, sample.py --ef_shift). curve.png: r and MAE against training minutes
(log.jsonl's train_s), steps marked.
"""

import argparse
import json
import os
import subprocess
import sys

import PIL.Image
import PIL.ImageDraw

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def score(unet, args, out, guidance, sampler="dpm", steps=8, cond=None, shift=0.0):
    """Samples args.samples videos from `unet` (conditioned on `cond`, else args.data's TEST
    phantoms) into out/ and returns evaluate.py's EF row."""
    run = [sys.executable, os.path.join(HERE, "sample.py"), "--unet", unet, "--vae", args.vae,
           "--conditioning", cond or args.data, "--output", out, "--num_samples", str(args.samples),
           "--batch_size", str(args.samples), "--frames", str(args.frames), "--fps", str(args.fps),
           "--sampler", sampler, "--num_steps", str(steps), "--guidance", str(guidance),
           "--min_lvef", "10", "--max_lvef", "90", "--seed", str(args.seed), "--save_as", "jpg",
           "--cond_frame", args.cond_frame, "--ef_shift", str(shift)]
    subprocess.run(run, check=True, stdout=subprocess.DEVNULL)
    results = os.path.join(out, "results.jsonl")
    subprocess.run([sys.executable, os.path.join(HERE, "evaluate.py"), "--fake",
                    os.path.join(out, "jpg"), "--real", args.data, "--metrics", "ef",
                    "--out", results], check=True, stdout=subprocess.DEVNULL)
    with open(results) as f:
        return json.loads(f.readlines()[-1])["results"]


def panel(draw, box, xs, ys, ylim, title, goal, labels):
    """A line chart of ys against xs in box (x0, y0, x1, y1); goal dashed; labels under x."""
    x0, y0, x1, y1 = box
    def X(x):
        return x0 + 10 + x / (max(xs) or 1) * (x1 - x0 - 50)  # room for the last label

    def Y(y):  # clipped to the panel
        return y1 - (min(max(y, ylim[0]), ylim[1]) - ylim[0]) / (ylim[1] - ylim[0]) * (y1 - y0)
    draw.rectangle(box, outline=(110, 110, 110))
    draw.text((x0, y0 - 16), title, fill=(0, 0, 0))
    for v in (ylim[0], (ylim[0] + ylim[1]) / 2, ylim[1]):
        draw.text((x0 - 34, Y(v) - 6), f"{v:g}", fill=(0, 0, 0))
    for x in range(x0, x1, 10):  # the goal of the demo, dashed
        draw.line((x, Y(goal), x + 5, Y(goal)), fill=(0, 150, 0))
    points = [(X(x), Y(y)) for x, y in zip(xs, ys)]
    draw.line(points, fill=(200, 30, 30), width=2)
    for (px, py), y, label in zip(points, ys, labels):
        draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=(200, 30, 30))
        draw.text((px - 12, py - 16), f"{y:.2f}" if abs(y) < 1 else f"{y:.1f}", fill=(0, 0, 0))
        draw.text((px - 14, y1 + 4), label, fill=(60, 60, 60))
    draw.text((x0 + (x1 - x0) // 2 - 90, y1 + 32), "training minutes (steps)", fill=(0, 0, 0))


def draw_curve(path, points):
    """curve.png: EF Pearson r and MAE of each scored checkpoint against training minutes."""
    img = PIL.Image.new("RGB", (800, 320), "white")
    draw = PIL.ImageDraw.Draw(img)
    xs = [p["minutes"] for p in points]
    labels = [f"{p['minutes']:.1f} ({p['step']})" for p in points]
    panel(draw, (50, 30, 380, 250), xs, [p["r"] for p in points], (-0.2, 1.0),
          "EF Pearson r (goal >= 0.8, dashed)", 0.8, labels)
    panel(draw, (450, 30, 780, 250), xs, [p["mae"] for p in points], (0, 40),
          "EF MAE, points (goal <= 10, dashed)", 10, labels)
    img.save(path)


def curve(args):
    """Scores every complete checkpoint of the run; writes curve.json, curve.png, a table."""
    steps = sorted(int(n[11:]) for n in os.listdir(args.run)
                   if n.startswith("checkpoint-") and n[11:].isdigit())
    with open(os.path.join(args.run, "log.jsonl")) as f:
        seconds = {row["step"]: row.get("train_s", 0.0) for row in map(json.loads, f)}
    points = []
    for step in steps:
        ef = score(os.path.join(args.run, f"checkpoint-{step}"), args,
                   os.path.join(args.out, f"step-{step}"), args.guidance, args.sampler,
                   args.steps, shift=args.ef_shift)
        points.append({"step": step, "minutes": seconds.get(step, 0.0) / 60,
                       "r": ef["ef_pearson_r"], "mae": ef["ef_mae"], "n": ef["ef_n"]})
        print(f"step {step:5d}  {points[-1]['minutes']:5.1f} min  r {points[-1]['r']:.3f}  "
              f"MAE {points[-1]['mae']:.2f}", flush=True)
    with open(os.path.join(args.out, "curve.json"), "w") as f:
        json.dump(points, f, indent=1)
    draw_curve(os.path.join(args.out, "curve.png"), points)
    print(f"wrote {args.out}/curve.png and curve.json")


def sweep(args):
    """Classifier-free guidance 1 / 1.25 / 1.5 / 2 / 3 / 4 with the demo's sampler (--sampler,
    --steps); then at --guidance (as make demo) DPM-Solver++ 5 / 16, DDIM 5 / 10 / 20 / 50 and
    the original's DDPM 64."""
    cases = [(g, args.sampler, args.steps) for g in (1.0, 1.25, 1.5, 2.0, 3.0, 4.0)]
    cases += [(args.guidance, sampler, steps) for sampler, steps in (
        ("dpm", 5), ("dpm", 16), ("ddim", 5), ("ddim", 10), ("ddim", 20), ("ddim", 50),
        ("ddpm", 64))]
    lines = ["| guidance | sampler | steps | EF r | EF MAE |", "|---|---|---|---|---|"]
    for g, sampler, steps in cases:
        ef = score(args.unet, args, os.path.join(args.out, f"g{g:g}-{sampler}{steps}"), g,
                   sampler, steps, shift=args.ef_shift)
        lines.append(f"| {g:g} | {sampler.upper()} | {steps} | "
                     f"{ef['ef_pearson_r']:.3f} | {ef['ef_mae']:.2f} |")
        print(lines[-1], flush=True)
    with open(os.path.join(args.out, "sweep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}/sweep.md")


def ef_line(out):
    """Slope and mean error of measured on requested EF over out/ef_measured.csv (evaluate.py
    writes it). The slope is 1 when the videos' EFs spread as far as the asked ones, below 1 when
    they bunch; the mean error is how far they land above the asked EFs on average."""
    with open(os.path.join(out, "ef_measured.csv")) as f:
        pairs = [(float(r), float(m)) for _, r, m in
                 (line.split(",") for line in f.read().splitlines()[1:]) if m != "nan"]
    mr, mm = (sum(x) / len(pairs) for x in zip(*pairs))
    slope = (sum((r - mr) * (m - mm) for r, m in pairs)
             / max(sum((r - mr) ** 2 for r, _ in pairs), 1e-9))
    return slope, mm - mr


def calibrate(args):
    """The guidance of the best EF MAE on the VAL phantoms: each animated from its end-diastolic
    frame (data.end_diastole) at EFs drawn with seed + 1000, so neither the hearts nor the EFs
    are the TEST videos'. Tries --candidates, then (--refine) the scale where the line through
    the first two candidates' EF slopes (measured on asked; stronger guidance spreads the EFs
    wider) reaches 1, clipped to --refine-range and rounded to 0.25. The EF shift that cancels
    the VAL videos' mean error at that guidance (sample.py --ef_shift) goes to <out>/ef_shift.
    Writes calibrate.json, prints the guidance."""
    sys.path.insert(0, HERE)
    import torch

    import data
    cond = os.path.join(args.out, "cond")
    os.makedirs(cond, exist_ok=True)
    for row in data.read_filelist(args.data, probe=False):
        if row["Split"] == "VAL":
            name = row["FileName"]
            latent = torch.load(os.path.join(args.data, "Latents", name + ".pt"))
            torch.save(latent[data.end_diastole(args.data, name)].clone(),
                       os.path.join(cond, name + ".pt"))
    args.seed += 1000
    mae, slope, error = {}, {}, {}

    def probe(g):
        out = os.path.join(args.out, f"g{g:g}")
        mae[g] = score(args.unet, args, out, g, args.sampler, args.steps, cond=cond)["ef_mae"]
        slope[g], error[g] = ef_line(out)

    for g in args.candidates:
        probe(g)
    g0, g1 = args.candidates[:2] if len(args.candidates) > 1 else (0.0, 0.0)
    if args.refine and slope.get(g1, 0.0) != slope.get(g0, 0.0):
        s0, s1 = slope[g0], slope[g1]
        one = min(max(g0 + (1 - s0) * (g1 - g0) / (s1 - s0), min(args.refine_range)),
                  max(args.refine_range))
        if round(one * 4) / 4 not in mae:
            probe(round(one * 4) / 4)
    best = min(mae, key=mae.get)
    shift = -round(error[best], 1) + 0.0                     # + 0.0: no "-0" in the file
    with open(os.path.join(args.out, "ef_shift"), "w") as f:
        f.write(f"{shift:g}\n")
    with open(os.path.join(args.out, "calibrate.json"), "w") as f:
        json.dump({"guidance": best, "ef_shift": shift, "val_ef_mae": mae, "val_ef_slope": slope,
                   "val_ef_mean_error": error}, f)
    print(f"{best:g}")
    print(f"guidance {best:g}, EF shift {shift:+g}: EF MAE " + ", ".join(
        f"{mae[g]:.2f} (slope {slope[g]:.2f}, mean error {error[g]:+.2f}) at {g:g}" for g in mae)
        + f" on {args.samples} VAL-conditioned videos", file=sys.stderr)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["curve", "sweep", "calibrate"])
    p.add_argument("--run", help="curve: the LVDM run folder (its checkpoint-<step>/ folders)")
    p.add_argument("--unet", help="sweep, calibrate: the LVDM model folder")
    p.add_argument("--data", required=True, help="the phantom dataset (conditioning frames)")
    p.add_argument("--vae", required=True, help="the VAE model folder")
    p.add_argument("--out", required=True, help="where the videos and results go")
    p.add_argument("--samples", type=int, default=32, help="videos per point (default: 32)")
    p.add_argument("--frames", type=int, default=16, help="frames per video (default: 16, "
                   "the demo's clips)")
    p.add_argument("--fps", type=float, default=12.0, help="their frame rate (default: 12)")
    p.add_argument("--guidance", type=float, default=4.0, help="curve, and sweep's sampler "
                   "rows: guidance (default: 4, make demo's)")
    p.add_argument("--sampler", default="dpm", choices=["dpm", "ddim", "ddpm"],
                   help="curve, and sweep's guidance rows: sample.py --sampler (default: dpm)")
    p.add_argument("--steps", type=int, default=8, help="with --sampler (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="sample.py --seed (default: 0)")
    p.add_argument("--candidates", type=float, nargs="+", default=[1.5, 2.0, 3.0],
                   help="calibrate: guidance scales to try (default: 1.5 2 3)")
    p.add_argument("--refine", action=argparse.BooleanOptionalAction, default=True,
                   help="calibrate: also try where the candidates' EF slope reaches 1")
    p.add_argument("--refine-range", type=float, nargs=2, default=[1.0, 6.0],
                   help="calibrate: the scales --refine may try (default: 1 6)")
    p.add_argument("--ef-shift", type=float, default=0.0, help="curve, sweep: sample.py "
                   "--ef_shift (default: 0)")
    p.add_argument("--cond-frame", default="ed", choices=["ed", "first"],
                   help="sample.py --cond_frame (default: ed, as make demo)")
    args = p.parse_args()
    if not (args.run if args.mode == "curve" else args.unet):
        p.error(f"{args.mode} needs --{'run' if args.mode == 'curve' else 'unet'}")
    os.makedirs(args.out, exist_ok=True)
    dict(curve=curve, sweep=sweep, calibrate=calibrate)[args.mode](args)


if __name__ == "__main__":
    main()
