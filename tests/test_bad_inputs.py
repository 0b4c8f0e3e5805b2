"""Broken and unusual inputs: each gets a correct record or an error row that names it and
says why, and the run finishes.

The matrix runs the real fully_auto stage (Ray actors, the random-weights vit_tiny) on
one folder holding every kind below; rows are looked up by ``source``. Time limits are
checked on the worker class directly, with a file system whose reads never return.
"""
from __future__ import annotations

import gzip
import io
import os
import socket
import threading
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.dataset import manifest
from pipeline.dataset.shards import iter_shard
from pipeline.inputs.entries import Item, Unit, enumerate_input
from pipeline.stages import run_stage
from tests.conftest import (
    SERIAL,
    animated,
    bad_corpus,
    encode,
    face_photo,
    good_corpus,
    multipage_tiff,
    plate_photo,
    png_header_only,
    private_jpeg,
    scene,
    sixteen_bit_png,
)

FAST = ["model=vit_tiny", "amg.points_per_side=4", "amg.pred_iou_thresh=0", "amg.stability_score_thresh=0"]
# Limits the matrix sets low, so that a small file can cross them.
MAX_FILE_BYTES = 150_000
MAX_DECODED_BYTES = 1_000_000
OK = None  # expected: a record


def _image(seed: int, size=(64, 48), mode: str = "RGB") -> Image.Image:
    return Image.fromarray(scene(*size, seed)).convert(mode)


