"""Scale-out tests on the CPU: two torchrun "nodes" on this machine (gloo) train to the weights of
one process with the same global batch; two torchrun processes sample the same files as one, and
a set left by a failed process is finished by a run with another process count;
benchmarks/gpu_check.py --smoke runs every group of the GPU check with the tiny presets and fills
every row; its guards and time budget mark what fails or overflows. OMP_NUM_THREADS=1 in every
process keeps the runs exact (see test_train.py)."""

import csv
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

import model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.json")
SAMPLE = os.path.join(ROOT, "sample.py")
GPU_CHECK = os.path.join(ROOT, "benchmarks", "gpu_check.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def make_latents(root, lengths=(5, 8, 3, 20, 6, 30)):
    """An EchoNet-layout latent root of random [T, 4, 14, 14] latents (as test_train.py's):
    NumberOfFrames says 100, so the shorter videos give padded clips with uneven real frames."""
    os.makedirs(os.path.join(root, "Latents"))
    g = torch.Generator().manual_seed(0)
    rows = []
    for i, T in enumerate(lengths):
        latent = torch.randn(T, 4, 14, 14, generator=g)
        torch.save(latent, os.path.join(root, "Latents", f"v{i}.pt"))
        rows.append({"FileName": f"v{i}", "EF": 20 + 9 * i, "ESV": 1, "EDV": 2, "FrameHeight": 112,
                     "FrameWidth": 112, "FPS": 32, "NumberOfFrames": 100, "Split": "TRAIN"})
    with open(os.path.join(root, "FileList.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(root)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(out, step, name):
    return torch.load(os.path.join(out, f"checkpoint-{step}", name), weights_only=True)


def assert_close(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=atol), (k, (a[k] - b[k]).abs().max())


# --- multi-node training -------------------------------------------------------------------------


@pytest.mark.slow
def test_two_nodes_train_like_one_process(tmp_path):
    """Two torchrun launches, --nnodes 2 --nproc_per_node 1 with a c10d rendezvous on 127.0.0.1
    (the README's multi-node line, one process per "node"), 2 clips each: after 2 steps the
    weights and the EMA equal one process's with the same global batch of 4 (2 accumulation
    steps of 2 clips), to 1e-6 as the 2-process test in test_train.py."""
    root = make_latents(tmp_path / "d")
    common = ["--config", TINY, "--data", root, "--batch-size", "4", "--batch-per-gpu", "2",
              "--max-steps", "2", "--checkpoint-every", "2", "--preview-every", "0"]
    nodes, port = tmp_path / "nodes", free_port()
    procs = []
    for host in ("true", "false"):  # the first launch hosts the rendezvous store
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc_per_node", "1", "--rdzv_backend", "c10d",
               "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "test-scale",
               "--rdzv_conf", f"is_host={host}", os.path.join(ROOT, "train.py"), *common,
               "--out", str(nodes)]
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log
    one = tmp_path / "one"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *common, "--out", str(one)],
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert_close(load(nodes, 2, "model.pt"), load(one, 2, "model.pt"), atol=1e-6)
    assert_close(load(nodes, 2, "ema.pt")["model"], load(one, 2, "ema.pt")["model"], atol=1e-6)


# --- sampling under torchrun --------------------------------------------------------------------


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """Tiny UNet and VAE folders, a conditioning folder of three latents, and the reference: one
    plain process sampling 6 videos in batches of 2 (pt latents and jpg frames)."""
    root = tmp_path_factory.mktemp("sampling")
    g = torch.Generator().manual_seed(0)
    for name, net in (("unet", model.UNetSpatioTemporal(model.UNET_PRESETS["tiny"])),
                      ("vae", model.AutoencoderKL(model.VAE_PRESETS["tiny"]))):
        with torch.no_grad():  # perturbed, so that no layer is zero
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.03)
        net.save_pretrained(str(root / name))
    os.makedirs(root / "cond")
    for name in ("a", "b", "c"):
        torch.save(torch.randn(4, 14, 14, generator=g), root / "cond" / f"{name}.pt")
    p = subprocess.run(sample_command(root, root / "one"), cwd=root, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return root


def sample_command(root, out, processes=0, script=SAMPLE):
    """sample.py (or a wrapper `script`) on 6 videos of 8 frames, 2 steps, batches of 2: plain
    python, or under torchrun with `processes` processes (--standalone: a local rendezvous)."""
    launch = [sys.executable]
    if processes:
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(processes)]
    return [*launch, script, "--unet", str(root / "unet"), "--vae", str(root / "vae"),
            "--conditioning", str(root / "cond"), "--output", str(out), "--num_samples", "6",
            "--batch_size", "2", "--num_steps", "2", "--frames", "8", "--save_as", "pt,jpg"]


def assert_same_videos(a, b, indices):
    """Videos `indices` of folders a and b: equal latents (torch.equal) and jpg bytes."""
    for i in indices:
        name = f"sample_{i:06d}"
        assert torch.equal(torch.load(a / "pt" / f"{name}.pt"), torch.load(b / "pt" / f"{name}.pt"))
        frames = sorted(os.listdir(a / "jpg" / name))
        assert frames == sorted(os.listdir(b / "jpg" / name)) and len(frames) == 8
        for f in frames:
            assert (a / "jpg" / name / f).read_bytes() == (b / "jpg" / name / f).read_bytes(), f


