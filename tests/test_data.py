"""Tests of data.py: FileLists, video I/O, fps resampling, the latent and frame datasets, the
phantom world and its EF measurement, and the reference / encode commands. CPU, small data."""

import csv
import hashlib
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import data  # noqa: E402
from data import DataError  # noqa: E402

# --- helpers -------------------------------------------------------------------------------------


def write_csv(path, header, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def dynamic_row(name, ef=60.0, fps=50, n=200, split="TRAIN"):
    return [name, ef, 40.0, 100.0, 112, 112, fps, n, split]


def latent_root(root, lengths, fps=50, shape=(4, 14, 14)):
    """A latent root whose video i has lengths[i] frames; frame t of every latent is filled with
    the value t, so an item shows which frames it took."""
    names = [f"v{i}" for i in range(len(lengths))]
    write_csv(os.path.join(root, "FileList.csv"), data.FILELIST_COLUMNS,
              [dynamic_row(name, 10.0 * (i + 1), fps, n) for i, (name, n) in
               enumerate(zip(names, lengths))])
    os.makedirs(os.path.join(root, "Latents"))
    for name, n in zip(names, lengths):
        video = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, *shape)
        torch.save(video.clone(), os.path.join(root, "Latents", name + ".pt"))
    return names


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """30 phantom videos (written once for the module)."""
    root = str(tmp_path_factory.mktemp("phantom"))
    data.make_phantom(root, num_videos=30, seed=0, workers=1)
    return root


# --- FileLists -----------------------------------------------------------------------------------


def test_read_filelist_parses_dynamic_rows(tmp_path):
    """Numbers are parsed, `.avi` is stripped, the splits are kept."""
    write_csv(tmp_path / "FileList.csv", data.FILELIST_COLUMNS,
              [dynamic_row("0X1A.avi", 55.5), dynamic_row("0X2B", 12, split="VAL")])
    rows = data.read_filelist(str(tmp_path))
    assert [r["FileName"] for r in rows] == ["0X1A", "0X2B"]
    assert rows[0]["EF"] == 55.5 and rows[0]["FPS"] == 50.0 and rows[0]["NumberOfFrames"] == 200
    assert isinstance(rows[0]["NumberOfFrames"], int) and rows[1]["Split"] == "VAL"


def test_read_filelist_maps_pediatric_folds_and_probes_videos(tmp_path):
    """Folds 0-7 -> TRAIN, 8 -> VAL, 9 -> TEST, Fold kept; frame columns read from the video."""
    folds = [0, 7, 8, 9]
    write_csv(tmp_path / "FileList.csv", ["FileName", "EF", "Sex", "Split"],
              [[f"p{f}.avi", 50 + f, "F", f] for f in folds])
    frames = np.zeros((12, 112, 112), np.uint8)
    os.makedirs(tmp_path / "Videos")
    for f in folds:
        data.save_video(str(tmp_path / "Videos" / f"p{f}.avi"), frames, 30)
    rows = data.read_filelist(str(tmp_path))
    assert [r["Split"] for r in rows] == ["TRAIN", "TRAIN", "VAL", "TEST"]
    assert [r["Fold"] for r in rows] == folds and rows[0]["FileName"] == "p0"
    assert rows[0]["FPS"] == 30.0 and rows[0]["NumberOfFrames"] == 12
    assert rows[0]["FrameHeight"] == rows[0]["FrameWidth"] == 112 and rows[0]["Sex"] == "F"
    data.write_filelist(str(tmp_path / "FileList.csv"), rows)        # normalised, then re-read
    text = (tmp_path / "FileList.csv").read_bytes().decode()
    assert "\r" not in text and text.splitlines()[1].split(",")[6] == "30"  # LF, FPS 30 (pandas')
    again = data.read_filelist(str(tmp_path), probe=False)
    assert [r["Split"] for r in again] == ["TRAIN", "TRAIN", "VAL", "TEST"]
    assert [r["Fold"] for r in again] == folds and again[2]["NumberOfFrames"] == 12


