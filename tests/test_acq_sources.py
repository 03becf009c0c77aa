"""Camera sources: spec parsing, sim, file replay (.rtdc, TIFF, .npy, video), errors,
frame validation and stall/dropout detection."""

from __future__ import annotations

import numpy as np
import pytest

from leukoflow.acquisition.sources import (
    SOURCES,
    EndOfStream,
    FrameValidator,
    SourceError,
    StallMonitor,
    create_source,
    parse_source_spec,
)


def test_registry_and_spec_parsing():
    assert {"sim", "file", "opencv", "genicam"} <= set(SOURCES.names())
    assert parse_source_spec("sim") == ("sim", {})
    assert parse_source_spec("sim:7") == ("sim", {"seed": 7})
    assert parse_source_spec("sim:7:0.3") == ("sim", {"seed": 7, "concentration": 0.3})
    with pytest.raises(SourceError, match="CONCENTRATION"):
        parse_source_spec("sim:7:dense")
    assert parse_source_spec("file:/x/y.rtdc") == ("file", {"path": "/x/y.rtdc"})
    assert parse_source_spec("camera:opencv:2") == ("opencv", {"device": "2"})
    assert parse_source_spec("camera:genicam") == ("genicam", {})
    for bad in ("", "webcam", "camera:foo:1", "file:"):
        with pytest.raises(SourceError):
            parse_source_spec(bad)


def test_genicam_without_harvesters_names_the_extra():
    try:
        import harvesters  # noqa: F401
    except ImportError:
        with pytest.raises(SourceError, match="camera"):
            create_source("camera:genicam")
    else:  # pragma: no cover - only where the extra is installed
        pytest.skip("harvesters installed: the missing-extra error cannot occur")


def test_sim_source_frames_truth_and_background():
    src = create_source("sim", seed=3, n_frames=3)
    with src:
        assert src.has_truth
        assert src.background.shape == (320, 1024) and src.background.dtype == np.uint8
        frames = [src.read(), src.read(), src.read()]
        with pytest.raises(EndOfStream):
            src.read()
    assert [f.index for f in frames] == [0, 1, 2]
    assert all(f.image.shape == (320, 1024) for f in frames)
    assert isinstance(frames[0].truth, list)
    assert src.true_phase(frames[0].origin).shape == (80, 256)


@pytest.fixture(scope="module")
def stack():
    rng = np.random.default_rng(0)
    return rng.integers(0, 200, (5, 40, 64), dtype=np.uint8), np.full((40, 64), 90, np.uint8)


def _read_all(src):
    out = []
    with src:
        while True:
            try:
                fr = src.read()
            except EndOfStream:
                break
            out.append(fr)
    return out


def test_file_rtdc_with_stored_background(tmp_path, stack):
    import h5py

    frames, bg = stack
    path = tmp_path / "holo.rtdc"
    with h5py.File(path, "w") as f:
        f.attrs["imaging:frame rate"] = 250.0
        f.create_dataset("events/qpi_oah", data=frames)
        f.create_dataset("events/qpi_oah_bg", data=np.stack([bg] * 5))
    src = create_source(f"file:{path}")
    got = _read_all(src)
    assert len(got) == 5
    assert np.array_equal(np.stack([g.image for g in got]), frames)
    assert got[2].t_s == pytest.approx(2 / 250.0)
    assert np.array_equal(src.background, bg)
    assert src.info["background"].startswith("stored")


def test_file_rtdc_without_feature_is_a_clear_error(tmp_path):
    import h5py

    path = tmp_path / "empty.rtdc"
    with h5py.File(path, "w") as f:
        f.create_dataset("events/image", data=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(SourceError, match="qpi_oah"):
        create_source(f"file:{path}").open()


def test_file_tiff_and_npy_with_median_background(tmp_path, stack):
    import tifffile

    frames, _ = stack
    tif = tmp_path / "stack.tif"
    tifffile.imwrite(tif, frames)
    npy = tmp_path / "stack.npy"
    np.save(npy, frames)
    for p in (tif, npy):
        src = create_source(f"file:{p}")
        got = _read_all(src)
        assert np.array_equal(np.stack([g.image for g in got]), frames)
        assert np.array_equal(src.background, np.median(frames, axis=0).astype(np.uint8))


def test_file_loop_and_missing_file(tmp_path, stack):
    frames, _ = stack
    npy = tmp_path / "s.npy"
    np.save(npy, frames)
    src = create_source(f"file:{npy}")
    src.loop = True
    with src:
        idx = [src.read().index for _ in range(12)]
    assert idx == list(range(12))
    with pytest.raises(SourceError, match="no such file"):
        create_source(f"file:{tmp_path / 'nope.rtdc'}")
    bad = tmp_path / "x.xyz"
    bad.write_text("x")
    with pytest.raises(SourceError, match="unsupported"):
        create_source(f"file:{bad}").open()


def test_file_video(tmp_path):
    cv2 = pytest.importorskip("cv2")
    path = tmp_path / "v.avi"
    wr = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (64, 48))
    assert wr.isOpened()
    for i in range(6):
        img = np.full((48, 64, 3), 40 * i, np.uint8)
        wr.write(img)
    wr.release()
    got = _read_all(create_source(f"file:{path}"))
    assert len(got) == 6
    assert got[0].image.shape == (48, 64) and got[0].image.ndim == 2
    assert [int(np.median(g.image)) for g in got] == pytest.approx([0, 40, 80, 120, 160, 200],
                                                                    abs=3)


def test_frame_validator_reasons():
    v = FrameValidator(shape=(8, 8))
    good = np.random.default_rng(0).integers(10, 200, (8, 8), dtype=np.uint8)
    sat = good.copy()
    sat[:4] = 255
    nanf = good.astype(np.float32)
    nanf[0, 0] = np.nan
    cases = {"wrong_size": np.zeros((4, 8), np.uint8), "all_zero": np.zeros((8, 8), np.uint8),
             "saturated": sat, "non_finite": nanf, "constant": np.full((8, 8), 7, np.uint8),
             "wrong_dtype": good.astype(bool)}
    for reason, img in cases.items():
        assert v.check(img) == reason, reason
    assert v.check(good) is None
    assert v.check("not an array") == "wrong_size"
    assert v.counts["accepted"] == 1 and v.counts["saturated"] == 1


def test_stall_monitor():
    m = StallMonitor(frame_interval_s=0.002, stall_intervals=50, min_stall_s=0.05)
    m.frame(0, now=0.0)
    assert m.frame(1, now=0.002) == 0
    assert m.frame(5, now=0.004) == 3  # frames 2..4 missing
    assert m.dropouts == 1 and m.frames_missing == 3
    assert not m.idle(now=0.03)
    assert m.idle(now=0.2)  # stall begins
    assert not m.idle(now=0.3)  # same stall, counted once
    assert m.stalls == 1
    m.frame(6, now=0.31)
    assert m.idle(now=0.5) and m.stalls == 2
