"""benchmarks/bench_metrics_floor.py's options on a 10-phantom world, evaluate.py stubbed: who
qualifies at --fps, the folders' lengths and frame rate, the metric list, the errors."""

import importlib.util
import os
import sys

import numpy as np
import PIL.Image
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import data  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_metrics_floor.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_metrics_floor", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    # Seed 0, 10 videos: TEST phantom_00006 (174 frames at 49 fps, 3.55 s); TRAIN ones of 2.88,
    # 3.22, 3.37, 3.41, 4.24, 4.42, 4.93 and 5.51 s.
    root = str(tmp_path_factory.mktemp("world"))
    data.make_phantom(root, num_videos=10, seed=0, workers=1)
    return root


def run(bench, monkeypatch, *argv):
    """main() with evaluate.main recorded, not run; returns its first argv as a dict (--runs 1:
    the only one)."""
    calls = []
    monkeypatch.setattr(bench.evaluate, "main", lambda a: calls.append(a) or [
        (m, 1.0) for m in a[a.index("--metrics") + 1].split(",")])
    bench.main(bench.parser.parse_args(["--runs", "1", *argv]))
    (args,) = calls
    return dict(zip(args[::2], args[1::2]))


def test_fps_frames_and_metrics(bench, world, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "floor")
    args = run(bench, monkeypatch, "--phantom", world, "--out", out, "--fps", "16",
               "--fake-frames", "32", "--real-frames", "64")
    printed = capsys.readouterr().out
    assert "1 of 1 TEST phantoms last at least 2 s (32 frames at 16 fps)" in printed
    assert "4 of 8 TRAIN phantoms last at least 4 s (64 frames at 16 fps)" in printed
    assert args["--metrics"] == "fid32_full,fvd1_32f"
    assert sorted(os.listdir(args["--fake"])) == ["phantom_00006"]
    (real,) = os.listdir(args["--real"])
    assert len(os.listdir(os.path.join(args["--fake"], "phantom_00006"))) == 32
    assert len(os.listdir(os.path.join(args["--real"], real))) == 64
    # The fake folder holds the video resampled to 16 fps, not 32 (jpg: near, not equal).
    video, _ = data.read_video(os.path.join(world, "Videos", "phantom_00006.avi"))
    gray = video.astype(np.float32).mean(-1)
    jpgs = np.stack([np.asarray(PIL.Image.open(os.path.join(args["--fake"], "phantom_00006",
                                                            f"{i:04d}.jpg")).convert("L"))
                     for i in range(32)]).astype(np.float32)
    err = {fps: np.abs(jpgs - gray[data.resample_indices(174, 49, fps)[:32]]).mean()
           for fps in (16, 32)}
    assert err[16] < 1 < err[32]
    args = run(bench, monkeypatch, "--phantom", world, "--out", out, "--fps", "16",
               "--fake-frames", "32", "--real-frames", "64", "--no-fid")
    assert args["--metrics"] == "fvd1_32f"


def test_too_short(bench, world, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit, match="--real-frames 16 is shorter than the --fake-frames 128"):
        run(bench, monkeypatch, "--phantom", world, "--fake-frames", "128", "--real-frames", "16")
    with pytest.raises(SystemExit, match="no TEST or no TRAIN phantom is long enough"):
        run(bench, monkeypatch, "--phantom", world, "--out", str(tmp_path / "f"),
            "--fake-frames", "128", "--real-frames", "144")      # 4 s at 32 fps: none
    assert "0 of 1 TEST phantoms last at least 4 s" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "f")
