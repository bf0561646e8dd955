"""Bad inputs and careless use (issue 14), across the commands: phantom, encode, reference,
train, export, detectors, sample, evaluate. Each case runs the command's main(argv) in this
process and asserts a non-zero exit, a one-line message naming the file or flag, no traceback,
and that nothing finished (the models, datasets, latents, run folder and samples of `world`,
and the case's own inputs) is lost or changed, with no temporary file left. docs/bad_inputs.md
is the table of these cases and their messages; regenerate it with
`UPDATE_BAD_INPUTS_DOC=1 python -m pytest tests/test_bad_inputs.py`.

The last test starts two sample.py runs into one folder at the same time: the second is refused
naming the first's pid; the first finishes and its files are complete."""

import csv
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data
import detectors
import evaluate
import export
import model
import sample
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "bad_inputs.md")
MAINS = {"data.py": data.main, "train.py": train.main, "sample.py": sample.main,
         "export.py": export.main, "export.py detectors": detectors.main,
         "evaluate.py": evaluate.main}


class NotATensor:
    """Pickled into a .pt/.bin file: torch.load(weights_only=True) must refuse it."""


def write_filelist(root, rows, fps=32, frames=100):
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "FileList.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(data.FILELIST_COLUMNS)
        writer.writerows([[name, 20 + 10 * i, 1, 2, 112, 112, fps, frames, split]
                          for i, (name, split) in enumerate(rows)])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """What a user has finished: tiny UNet and VAE folders (and a second VAE), a conditioning
    latent, an encoded dataset `ds` (2 short videos), a latent root `lat` for training, a run
    folder `run` with checkpoint-1 and a sample folder `samples` (1 video, pt + jpg)."""
    w = tmp_path_factory.mktemp("world")
    torch.manual_seed(0)
    model.UNetSpatioTemporal(model.UNET_PRESETS["tiny"]).save_pretrained(str(w / "unet"))
    for name in ("vae", "vae2"):
        model.AutoencoderKL(model.VAE_PRESETS["tiny"]).save_pretrained(str(w / name))
    os.makedirs(w / "cond")
    torch.save(torch.randn(4, 14, 14), w / "cond" / "a.pt")
    write_filelist(w / "ds", [("v0", "TRAIN"), ("v1", "TEST")], fps=50, frames=6)
    rng = np.random.default_rng(0)
    os.makedirs(w / "ds" / "Videos")
    for name in ("v0", "v1"):
        data.save_video(str(w / "ds" / "Videos" / f"{name}.avi"),
                        data.phantom_video(rng, 6, 50)[0], 50)
    data.main(["encode", "--root", str(w / "ds"), "--vae", str(w / "vae"), "--gray-scale",
               "--device", "cpu"])
    write_filelist(w / "lat", [(f"v{i}", "TRAIN") for i in range(4)])
    os.makedirs(w / "lat" / "Latents")
    for i in range(4):
        torch.save(torch.randn(20, 4, 14, 14), w / "lat" / "Latents" / f"v{i}.pt")
    net = model.UNetSpatioTemporal(model.UNET_PRESETS["tiny"])
    opt = torch.optim.AdamW(net.parameters())
    model.save_checkpoint(str(w / "run"), 1, {
        "model": net.state_dict(), "optimizer": opt.state_dict(), "scaler": {},
        "trainer": {"step": 1, "epoch": 0, "batch": 1, "world_size": 1},
        "ema": {"step": 1, "max_decay": 0.999, "model": net.state_dict()},
        "training_config": {"model": "unet", "preset": "tiny"},
        "model_config": model.config_to_dict(net)}, keep=1)
    sample.main(SAMPLE.format(w=w, t=w / "samples").split()[:-2] + ["--save_as", "pt,jpg"])
    return w


# --- what each case sets up ----------------------------------------------------------------------

def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def fps_0(w, t):
    write_filelist(t / "d", [("v0", "TRAIN")], fps=0)
    os.makedirs(t / "d" / "Latents")


def random_bytes(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).bytes(999))


def not_a_tensor(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"x": NotATensor()}, path)