def test_read_filelist_errors_name_the_file_and_problem(tmp_path):
    """Missing FileList, missing columns, EF outside [0, 100] and a bad split are DataErrors."""
    with pytest.raises(DataError, match="FileList.csv"):
        data.read_filelist(str(tmp_path))
    write_csv(tmp_path / "FileList.csv", ["FileName", "ESV"], [["a", 1]])
    with pytest.raises(DataError, match="missing column.*EF, Split"):
        data.read_filelist(str(tmp_path))
    write_csv(tmp_path / "FileList.csv", data.FILELIST_COLUMNS, [dynamic_row("bad", 120)])
    with pytest.raises(DataError, match=r"FileList.csv, line 2 \(bad\): EF 120"):
        data.read_filelist(str(tmp_path))
    write_csv(tmp_path / "FileList.csv", data.FILELIST_COLUMNS, [dynamic_row("s", split="DEV")])
    with pytest.raises(DataError, match="Split 'DEV'"):
        data.read_filelist(str(tmp_path))


def test_main_turns_data_errors_into_a_clean_exit(tmp_path, capsys):
    """The command line prints the message and exits non-zero instead of a traceback."""
    with pytest.raises(SystemExit) as exit_info:
        data.main(["reference", "--root", str(tmp_path), "--out", str(tmp_path / "ref")])
    assert "FileList.csv" in str(exit_info.value.code)


# --- video I/O and resampling --------------------------------------------------------------------


def test_save_and_read_video_in_every_format(tmp_path):
    """avi / mp4 round-trip with their fps, gif and jpg / png folders are written, no temp left."""
    rng = np.random.default_rng(0)
    frames = np.repeat(np.linspace(0, 255, 112, dtype=np.uint8)[None, None, :, None], 112, 1)
    frames = np.repeat(frames, 6, 0) + rng.integers(0, 3, (6, 112, 112, 1), dtype=np.uint8)
    frames = np.repeat(frames, 3, -1)                                  # [6, 112, 112, 3]
    for fmt in ("avi", "mp4"):
        data.save_video(str(tmp_path / f"v.{fmt}"), frames, 32)
        back, fps = data.read_video(str(tmp_path / f"v.{fmt}"))
        assert back.shape == frames.shape and fps == 32.0
        assert np.abs(back.astype(int) - frames).mean() < 3
    data.save_video(str(tmp_path / "v.gif"), frames[..., 0], 32)
    assert Image.open(tmp_path / "v.gif").n_frames == 6
    for fmt in ("jpg", "png"):
        data.save_video(str(tmp_path / fmt), frames, 32, fmt)
        assert sorted(os.listdir(tmp_path / fmt)) == [f"{i:04d}.{fmt}" for i in range(6)]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    small, _ = data.read_video(str(tmp_path / "v.avi"), size=56)
    assert small.shape == (6, 56, 56, 3)


