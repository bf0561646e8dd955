"""Bad inputs and careless use (issue 14), for sample.py: two runs started into one output folder
at the same time. The second is refused at once with a one-line message naming the first's pid;
the first finishes and its files are complete. (The other cases of sample.py's table are in
tests/test_sample.py: numbers, settings, the lock of a dead process.)"""

import csv
import os
import subprocess
import sys
import time

import pytest
import torch

import model
import sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny UNet and VAE folders (random weights) and a conditioning folder of two latents."""
    root = tmp_path_factory.mktemp("bad_inputs")
    model.UNetSpatioTemporal(model.UNET_PRESETS["tiny"]).save_pretrained(str(root / "unet"))
    model.AutoencoderKL(model.VAE_PRESETS["tiny"]).save_pretrained(str(root / "vae"))
    os.makedirs(root / "cond")
    for name in ("a", "b"):
        torch.save(torch.randn(4, 14, 14), root / "cond" / f"{name}.pt")
    return root


def args(folders, out, n):
    return ["--unet", str(folders / "unet"), "--vae", str(folders / "vae"), "--conditioning",
            str(folders / "cond"), "--output", str(out), "--num_samples", str(n), "--batch_size",
            "1", "--num_steps", "8", "--frames", "8", "--save_as", "pt,jpg"]


@pytest.mark.slow
def test_two_concurrent_runs_into_one_folder(folders, tmp_path, capsys):
    """Run A (a process of its own) holds <out>/.lock; run B into the same folder is refused
    with a one-line message naming A's pid, writes nothing; A finishes: 12 videos in both
    formats, FileList.csv with 12 rows, no temporary file."""
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "sample.py"),
                              *args(folders, out, 12)], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not (out / ".lock").is_file() or not (out / ".lock").read_text():
            assert first.poll() is None and time.time() < deadline, first.communicate()[0]
            time.sleep(0.05)
        with pytest.raises(SystemExit) as e:
            sample.main(args(folders, out, 12))
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
