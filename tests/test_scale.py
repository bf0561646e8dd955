"""Scale-out tests on the CPU: two torchrun "nodes" on this machine (gloo) train to the weights of
one process with the same global batch; benchmarks/gpu_check.py --smoke runs every group of the
GPU check with the tiny presets and fills every row; its guards and time budget mark what fails
or overflows. OMP_NUM_THREADS=1 in every process keeps the runs exact (see test_train.py)."""

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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.json")
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