def test_corrupt_or_truncated_video_raises_naming_the_file(tmp_path):
    """Junk bytes, a truncated AVI and a missing file are DataErrors naming the path."""
    (tmp_path / "junk.avi").write_bytes(b"not a video" * 100)
    data.save_video(str(tmp_path / "ok.avi"), np.full((40, 112, 112), 99, np.uint8), 50)
    blob = (tmp_path / "ok.avi").read_bytes()
    (tmp_path / "cut.avi").write_bytes(blob[:len(blob) // 2])
    for name in ("junk.avi", "cut.avi", "missing.avi"):
        with pytest.raises(DataError, match=name):
            data.read_video(str(tmp_path / name))


def test_resample_indices_match_the_original_formula():
    """floor(32 / fps * n) indices, rounded half to even, plus the phase."""
    assert data.resample_indices(10, 50).tolist() == [0, 2, 3, 5, 7, 8]
    assert data.resample_indices(5, 64).tolist() == [0, 2]             # 2.5 rounds to 2
    assert data.resample_indices(7, 16).tolist() == [0, 0, 1, 2, 2, 2, 3, 4, 4, 4, 5, 6, 6, 6]
    assert data.resample_indices(10, 50, phase=1).tolist() == [1, 3, 4, 6, 8, 9]
    assert len(data.resample_indices(112, 50)) == 71                   # floor(71.68)


# --- datasets ------------------------------------------------------------------------------------


def test_latent_dataset_items_are_resampled_windows(tmp_path):
    """Item shapes; the window is 64 consecutive resampled frames; cond is a frame; EF / 100;
    several roots are concatenated."""
    latent_root(str(tmp_path), [150, 300])
    ds = data.LatentVideoDataset(str(tmp_path))
    assert len(ds) == 2 and len(data.LatentVideoDataset([str(tmp_path)] * 3)) == 6  # roots concat
    for index, n in enumerate([150, 300]):
        item = ds[index]
        assert item["latents"].shape == (64, 4, 14, 14) and item["latents"].dtype == torch.float32
        assert item["cond"].shape == (4, 14, 14) and item["n_real"] == 64
        assert item["ef"].dtype == torch.float32 and item["ef"].item() == pytest.approx(
            0.1 * (index + 1))
        taken = item["latents"][:, 0, 0, 0].long().numpy()
        base = data.resample_indices(n, 50)                    # phase in [0, 2), start in
        assert any(np.array_equal(taken, base[start:start + 64] + phase)   # [0, len - 64)
                   for phase in range(base[1]) for start in range(len(base) - 64))
        assert 0 <= item["cond"][0, 0, 0].item() < n


def test_latent_dataset_cond_frame_first_is_the_windows_first_frame(tmp_path):
    """cond_frame "first": cond is the window's first frame and everything else is the item
    cond_frame "random" gives (the same draws)."""
    latent_root(str(tmp_path), [150, 300])
    random, first = (data.LatentVideoDataset(str(tmp_path), seed=5, cond_frame=c)
                     for c in ("random", "first"))
    for index in range(2):
        a, b = random[index], first[index]
        assert torch.equal(b["cond"], b["latents"][0]) and torch.equal(a["latents"], b["latents"])
        assert not torch.equal(a["cond"], b["cond"])


def test_latent_dataset_cond_frame_ed_starts_every_clip_at_end_diastole(tmp_path, phantom):
    """cond_frame "ed": every clip starts at (and is conditioned on) a frame whose measured LV
    cavity is within 10 % of the swing from the video's largest: where sample.py starts."""
    root = str(tmp_path / "p")
    shutil.copytree(phantom, root, ignore=lambda d, names: [n for n in names if n.endswith(".avi")
                                                            and n[-7:-4] > "005"])
    os.makedirs(os.path.join(root, "Latents"))
    names = [n[:-4] for n in sorted(os.listdir(os.path.join(root, "Videos")))]
    for name in names:  # latents whose frame t holds the value t
        n = len(data.read_video(os.path.join(root, "Videos", name + ".avi"))[0])
        video = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 4, 14, 14)
        torch.save(video.clone(), os.path.join(root, "Latents", name + ".pt"))
    ds = data.LatentVideoDataset(root, split=["TRAIN", "VAL", "TEST"], frames=16, fps=12,
                                 cond_frame="ed")
    for epoch in range(3):
        ds.set_epoch(epoch)
        for index, (path, *_) in enumerate(ds.items):
            volumes = data.measure_ef(data.read_video(path.replace("Latents", "Videos")[:-3]
                                                      + ".avi")[0])["volumes"]
            item = ds[index]
            t = int(item["cond"][0, 0, 0])
            assert torch.equal(item["cond"], item["latents"][0]) and item["n_real"] == 16
            swing = np.nanmax(volumes) - np.nanmin(volumes)
            assert volumes[t] >= np.nanmax(volumes) - 0.1 * swing, (path, t)
            assert 0.2 < ds.diastolic[index].mean() < 0.7  # diastasis: 35 % of a phantom's cycle


def test_latent_dataset_pads_a_latent_shorter_than_its_filelist(tmp_path):
    """Frames past the real ones are zero and n_real counts the real ones."""
    latent_root(str(tmp_path), [150])
    torch.save(torch.ones(90, 4, 14, 14), tmp_path / "Latents" / "v0.pt")   # 90 < 150 frames
    item = data.LatentVideoDataset(str(tmp_path))[0]
    assert item["n_real"].dtype == torch.int64 and item["n_real"] == 57     # floor(32/50*90)
    assert (item["latents"][:57] == 1).all() and (item["latents"][57:] == 0).all()


def test_latent_dataset_is_reproducible_across_epochs_and_workers(tmp_path):
    """(seed, epoch, index) fixes an item, whatever the DataLoader's worker count."""
    latent_root(str(tmp_path), [300] * 6)

    def epoch_items(ds, epoch, workers):
        ds.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=workers)
        return torch.cat([batch["latents"][:, :, 0, 0, 0] for batch in loader])

    ds = data.LatentVideoDataset(str(tmp_path), seed=3)
    first = epoch_items(ds, 0, 0)
    assert torch.equal(first, epoch_items(ds, 0, 2))
    assert torch.equal(first, epoch_items(data.LatentVideoDataset(str(tmp_path), seed=3), 0, 0))
    assert not torch.equal(first, epoch_items(ds, 1, 0))
    assert not torch.equal(first, epoch_items(data.LatentVideoDataset(str(tmp_path)), 0, 0))