@pytest.mark.slow
def test_torchrun_sampling_writes_what_one_process_writes(sampled, tmp_path):
    """`torchrun --nproc_per_node 2 sample.py` (gloo): batch k of the 6 videos goes to process
    k mod 2; the same .pt latents, jpg frames and FileList.csv rows as one process, and one
    progress bar (rank 0's) that counts the videos of both processes."""
    p = subprocess.run(sample_command(sampled, tmp_path / "two", processes=2), cwd=tmp_path,
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert_same_videos(sampled / "one", tmp_path / "two", range(6))
    assert (tmp_path / "two" / "FileList.csv").read_text() == \
        (sampled / "one" / "FileList.csv").read_text()
    assert "6/6 [" in p.stderr  # rank 0 sampled 4 of them


@pytest.mark.slow
def test_failed_process_keeps_finished_videos_and_another_count_finishes(sampled, tmp_path):
    """Under torchrun with 2 processes, rank 0 fails writing video 4 (its second batch, [4, 5]):
    non-zero exit, videos 0-3 of both processes finished and equal to one process's, no
    FileList.csv. One plain process then finishes the set: videos 0-3 not rewritten, 4-5 and
    FileList.csv equal to the unbroken run's."""
    wrapper = tmp_path / "failing_sample.py"
    wrapper.write_text(
        "import sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import sample\n"
        "save = sample.data.save_video\n"
        "def failing(path, *args):\n"
        "    if 'sample_000004' in path:\n"
        "        raise OSError('simulated write error')\n"
        "    save(path, *args)\n"
        "sample.data.save_video = failing\n"
        "sample.main()\n")
    out = tmp_path / "out"
    p = subprocess.run(sample_command(sampled, out, processes=2, script=str(wrapper)),
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "simulated write error" in p.stdout + p.stderr
    assert sorted(os.listdir(out / "jpg"))[:4] == [f"sample_{i:06d}" for i in range(4)]
    assert not (out / "jpg" / "sample_000004").exists() and not (out / "FileList.csv").exists()
    assert_same_videos(sampled / "one", out, range(4))
    stamps = {f: f.stat().st_mtime_ns for f in (out / "pt").iterdir() if f.name < "sample_000004"}

    p = subprocess.run(sample_command(sampled, out), cwd=tmp_path, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert {f: f.stat().st_mtime_ns for f in stamps} == stamps
    assert_same_videos(sampled / "one", out, range(6))
    assert (out / "FileList.csv").read_text() == (sampled / "one" / "FileList.csv").read_text()


# --- benchmarks/gpu_check.py ---------------------------------------------------------------------


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", GPU_CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gpu_check_smoke_fills_every_row(tmp_path):
    """`gpu_check.py --smoke` runs every group on the CPU with the tiny presets: exit code 0, and
    every row of the table in the JSON has a number (a kernel name for the SDPA rows) or says
    why it was skipped. Only the CUDA memory rows may skip; fp32 parity with diffusers is exact."""
    out = tmp_path / "check.json"
    p = subprocess.run([sys.executable, GPU_CHECK, "--smoke", "--out", str(out)], cwd=tmp_path,
                       env=ENV, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    result = json.load(open(out))
    rows = {r["key"]: r for r in result["rows"]}
    assert list(rows) == [key for key, *_ in gpu_check().ROWS]
    skipped = set()
    for key, r in rows.items():
        if r["status"] == "skipped":
            assert r["note"].startswith("skipped: CUDA only"), r
            skipped.add(key)
        elif key.startswith("sdpa"):
            assert r["status"] == "ok" and isinstance(r["value"], str) and r["value"], r
        else:
            assert r["status"] == "ok" and isinstance(r["value"], float), r
            assert math.isfinite(r["value"]) and r["value"] >= 0, r
    assert skipped == {"mem_ours", "mem_ours_ckpt", "mem_ref", "mem_ref_ckpt"}
    assert rows["unet_fp32"]["value"] == 0.0 and rows["vae_fp32"]["value"] == 0.0
    assert "no SDPA call" not in rows["sdpa_unet"]["value"]
    assert sorted(result["group_seconds"]) == sorted(gpu_check().GROUPS)
    assert "seconds per group" in p.stdout


def test_gpu_check_guards_errors_and_the_budget():
    """A group that raises gets its error on each of its rows; one that runs past the budget is
    stopped by the alarm and its rows say so; a group that would not fit is skipped unrun."""
    gc = gpu_check()
    ck = gc.Check(gc.SMOKE, gc.parser.parse_args(["--smoke"]))

    def broken(ck):
        ck.record("vae_fp32", 0.0)
        raise ValueError("no such kernel\nsecond line")

    gc.run_group(ck, "parity_vae", broken)
    assert ck.rows["vae_fp32"]["status"] == "ok"  # what was measured before the error stays
    assert ck.rows["vae_bf16"]["note"] == "error: ValueError: no such kernel"
    assert ck.rows["vae_fp16"]["status"] == "error"

    ck.end = time.perf_counter() + 0.5  # half a second of budget left
    gc.run_group(ck, "inception", lambda ck: time.sleep(30))
    assert ck.rows["inception"]["status"] == "skipped"
    assert ck.rows["inception"]["note"].startswith("skipped: out of time")
    assert ck.left() < 0
    gc.run_group(ck, "i3d", lambda ck: pytest.fail("must not run"))
    assert ck.rows["i3d_short"]["note"].startswith("skipped: ")
    assert ck.rows["i3d_long"]["status"] == "skipped"


def test_gpu_check_without_cuda_or_with_a_bad_group_says_so(tmp_path):
    """Without CUDA the plain command points to --smoke; an unknown --only group is named."""
    p = subprocess.run([sys.executable, GPU_CHECK, "--smoke", "--only", "parity,train"],
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "parity, train" in p.stderr and "Traceback" not in p.stderr
    if not torch.cuda.is_available():
        p = subprocess.run([sys.executable, GPU_CHECK], cwd=tmp_path, env=ENV,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 1 and "--smoke" in p.stderr and "Traceback" not in p.stderr