def _rotated(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(_image(20 + orientation), "JPEG", exif=exif)


def _tar(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with wds.TarWriter(buffer) as writer:
        for key, jpg in members.items():
            writer.write({"__key__": key, "jpg": jpg, "json": {"old": "record"}})
    return buffer.getvalue()


def _huge_jpeg_header() -> bytes:
    """A JPEG whose frame header claims 60000 x 60000 pixels (patched after encoding)."""
    data = bytearray(encode(_image(30), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (60000).to_bytes(2, "big") * 2
    return bytes(data)


def files() -> dict[str, tuple[bytes, str | None]]:
    """Regular files of the matrix: name -> (bytes, None for a record or a substring of the
    error's reason)."""
    plain = encode(_image(1), "JPEG")
    cut_tar = _tar({"sa_1": plain, "sa_2": encode(_image(2), "JPEG")})
    cut_at = cut_tar.index(b"sa_2.jpg") + 512 + 50
    transparent = _image(3).convert("RGBA")
    transparent.putalpha(100)
    corpus = {
        # photographs as cameras and phones write them
        "plain.jpg": (plain, OK),
        "progressive.jpg": (encode(_image(4), "JPEG", progressive=True), OK),
        "grey.jpg": (encode(_image(5, mode="L"), "JPEG"), OK),
        "cmyk.jpg": (encode(_image(6, mode="CMYK"), "JPEG"), OK),
        "rotated_3.jpg": (_rotated(3), OK),
        "rotated_6.jpg": (_rotated(6), OK),
        "rotated_8.jpg": (_rotated(8), OK),
        "private_gps_serial.jpg": (private_jpeg(), OK),
        "face.jpg": (face_photo(), OK),
        "UPPER_CASE.JPG": (encode(_image(7), "JPEG"), OK),
        "large.jpg": (encode(_image(8, size=(300, 200)), "JPEG"), OK),
        # other formats and modes
        "grey16.png": (sixteen_bit_png(64, 48, bands=1), OK),
        "rgb16.png": (sixteen_bit_png(64, 48, bands=3, seed=1), OK),
        "rgba16.png": (sixteen_bit_png(64, 48, bands=4, seed=2), OK),
        "palette.png": (encode(_image(9).convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), OK),
        "palette_transparent.png": (encode(_image(10).convert("P"), "PNG", transparency=0), OK),
        "alpha.png": (encode(transparent, "PNG"), OK),
        "grey_alpha.png": (encode(transparent.convert("LA"), "PNG"), OK),
        "bilevel.png": (encode(_image(11, mode="1"), "PNG"), OK),
        "plate.png": (plate_photo(), OK),
        "animated.png": (animated("PNG"), OK),
        "animated.webp": (animated("WEBP"), OK),
        "lossless.webp": (encode(_image(12), "WEBP", lossless=True), OK),
        "photo.bmp": (encode(_image(13), "BMP"), OK),
        "multipage.tif": (multipage_tiff(), OK),
        "cmyk.tif": (encode(_image(14, mode="CMYK"), "TIFF"), OK),
        "float.tif": (encode(Image.fromarray(np.linspace(-1, 7, 64 * 48, dtype=np.float32).reshape(48, 64), "F"),
                             "TIFF"), OK),
        "int32.tif": (encode(Image.fromarray((np.arange(64 * 48, dtype=np.int32) * 20).reshape(48, 64), "I"),
                             "TIFF"), OK),
        "tall_thin.png": (encode(_image(15, size=(16, 400)), "PNG"), OK),
        # the wrong extension
        "png_inside.jpg": (encode(_image(16), "PNG"), OK),
        "jpeg_inside.png": (encode(_image(17), "JPEG"), OK),
        # odd names
        "dots.in.the.name.jpg": (encode(_image(18), "JPEG"), OK),
        "space and ünïcödé ñandú.jpg": (encode(_image(19), "JPEG"), OK),
        "brackets [1] and #hash.jpg": (encode(_image(20), "JPEG"), OK),
        ("x" * 200) + ".jpg": (encode(_image(21), "JPEG"), OK),
        "-leading-dash.jpg": (encode(_image(22), "JPEG"), OK),
        # the same bytes twice: two images
        "duplicate_a.jpg": (plain, OK),
        "duplicate_b.jpg": (plain, OK),
        # broken images
        "html_saved_as.jpg": (b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n" * 3, "not a readable image"),
        "huge_header.jpg": (_huge_jpeg_header(), "max_pixels"),
        "bomb16.png": (png_header_only(2000, 2000, bit_depth=16, colour_type=6), "max_decoded_bytes"),
        "too_big.bmp": (encode(_image(23, size=(300, 200)), "BMP"), "max_file_bytes"),
        "rgba16_over_budget.png": (sixteen_bit_png(400, 400, bands=4, noise=False), "max_decoded_bytes"),
        "truncated.webp": (encode(_image(24), "WEBP")[:60], "truncated"),
        "empty.png": (b"", "empty file"),
        # tars: good members are annotated, the damage is an error row naming the tar
        "shard.tar": (_tar({"sa_1": plain, "sa_2": encode(_image(25), "PNG")}), OK),
        "cut.tar": (cut_tar[:cut_at], OK),  # sa_1 fine; sa_2 below
        "empty.tar": (b"", "empty file"),
        "gzipped.tar": (gzip.compress(_tar({"sa_1": plain})), "gzip"),
        "html.tar": (b"<html>" * 300, "not a readable tar"),
    }
    for name, (data, reason) in bad_corpus().items():
        corpus[f"old_{name}"] = (data, reason)
    return corpus


def build_matrix(root: Path, outside: Path) -> dict[str, str | None]:
    """Writes the matrix under ``root``; returns expected outcome by source (relative)."""
    root.mkdir(parents=True)
    outside.mkdir(parents=True)
    expected: dict[str, str | None] = {}
    for name, (data, reason) in files().items():
        (root / name).write_bytes(data)
        if name.endswith(".tar") and reason is OK:
            continue  # its members are the inputs
        expected[name] = reason
    expected.update({"shard.tar#sa_1.jpg": OK, "shard.tar#sa_2.jpg": OK})
    expected.update({"cut.tar#sa_1.jpg": OK, "cut.tar#sa_2.jpg": "truncated"})
    # a name that is not UTF-8: annotated, shown escaped
    with open(os.path.join(os.fsencode(root), b"caf\xe9 latin-1.jpg"), "wb") as f:
        f.write(encode(_image(26), "JPEG"))
    expected["caf\\xe9 latin-1.jpg"] = OK
    # special files and links
    os.mkfifo(root / "fifo.jpg")
    expected["fifo.jpg"] = "FIFO"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(root / "socket.png"))
    server.close()
    expected["socket.png"] = "socket"
    (root / "dev_zero.jpg").symlink_to("/dev/zero")
    expected["dev_zero.jpg"] = "character device"
    (outside / "secret.jpg").write_bytes(encode(_image(27), "JPEG"))
    (root / "link_outside.jpg").symlink_to(outside / "secret.jpg")
    expected["link_outside.jpg"] = "stage.follow_symlinks=true"
    (root / "link_inside.jpg").symlink_to(root / "plain.jpg")
    expected["link_inside.jpg"] = OK
    (root / "broken_link.jpg").symlink_to(root / "nowhere.jpg")
    expected["broken_link.jpg"] = "not found"
    (root / "linked_folder").symlink_to(outside)  # skipped, and the log says so
    (root / "not_an_image.txt").write_text("skipped: not an image")
    return expected


@pytest.mark.timeout(600)
def test_every_kind_of_bad_or_unusual_input_gets_a_record_or_an_error_row(compose_config, tmp_path, tiny_checkpoint,
                                                                          ray_local):
    root, out = tmp_path / "matrix", tmp_path / "out"
    expected = build_matrix(root, tmp_path / "outside")
    assert len(expected) >= 40
    cfg = compose_config(
        "+stage=fully_auto", f"input={root}", f"output={out}", f"model.checkpoint={tiny_checkpoint}", *FAST,
        "stage.images_per_unit=25", "stage.image.short_side=128",
        f"stage.image.max_file_bytes={MAX_FILE_BYTES}", f"stage.image.max_decoded_bytes={MAX_DECODED_BYTES}",
        "stage.privacy.blur=true",
    )
    summary = run_stage(cfg)  # returns: the run finished

    prefix = f"{root}/"
    rows = manifest.read_table(str(out)).to_pylist()
    assert all(r["source"].startswith(prefix) for r in rows)
    by_source = {r["source"][len(prefix):]: r for r in rows}
    assert len(by_source) == len(rows), "one manifest row per input"
    assert set(by_source) == set(expected), set(by_source) ^ set(expected)
    errors = {r["source"][len(prefix):]: r for r in manifest.read_table(str(out), manifest.ERRORS_DIR).to_pylist()}
    samples = {s.key: s for shard in sorted((out / "shards").iterdir()) for s in iter_shard(str(shard))}
    for source, reason in sorted(expected.items()):
        row = by_source[source]
        if reason is OK:
            assert row["status"] == manifest.STATUS_OK and source not in errors, (source, errors.get(source))
            sample = samples[row["key"]]
            stored = Image.open(io.BytesIO(sample.jpg))
            assert stored.format == "JPEG" and stored.size == (row["width"], row["height"]), source
            assert (sample.record["image"]["width"], sample.record["image"]["height"]) == stored.size
            assert not stored.getexif() and SERIAL.encode() not in sample.jpg, f"{source}: metadata stored"
        else:
            assert row["status"] == manifest.STATUS_ERROR, source
            assert reason in errors[source]["reason"], (source, errors[source])
    assert summary["units_failed"] == 0
    assert summary["images_ok"] == sum(r is OK for r in expected.values())
    assert summary["images_failed"] == len(errors) == sum(r is not OK for r in expected.values())

    # Conversions that must be right, not just present.
    rotated = by_source["rotated_6.jpg"]
    assert (rotated["width"], rotated["height"]) == (48, 64)
    assert (by_source["large.jpg"]["width"], by_source["large.jpg"]["height"]) == (192, 128)
    assert errors["fifo.jpg"]["phase"] == "enumerate" and errors["link_outside.jpg"]["phase"] == "enumerate"
    # The privacy step blurred the face (x 37-95, y 25-83 at this size) before storing it.
    from pipeline.inputs.images import prepare_image

    def detail(rgb: np.ndarray) -> float:
        return float(np.abs(np.diff(rgb[35:75, 45:85].astype(np.int16), axis=1)).mean())

    stored = np.asarray(Image.open(io.BytesIO(samples[by_source["face.jpg"]["key"]].jpg)))
    assert detail(stored) < detail(prepare_image(face_photo(), short_side=128).rgb) / 3, "the face was not blurred"
    # ... and said so, per image, in the record and the manifest.
    face = samples[by_source["face.jpg"]["key"]].record["image"]
    assert face["blurred_regions"] >= 1 and by_source["face.jpg"]["blurred_regions"] == face["blurred_regions"]
    assert samples[by_source["large.jpg"]["key"]].record["image"]["blurred_regions"] == 0


# --- time limits -------------------------------------------------------------------------
class HangingFileSystem(fsspec.AbstractFileSystem):
    """Stands for a hung network mount: opening a file blocks until ``release`` is set."""

    protocol = "hang"
    release = threading.Event()

    def _open(self, path, mode="rb", **kwargs):
        self.release.wait()
        raise FileNotFoundError(path)


@pytest.fixture
def annotator(tiny_checkpoint, tmp_path):
    from pipeline.execution.worker import UnitWorker

    def make(**image_cfg):
        model = {"arch": "vit_tiny", "checkpoint": str(tiny_checkpoint), "device": "cpu"}
        amg = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
        return UnitWorker(
            source={"kind": "grid", "model": model, "amg": amg},
            image_cfg=image_cfg,
            output=str(tmp_path / "out"),
            model_sha256="test",
            threads=1,
        )

    return make


def test_a_stuck_read_gets_an_error_row_and_the_unit_finishes(annotator, tmp_path):
    fsspec.register_implementation("hang", HangingFileSystem, clobber=True)
    (tmp_path / "ok.jpg").write_bytes(good_corpus()["plain.jpg"])
    stuck = Item(name="stuck.jpg", url="hang://mount/stuck.jpg", key="sa_1", image_id=1)
    good = Item(name="ok.jpg", url=str(tmp_path / "ok.jpg"), key="sa_2", image_id=2)
    worker = annotator(read_timeout_s=0.5, decode_timeout_s=30, short_side=None)
    try:
        start = time.monotonic()
        *_, summary = worker.process_unit(Unit(index=0, items=(stuck, good)))
        assert time.monotonic() - start < 20
    finally:
        HangingFileSystem.release.set()  # lets the abandoned thread end
    assert summary["images"] == 2 and summary["errors"] == 1
    (error,) = manifest.read_table(str(tmp_path / "out"), manifest.ERRORS_DIR).to_pylist()
    assert error["source"] == "hang://mount/stuck.jpg" and error["phase"] == "read"
    assert "stage.image.read_timeout_s=0.5" in error["reason"]
    rows = {r["source"]: r for r in manifest.read_table(str(tmp_path / "out")).to_pylist()}
    assert rows[good.source]["status"] == manifest.STATUS_OK


def test_a_decode_over_its_time_limit_gets_an_error_row(annotator, tmp_path):
    noise = np.random.default_rng(0).integers(0, 255, (2000, 3000, 3), dtype=np.uint8)
    (tmp_path / "slow.png").write_bytes(encode(Image.fromarray(noise), "PNG", compress_level=1))
    item = Item(name="slow.png", url=str(tmp_path / "slow.png"), key="sa_1", image_id=1)
    worker = annotator(decode_timeout_s=0.01, short_side=1500)
    prepared, failure = worker._load(item, {})
    assert prepared is None and failure[0] == "decode" and "stage.image.decode_timeout_s=0.01" in failure[1]
    prepared, failure = annotator(decode_timeout_s=60, short_side=1500)._load(item, {})
    assert failure is None and prepared.height == 1500


def test_items_with_a_problem_are_never_opened(annotator, tmp_path):
    os.mkfifo(tmp_path / "fifo.jpg")
    (entry,) = enumerate_input(str(tmp_path))
    item = Item(name=entry.name, url=entry.url, problem=entry.problem, key="sa_1", image_id=1)
    prepared, failure = annotator()._load(item, {})
    assert prepared is None and failure == ("enumerate", item.problem) and "FIFO" in failure[1]


# --- model weights -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nan_checkpoint(tmp_path_factory) -> Path:
    from sam_core import sam_model_registry

    state = sam_model_registry["vit_tiny"]().state_dict()
    state["mask_decoder.iou_prediction_head.layers.0.weight"][0, 0] = float("nan")
    state["image_encoder.pos_embed"][0, 0, 0, 0] = float("inf")
    path = tmp_path_factory.mktemp("nan") / "diverged.pth"
    torch.save(state, path)
    return path


def test_non_finite_weights_are_refused_at_load(nan_checkpoint):
    from sam_core import CheckpointError, sam_model_registry

    with pytest.raises(CheckpointError, match="NaN or infinite") as error:
        sam_model_registry["vit_tiny"](checkpoint=nan_checkpoint)
    assert "image_encoder.pos_embed" in str(error.value) and "iou_prediction_head" in str(error.value)


def test_a_run_with_non_finite_weights_fails_instead_of_writing_an_empty_dataset(compose_config, tmp_path,
                                                                                 nan_checkpoint, ray_local):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.jpg").write_bytes(good_corpus()["plain.jpg"])
    cfg = compose_config("+stage=fully_auto", f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}",
                         f"model.checkpoint={nan_checkpoint}", *FAST)
    with pytest.raises(Exception, match="NaN or infinite"):
        run_stage(cfg)
    assert not manifest.committed_units(str(tmp_path / "out"))