def test_latent_dataset_errors_name_the_problem(tmp_path):
    """No Latents/, a latent of the wrong shape and no video long enough are DataErrors."""
    write_csv(tmp_path / "a" / "FileList.csv", data.FILELIST_COLUMNS, [dynamic_row("v0")])
    with pytest.raises(DataError, match="no Latents/"):
        data.LatentVideoDataset(str(tmp_path / "a"))
    latent_root(str(tmp_path / "b"), [150], shape=(4, 16, 16))
    with pytest.raises(DataError, match=r"v0.pt: latent of shape \[150, 4, 16, 16\]"):
        data.LatentVideoDataset(str(tmp_path / "b"))[0]
    latent_root(str(tmp_path / "c"), [100])                             # 100 / 50 = 2.0 s
    with pytest.raises(DataError, match="no TRAIN video longer than 2 s"):
        data.LatentVideoDataset(str(tmp_path / "c"))
    with pytest.warns(UserWarning, match="1 TRAIN videos have no latent"):
        os.remove(tmp_path / "c" / "Latents" / "v0.pt")
        with pytest.raises(DataError):
            data.LatentVideoDataset(str(tmp_path / "c"))


def test_frame_dataset_returns_the_right_frames(phantom):
    """Items are [3, 112, 112] in [-1, 1), frame k of video v as decoded in full."""
    ds = data.FrameDataset(phantom, "VAL")
    rows = [r for r in data.read_filelist(phantom) if r["Split"] == "VAL"]
    assert len(ds) == sum(r["NumberOfFrames"] for r in rows)
    video, _ = data.read_video(os.path.join(phantom, "Videos", rows[1]["FileName"] + ".avi"))
    for k in (0, 37, len(video) - 1):
        x = ds[rows[0]["NumberOfFrames"] + k]
        assert x.shape == (3, 112, 112) and -1 <= x.min() and x.max() < 1
        assert torch.equal(x, torch.from_numpy(video[k]).permute(2, 0, 1).float() / 128 - 1)


# --- the phantom world ---------------------------------------------------------------------------