def truncated_jpg(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data.save_video(path + ".d", np.full((1, 112, 112, 3), 99, np.uint8), 1, "jpg")
    raw = open(os.path.join(path + ".d", "0000.jpg"), "rb").read()
    shutil.rmtree(path + ".d")
    with open(path, "wb") as f:
        f.write(raw[:len(raw) // 2])


def full_disk(path):
    """`path` (a temporary name a command will write) leads to /dev/full: every write fails
    with ENOSPC, as on a full disk."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.symlink("/dev/full", path)


def read_only(folder):
    """A folder nobody may write into, holding one file; returns the undo. Root ignores file
    modes, so as root the folder is made immutable (chattr +i)."""
    os.makedirs(folder)
    (folder / "keep.txt").write_text("finished")
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
            pytest.skip("root without chattr +i: no read-only folder to test with")
        return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)
    os.chmod(folder, 0o555)
    return lambda: os.chmod(folder, 0o755)


def held(folder):
    """Another run's lock on `folder` (an flock on its own open file); returns the release."""
    lock = data.locked(str(folder), "--out")
    lock.__enter__()
    return lambda: lock.__exit__(None, None, None)


# --- the cases: (id, command, arguments, setup(world, tmp) or None, expected in the message) ----
# Arguments and expected text use {w} (the world), {t} (the case's own folder), {root} (repo).

TRAIN = "--config {root}/configs/tiny.json --data {w}/lat --out {t}/run --workers 0 "
SAMPLE = ("--unet {w}/unet --vae {w}/vae --conditioning {w}/cond --output {t} --num_samples 1 "
          "--num_steps 2 --frames 8 --save_as pt")
SAMPLE_T = SAMPLE.replace("--output {t}", "--output {t}/s") + " "
ENCODE = "encode --root {w}/ds --vae {w}/vae --device cpu "
EVAL = "--out {t}/m.jsonl --no-progress --workers 0 --no-cache "
CKPT = "checkpoint-1"

CASES = [
    # data.py phantom
    ("phantom-negative-count", "data.py", "phantom --out {t}/ph --num-videos -2", None,
     "--num-videos -2: must be"),
    ("phantom-zero-count", "data.py", "phantom --out {t}/ph --num-videos 0", None,
     "--num-videos 0: must be"),
    ("phantom-zero-workers", "data.py", "phantom --out {t}/ph --num-videos 1 --workers 0", None,
     "--workers 0: must be"),
    ("phantom-negative-seed", "data.py", "phantom --out {t}/ph --seed -1", None,
     "--seed -1: must be"),
    ("phantom-read-only-out", "data.py", "phantom --out {t}/ro/ph --num-videos 1 --workers 1",
     lambda w, t: read_only(t / "ro"), "{t}/ro/ph"),
    ("phantom-full-disk", "data.py", "phantom --out {t}/ph --num-videos 1 --workers 1",
     lambda w, t: full_disk(t / "ph" / "Videos" / "phantom_00000.avi.tmp"),
     "no space left on device while writing {t}/ph/Videos/phantom_00000.avi"),
    # data.py encode
    ("encode-unet-as-vae", "data.py", ENCODE.replace("{w}/vae", "{w}/unet") + "--out {t}/e", None,
     "--vae {w}/unet: "),
    ("encode-zero-batch-size", "data.py", ENCODE + "--out {t}/e --batch-size 0", None,
     "--batch-size 0: must be"),
    ("encode-missing-vae", "data.py", ENCODE.replace("{w}/vae", "{t}/no-vae") + "--out {t}/e", None,
     "--vae {t}/no-vae"),
    ("encode-missing-root", "data.py", ENCODE.replace("{w}/ds", "{t}/nowhere"), None,
     "{t}/nowhere/FileList.csv"),
    ("encode-resume-other-vae", "data.py", ENCODE.replace("/vae", "/vae2") + "--gray-scale",
     None, "--vae 'sha256:"),
    ("encode-resume-without-gray-scale", "data.py", ENCODE, None, "--gray-scale True -> False"),
    ("encode-resume-other-seed", "data.py", ENCODE + "--gray-scale --seed 1", None,
     "--seed 0 -> 1"),
    ("encode-resume-mean", "data.py", ENCODE + "--gray-scale --mean", None,
     "--mean False -> True"),
    ("encode-fps-0-in-filelist", "data.py", ENCODE.replace("{w}/ds", "{t}/d"), fps_0,
     "{t}/d/FileList.csv, line 2 (v0): FPS 0.0 is not positive"),
    ("encode-full-disk", "data.py", ENCODE + "--out {t}/e --gray-scale",
     lambda w, t: full_disk(t / "e" / "Latents" / "v0.pt.tmp"),
     "no space left on device while writing {t}/e/Latents/v0.pt"),
    ("encode-read-only-out", "data.py", ENCODE + "--out {t}/ro",
     lambda w, t: read_only(t / "ro"), "{t}/ro/Latents"),
    ("encode-random-bytes-vae", "data.py", ENCODE.replace("{w}/vae", "{t}/v") + "--out {t}/e",
     lambda w, t: random_bytes(copy(w / "vae", t / "v") / model.WEIGHTS_NAME),
     "{t}/v/diffusion_pytorch_model.safetensors: unreadable"),
    ("encode-folder-in-use", "data.py", ENCODE + "--gray-scale",
     lambda w, t: held(w / "ds" / "Latents"), "--root {w}/ds/Latents: in use by another run"),
    # data.py reference
    ("reference-zero-frames", "data.py", "reference --root {w}/ds --out {t}/r --frames 0", None,
     "--frames 0: must be"),
    ("reference-nan-fps", "data.py", "reference --root {w}/ds --out {t}/r --fps nan", None,
     "--fps nan: must be"),
    ("reference-fps-0-in-filelist", "data.py", "reference --root {t}/d --out {t}/r", fps_0,
     "{t}/d/FileList.csv, line 2 (v0): FPS 0.0 is not positive"),
    ("reference-missing-root", "data.py", "reference --root {t}/nowhere --out {t}/r", None,
     "{t}/nowhere/FileList.csv"),
    # train.py
    ("train-negative-lr", "train.py", TRAIN + "--lr -1", None, "--lr -1.0: must be"),
    ("train-zero-batch-size", "train.py", TRAIN + "--batch-size 0", None,
     "--batch-size 0: must be"),
    ("train-nan-ema-decay", "train.py", TRAIN + "--ema-decay nan", None,
     "--ema-decay nan: must be"),
    ("train-wrong-latent-shape", "train.py", TRAIN.replace("{w}/lat", "{t}/lat"),
     lambda w, t: torch.save(torch.zeros(20, 3, 14, 14), copy(w / "lat", t / "lat")
                             / "Latents" / "v2.pt"), "{t}/lat/Latents/v2.pt: latent of shape"),
    ("train-random-bytes-latent", "train.py", TRAIN.replace("{w}/lat", "{t}/lat"),
     lambda w, t: random_bytes(copy(w / "lat", t / "lat") / "Latents" / "v2.pt"),
     "{t}/lat/Latents/v2.pt: unreadable latent"),
    ("train-non-tensor-latent", "train.py", TRAIN.replace("{w}/lat", "{t}/lat"),
     lambda w, t: not_a_tensor(copy(w / "lat", t / "lat") / "Latents" / "v2.pt"),
     "{t}/lat/Latents/v2.pt: unreadable latent"),
    ("train-fps-0-in-filelist", "train.py", TRAIN.replace("{w}/lat", "{t}/d"), fps_0,
     "{t}/d/FileList.csv, line 2 (v0): FPS 0.0 is not positive"),
    ("train-non-tensor-trainer-pt", "train.py", TRAIN,
     lambda w, t: not_a_tensor(copy(w / "run", t / "run") / CKPT / "trainer.pt"),
     "{t}/run/checkpoint-1/trainer.pt: unreadable"),
    ("train-random-bytes-ema-pt", "train.py", TRAIN,
     lambda w, t: random_bytes(copy(w / "run", t / "run") / CKPT / "ema.pt"),
     "{t}/run/checkpoint-1/ema.pt: unreadable"),
    ("train-read-only-out", "train.py", TRAIN.replace("{t}/run", "{t}/ro/run"),
     lambda w, t: read_only(t / "ro"), "{t}/ro/run"),
    ("train-run-folder-in-use", "train.py", TRAIN, lambda w, t: held(t / "run"),
     "--out {t}/run: in use by another run"),
    ("train-config-not-json", "train.py", "--config {t}/c.json",
     lambda w, t: (t / "c.json").write_text("{"), "{t}/c.json: not a JSON object"),
    ("train-unet-as-vae", "train.py", TRAIN + "--vae {w}/unet --preview-every 1", None,
     "{w}/unet/config.json: this folder holds a UNetSpatioTemporalConditionModel"),
    ("train-missing-data", "train.py", TRAIN.replace("{w}/lat", "{t}/nowhere"), None,
     "{t}/nowhere"),
    # export.py
    ("export-non-tensor-ema-pt", "export.py", "--checkpoint {t}/run --out {t}/m",
     lambda w, t: not_a_tensor(copy(w / "run", t / "run") / CKPT / "ema.pt"),
     "{t}/run/checkpoint-1/ema.pt: unreadable"),
    ("export-non-tensor-trainer-pt", "export.py", "--checkpoint {t}/run --out {t}/m",
     lambda w, t: not_a_tensor(copy(w / "run", t / "run") / CKPT / "trainer.pt"),
     "{t}/run/checkpoint-1/trainer.pt: unreadable"),
    ("export-existing-out", "export.py", "--checkpoint {w}/run --out {w}/unet", None,
     "{w}/unet exists"),
    ("export-missing-checkpoint", "export.py", "--checkpoint {t}/nowhere --out {t}/m", None,
     "{t}/nowhere"),
    ("export-read-only-out", "export.py", "--checkpoint {w}/run --out {t}/ro/m",
     lambda w, t: read_only(t / "ro"), "{t}/ro/m"),
    # export.py detectors
    ("convert-corrupt-file", "export.py detectors", "{t}/inception-2015-12-05.pt --out {t}/det",
     lambda w, t: random_bytes(t / "inception-2015-12-05.pt"), "inception-2015-12-05.pt"),
    ("convert-missing-file", "export.py detectors", "{t}/inception-2015-12-05.pt --out {t}/det",
     None, "inception-2015-12-05.pt"),
    # sample.py
    ("sample-random-bytes-unet", "sample.py", SAMPLE_T.replace("{w}/unet", "{t}/u"),
     lambda w, t: random_bytes(copy(w / "unet", t / "u") / model.WEIGHTS_NAME),
     "{t}/u/diffusion_pytorch_model.safetensors: unreadable"),
    ("sample-non-tensor-bin", "sample.py", SAMPLE_T.replace("{w}/unet", "{t}/u"),
     lambda w, t: (os.remove(copy(w / "unet", t / "u") / model.WEIGHTS_NAME),
                   not_a_tensor(t / "u" / "diffusion_pytorch_model.bin")),
     "{t}/u/diffusion_pytorch_model.bin: unreadable"),
    ("sample-nan-guidance", "sample.py", SAMPLE_T + "--guidance nan", None,
     "--guidance nan: must be"),
    ("sample-inf-guidance", "sample.py", SAMPLE_T + "--guidance inf", None,
     "--guidance inf: must be"),
    ("sample-zero-num-samples", "sample.py", SAMPLE_T + "--num_samples 0", None,
     "--num_samples 0: must be"),
    ("sample-zero-fps", "sample.py", SAMPLE_T + "--fps 0", None, "--fps 0.0: must be"),
    ("sample-zero-batch-size", "sample.py", SAMPLE_T + "--batch_size 0", None,
     "--batch_size 0: must be"),
    ("sample-random-bytes-conditioning", "sample.py", SAMPLE_T.replace("{w}/cond", "{t}/c"),
     lambda w, t: random_bytes(t / "c" / "a.pt"), "{t}/c/a.pt: unreadable"),
    ("sample-truncated-jpg-conditioning", "sample.py", SAMPLE_T.replace("{w}/cond", "{t}/c"),
     lambda w, t: truncated_jpg(str(t / "c" / "a.jpg")), "{t}/c/a.jpg: unreadable"),
    ("sample-read-only-output", "sample.py", SAMPLE_T.replace("{t}/s", "{t}/ro/s"),
     lambda w, t: read_only(t / "ro"), "{t}/ro/s"),
    ("sample-resume-other-seed", "sample.py",
     SAMPLE.replace("{t}", "{w}/samples").replace("save_as pt", "save_as pt,jpg") + " --seed 1",
     None,
     "holds results made with other settings (seed 0 -> 1)"),
    ("sample-full-disk", "sample.py", SAMPLE_T,
     lambda w, t: full_disk(t / "s" / "FileList.csv.tmp"),
     "no space left on device while writing {t}/s/FileList.csv"),
    # evaluate.py
    ("evaluate-truncated-jpg", "evaluate.py", EVAL + "--fake {t}/s/jpg --metrics ef",
     lambda w, t: truncated_jpg(str(copy(w / "samples", t / "s") / "jpg" / "sample_000000"
                                    / "0003.jpg")),
     "{t}/s/jpg/sample_000000/0003.jpg: unreadable image"),
    ("evaluate-random-bytes-jpg", "evaluate.py", EVAL + "--fake {t}/s/jpg --metrics ef",
     lambda w, t: random_bytes(copy(w / "samples", t / "s") / "jpg" / "sample_000000"
                               / "0000.jpg"),
     "{t}/s/jpg/sample_000000/0000.jpg: unreadable image"),
    ("evaluate-random-bytes-detector", "evaluate.py", EVAL + "--fake {w}/samples/jpg --real "
     "{w}/samples/jpg --metrics fid10_full --detectors {t}/det",
     lambda w, t: random_bytes(t / "det" / detectors.FILES["inception"]),
     "{t}/det/inception-2015-12-05.safetensors: not a readable safetensors file"),
    ("evaluate-missing-fake", "evaluate.py", EVAL + "--fake {t}/nowhere --metrics ef", None,
     "--fake"),
]
MESSAGES = {}  # id -> the message seen, paths as placeholders (for docs/bad_inputs.md)


def snapshot(*folders):
    """{file: sha256} of every regular file under the folders (a .lock holds only a pid), and
    the set of temporary (.tmp) names."""
    files, tmps = {}, set()
    for folder in folders:
        for where, dirs, names in os.walk(folder):
            tmps |= {os.path.join(where, n) for n in dirs + names if n.endswith(".tmp")}
            for name in names:
                path = os.path.join(where, name)
                if name != ".lock" and not os.path.islink(path):
                    with open(path, "rb") as f:
                        files[path] = hashlib.sha256(f.read()).hexdigest()
    return files, tmps


def call(command, argv, capsys):
    """(exit code, message, all output) of main(argv) run in this process."""
    try:
        MAINS[command](argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    message = code if isinstance(code, str) else err.strip()
    return code, message, out + err


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(world, tmp_path, capsys, case):
    name, command, args, setup, expected = case
    where = {"w": world, "t": tmp_path, "root": ROOT}
    undo = setup(world, tmp_path) if setup else None
    before = snapshot(world, tmp_path)
    try:
        code, message, output = call(command, shlex.split(args.format(**where)), capsys)
    finally:
        if callable(undo):
            undo()
    after = snapshot(world, tmp_path)
    MESSAGES[name] = re.sub(r"pid \d+ on [^;\s]+", "pid N on HOST", message.replace(
        str(tmp_path), "{t}").replace(str(world), "{w}").replace(ROOT, "{root}"))
    assert code not in (0, None), f"exit code {code}: {output}"
    assert expected.format(**where) in message, message
    assert "\n" not in message and "Traceback" not in output, output
    assert {k: after[0].get(k) for k in before[0]} == before[0], "a finished file changed"
    assert after[1] <= before[1], f"temporary files left: {after[1] - before[1]}"


def doc_table(messages):
    lines = ["| case | command | message |", "|---|---|---|"]
    for name, command, args, _, expected in CASES:
        text = messages.get(name, expected).replace("|", "\\|")
        lines.append(f"| {name} | `python {command} {args.strip()}` | {text} |")
    return "\n".join(lines) + "\n"


def test_docs_table_lists_every_case():
    """docs/bad_inputs.md has a row per case, with its command and the expected message."""
    if os.environ.get("UPDATE_BAD_INPUTS_DOC") and len(MESSAGES) == len(CASES):
        text = open(DOC).read()
        start = text.index("| case | command | message |")
        end = text.index("\n\n", start) + 1
        with open(DOC, "w") as f:
            f.write(text[:start] + doc_table(MESSAGES) + text[end:])
    text = open(DOC).read()
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)
    for name, command, args, _, expected in CASES:
        row = next((r for r in text.splitlines()
                    if r.startswith(f"| {name} | `python {command} {args.strip()}` |")), None)
        assert row is not None, f"docs/bad_inputs.md has no row for {name}"
        assert expected.replace("|", "\\|") in row, f"{name}: {expected!r} not in {row!r}"


def test_written_files_get_the_umasks_permissions(world, tmp_path):
    """Model folders, latents, samples and FileLists are readable by other users (0644 with
    umask 022), not 0600 as safetensors' save_file makes them."""
    old = os.umask(0o022)
    try:
        model.AutoencoderKL(model.VAE_PRESETS["tiny"]).save_pretrained(str(tmp_path / "m"))
        data.save(str(tmp_path / "x.pt"), torch.zeros(2))
        data.write_filelist(str(tmp_path / "FileList.csv"), [])
    finally:
        os.umask(old)
    paths = [tmp_path / "m" / model.WEIGHTS_NAME, tmp_path / "m" / "config.json",
             tmp_path / "x.pt", tmp_path / "FileList.csv",
             world / "ds" / "Latents" / "v0.pt", world / "samples" / "pt" / "sample_000000.pt"]
    assert {p.name: oct(os.stat(p).st_mode & 0o777) for p in paths[:4]} == {
        p.name: "0o644" for p in paths[:4]}
    assert all(os.stat(p).st_mode & 0o044 == 0o044 for p in paths[4:])


def test_encode_failing_before_its_first_latent_leaves_no_settings(world, tmp_path, capsys):
    """An encode that fails before writing a latent (here: a corrupt first video) leaves no
    settings.json; the corrected command with other flags then runs."""
    root = tmp_path / "d"
    write_filelist(root, [("v0", "TRAIN")], fps=50, frames=6)
    os.makedirs(root / "Videos")
    random_bytes(root / "Videos" / "v0.avi")
    code, message, _ = call("data.py", ["encode", "--root", str(root), "--vae",
                                        str(world / "vae"), "--device", "cpu"], capsys)
    assert code == 1 and not os.path.exists(root / "Latents" / "settings.json")
    shutil.copy(world / "ds" / "Videos" / "v0.avi", root / "Videos" / "v0.avi")
    code, message, _ = call("data.py", ["encode", "--root", str(root), "--vae",
                                        str(world / "vae2"), "--seed", "3", "--device", "cpu"],
                            capsys)
    assert code == 0 and (root / "Latents" / "v0.pt").is_file(), message
    assert '"--seed": 3' in (root / "Latents" / "settings.json").read_text()


@pytest.mark.slow
def test_two_concurrent_runs_into_one_folder(world, tmp_path, capsys):
    """Run A (a process of its own) holds <out>/.lock; run B into the same folder is refused
    with a one-line message naming A's pid, writes nothing; A finishes: 12 videos in both
    formats, FileList.csv with 12 rows, no temporary file."""
    out = tmp_path / "out"
    argv = (SAMPLE.format(w=world, t=out).replace("--num_samples 1", "--num_samples 12")
            .replace("--num_steps 2", "--num_steps 8") + ",jpg --batch_size 1").split()
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "sample.py"), *argv],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not (out / ".lock").is_file() or not (out / ".lock").read_text():
            assert first.poll() is None and time.time() < deadline, first.communicate()[0]
            time.sleep(0.05)
        with pytest.raises(SystemExit) as e:
            sample.main(argv)
        message = str(e.value)
        assert first.poll() is None, "run A finished before run B tried: make A longer"
        assert message.startswith("error: --output ") and f"pid {first.pid} on " in message
        assert "\n" not in message and "Traceback" not in capsys.readouterr().err
        log = first.communicate(timeout=600)[0]
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, log
    names = [f"sample_{i:06d}" for i in range(12)]
    assert sorted(os.listdir(out / "jpg")) == names
    assert sorted(os.listdir(out / "pt")) == [f"{n}.pt" for n in names]
    assert all(len(os.listdir(out / "jpg" / n)) == 8 for n in names)
    with open(out / "FileList.csv") as f:
        assert [r["FileName"] for r in csv.DictReader(f)] == names