def test_phantom_is_deterministic_and_echonet_shaped(tmp_path, phantom):
    """Same seed -> identical files for any worker count; EchoNet layout; EF from EDV and ESV."""
    rows = data.make_phantom(str(tmp_path / "a"), num_videos=3, seed=0, workers=1)
    data.make_phantom(str(tmp_path / "b"), num_videos=3, seed=0, workers=2)
    for name in ["FileList.csv"] + [f"Videos/{r['FileName']}.avi" for r in rows]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    rows = data.read_filelist(phantom)
    assert [r["FileName"] + ".avi" for r in rows] == sorted(os.listdir(f"{phantom}/Videos"))
    assert [sum(r["Split"] == s for r in rows) for s in ("TRAIN", "VAL", "TEST")] == [24, 3, 3]
    for r in rows:
        assert 10 <= r["EF"] <= 90 and 45 <= r["FPS"] <= 55 and 112 <= r["NumberOfFrames"] <= 250
        assert r["EF"] == pytest.approx(100 * (r["EDV"] - r["ESV"]) / r["EDV"], abs=1e-3)
    video, fps = data.read_video(os.path.join(phantom, "Videos", rows[0]["FileName"] + ".avi"))
    assert video.shape == (rows[0]["NumberOfFrames"], 112, 112, 3) and fps == rows[0]["FPS"]
    assert video[:, 2, 2].max() == 0 and video[:, 60:100, 30:80].mean() > 20  # black corners
    assert np.abs(np.diff(video[:, 100, 56].astype(int), axis=0)).max() > 0    # fresh noise


def test_phantom_dataset_is_pinned_byte_for_byte(phantom):
    """A seed's phantom set never changes: sha256 of the uint8 frames phantom_video renders for
    three (seed, index) pairs (not of the AVI bytes, which depend on the encoder build) and of the
    FileList cells of the 30-video seed-0 set, pinned from the code before its refactor."""
    digest = hashlib.sha256()
    for seed, index in [(0, 0), (0, 7), (42, 5)]:
        rng = np.random.default_rng([seed, index])             # as make_phantom draws video index
        n, fps = int(rng.integers(112, 251)), int(rng.integers(45, 56))
        frames, _ = data.phantom_video(rng, n, fps)
        assert frames.dtype == np.uint8 and frames.shape == (n, 112, 112)
        digest.update(frames.tobytes())
    assert digest.hexdigest() == "a9a0191f420e65e57b292c726145974cbdba8f5789b9fe28eaef4fdaaf301b02"
    with open(os.path.join(phantom, "FileList.csv"), newline="") as f:
        cells = json.dumps([list(row) for row in csv.reader(f)]).encode()
    assert hashlib.sha256(cells).hexdigest() == (
        "2913b9be2cbe6bc0ed68d0a657c921bc96b1dd5821136d3bfd4e0c98dae59e1b")


def test_measure_ef_recovers_the_phantom_ef(phantom):
    """After the MJPEG write/read round trip: Pearson r >= 0.95 and MAE <= 3 EF points."""
    rows = data.read_filelist(phantom)
    measured = [data.measure_ef(data.read_video(
        os.path.join(phantom, "Videos", r["FileName"] + ".avi"))[0])["ef"] for r in rows]
    score = data.ef_adherence([r["EF"] for r in rows], measured)
    assert score["n"] == 30 and score["pearson_r"] >= 0.95 and score["mae"] <= 3


def demo_clip(phantom, row, start=0, frames=16, fps=12, video=None):
    """`frames` frames at `fps` of a phantom video (read, unless `video` is given) from `start`:
    the clips `make demo` samples."""
    if video is None:
        video, _ = data.read_video(os.path.join(phantom, "Videos", row["FileName"] + ".avi"))
    return video[start + np.round(np.arange(frames) * row["FPS"] / fps).astype(int)]


def test_measure_ef_meets_its_bar_on_the_demo_clips(phantom):
    """16 frames at 12 fps show end-systole in about one frame: r >= 0.99 and MAE <= 1 there
    too, from two starts per video (a 3-frame median of every frame read them 2.8 points low)."""
    rows = data.read_filelist(phantom)
    measured = [data.measure_ef(demo_clip(phantom, r, start))["ef"] for r in rows
                for start in (0, 37)]
    score = data.ef_adherence([r["EF"] for r in rows for _ in (0, 37)], measured)
    assert score["n"] == 60 and score["pearson_r"] >= 0.99 and score["mae"] <= 1


def test_measure_ef_ignores_a_failed_frame(phantom):
    """One frame whose dark blob leaks far beyond the LV does not move the EF."""
    clip = demo_clip(phantom, data.read_filelist(phantom)[2])
    broken = clip.copy()
    broken[5, 20:95, 25:90] = 0                                # the LV merged into a dark square
    volumes = data.measure_ef(broken)["volumes"]
    assert volumes[5] > 2 * np.nanmax(np.delete(volumes, 5))  # the frame's segmentation failed
    assert abs(data.measure_ef(broken)["ef"] - data.measure_ef(clip)["ef"]) < 1


def test_measure_ef_survives_blur_noise_and_other_gray_levels(phantom):
    """A blurrier, noisier, darker video with a tint still measures within 3.5 EF points, whole
    (blur shrinks the cavity, noise widens the swing: both read high; 1.9 with a median of every
    frame, which read demo clips low instead) and as a demo clip."""
    from scipy import ndimage
    row = data.read_filelist(phantom)[1]
    video, _ = data.read_video(os.path.join(phantom, "Videos", row["FileName"] + ".avi"))
    rng = np.random.default_rng(0)
    worse = 15 + 0.8 * ndimage.gaussian_filter(video.astype(np.float32), (0, 1.5, 1.5, 0))
    worse = worse * np.array([1.0, 0.9, 0.8]) + rng.normal(0, 10, video.shape)
    worse = np.clip(worse, 0, 255).astype(np.uint8)
    result = data.measure_ef(worse)
    assert abs(result["ef"] - row["EF"]) <= 3.5 and result["areas"].shape == (len(video),)
    clip = demo_clip(phantom, row, video=worse)
    assert abs(data.measure_ef(clip)["ef"] - row["EF"]) <= 3.5


def test_ef_adherence_on_known_numbers():
    """r, MAE and n on hand-made pairs; NaN pairs are left out."""
    result = data.ef_adherence([20, 40, 60, np.nan], [22, 38, 63, 50])
    assert result["n"] == 3 and result["mae"] == pytest.approx(7 / 3)
    assert result["pearson_r"] == pytest.approx(np.corrcoef([20, 40, 60], [22, 38, 63])[0, 1])


# --- commands ------------------------------------------------------------------------------------


def test_reference_folders_follow_the_original(tmp_path, phantom, capsys):
    """Seed-42 order, TRAIN only, 16 gray 3-channel JPGs per folder, reruns keep finished ones."""
    out = str(tmp_path / "ref")
    assert data.make_reference(phantom, out, frames=16, num_videos=4) == 4
    rows = data.read_filelist(phantom)
    expected = [rows[i]["FileName"] for i in np.random.RandomState(42).permutation(len(rows))
                if rows[i]["Split"] == "TRAIN"][:4]
    assert sorted(os.listdir(out)) == sorted(expected)
    first = os.path.join(out, expected[0])
    assert sorted(os.listdir(first)) == [f"{i:04d}.jpg" for i in range(16)]
    frame = np.asarray(Image.open(os.path.join(first, "0005.jpg")))
    assert frame.shape == (112, 112, 3)
    assert np.abs(frame[..., 0].astype(int) - frame[..., 2]).max() <= 2   # gray in 3 channels
    row = next(r for r in rows if r["FileName"] == expected[0])
    video, _ = data.read_video(os.path.join(phantom, "Videos", expected[0] + ".avi"))
    truth = video[data.resample_indices(row["NumberOfFrames"], row["FPS"])[5]].mean(-1)
    assert np.abs(frame[..., 0].astype(float) - truth).mean() < 1.5     # frame 5 at 32 fps
    mtime = os.path.getmtime(os.path.join(first, "0000.jpg"))
    assert data.make_reference(phantom, out, frames=16, num_videos=100) == 24   # all TRAIN
    assert os.path.getmtime(os.path.join(first, "0000.jpg")) == mtime
    assert "WARNING: only 24" in capsys.readouterr().out


def test_encode_skips_finished_latents_and_reports_a_corrupt_video(tmp_path, capsys):
    """A corrupt video is named and skipped (exit 1), the others are encoded, the Pediatric
    FileList is normalised, and a rerun leaves finished latents untouched."""
    import model
    torch.manual_seed(0)
    model.AutoencoderKL(model.VAE_PRESETS["tiny"]).save_pretrained(str(tmp_path / "vae"))
    root = tmp_path / "ped"
    write_csv(root / "FileList.csv", ["FileName", "EF", "Split"],
              [["a.avi", 40, 3], ["b.avi", 60, 8], ["bad.avi", 50, 9]])
    os.makedirs(root / "Videos")
    rng = np.random.default_rng(0)
    for name, n in (("a", 9), ("b", 5)):
        data.save_video(str(root / "Videos" / f"{name}.avi"), data.phantom_video(rng, n, 50)[0],
                        50)
    (root / "Videos" / "bad.avi").write_bytes(b"corrupt" * 50)
    command = ["encode", "--root", str(root), "--vae", str(tmp_path / "vae"), "--gray-scale",
               "--batch-size", "4", "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_info:
        data.main(command)
    assert exit_info.value.code == 1 and "bad.avi" in capsys.readouterr().out
    assert sorted(n for n in os.listdir(root / "Latents") if n.endswith(".pt")) == ["a.pt", "b.pt"]
    latent = torch.load(root / "Latents" / "a.pt", weights_only=True)
    assert latent.shape == (9, 4, 14, 14) and latent.dtype == torch.float32
    rows = data.read_filelist(str(root), probe=False)
    assert [(r["Split"], r["Fold"], r["NumberOfFrames"]) for r in rows] == [
        ("TRAIN", 3, 9), ("VAL", 8, 5), ("TEST", 9, None)]
    assert os.path.exists(root / "FileList_ORIGINAL.csv")
    mtime = os.path.getmtime(root / "Latents" / "a.pt")
    os.remove(root / "Videos" / "bad.avi")
    os.remove(root / "Latents" / "b.pt")
    with pytest.raises(SystemExit):                                    # bad.avi is now missing
        data.main(command)
    assert os.path.getmtime(root / "Latents" / "a.pt") == mtime
    assert torch.load(root / "Latents" / "b.pt", weights_only=True).shape == (5, 4, 14, 14)


def test_encode_mean_writes_the_posterior_means(tmp_path):
    """encode --mean: the VAE's posterior means times the scaling factor, whatever the seed."""
    import model
    torch.manual_seed(0)
    vae = model.AutoencoderKL(model.VAE_PRESETS["tiny"])
    vae.save_pretrained(str(tmp_path / "vae"))
    root = tmp_path / "ph"
    write_csv(root / "FileList.csv", ["FileName", "EF", "Split"], [["phantom_00000.avi", 40, 3]])
    os.makedirs(root / "Videos")
    frames = data.phantom_video(np.random.default_rng(0), 6, 50)[0]
    data.save_video(str(root / "Videos" / "phantom_00000.avi"), frames, 50)
    out = []
    for seed in ("0", "5"):
        data.main(["encode", "--root", str(root), "--vae", str(tmp_path / "vae"), "--gray-scale",
                   "--device", "cpu", "--mean", "--seed", seed, "--out", str(tmp_path / seed)])
        out.append(torch.load(tmp_path / seed / "Latents" / "phantom_00000.pt", weights_only=True))
    video, _ = data.read_video(str(root / "Videos" / "phantom_00000.avi"))
    with torch.no_grad():
        mean = vae.encode(data.from_pixels(torch.from_numpy(video), True)).mode()
    assert torch.equal(out[0], out[1])
    torch.testing.assert_close(out[0], mean * vae.config.scaling_factor, atol=1e-5, rtol=0)
