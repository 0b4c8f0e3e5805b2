"""pipeline.inputs.images: every conversion of the corpus, and every refusal with its reason."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.inputs.images import ImageError, prepare_image
from tests.conftest import bad_corpus, encode, good_corpus, png_header_only, scene


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize("name", sorted(good_corpus()))
def test_every_good_image_becomes_rgb_and_a_jpeg_of_the_same_size(name):
    prepared = prepare_image(good_corpus()[name])
    assert prepared.rgb.dtype == np.uint8 and prepared.rgb.ndim == 3 and prepared.rgb.shape[2] == 3
    stored = decoded(prepared.jpeg)
    assert stored.format == "JPEG"
    assert stored.size == (prepared.width, prepared.height)


@pytest.mark.parametrize("name", sorted(bad_corpus()))
def test_every_bad_file_is_refused_with_an_actionable_reason(name):
    data, reason = bad_corpus()[name]
    with pytest.raises(ImageError, match=reason):
        prepare_image(data)


def test_plain_jpeg_keeps_its_original_bytes():
    data = good_corpus()["plain.jpg"]
    prepared = prepare_image(data)
    assert prepared.jpeg == data
    assert np.array_equal(prepared.rgb, np.asarray(decoded(data)))


def test_exif_rotation_is_applied_and_the_stored_image_is_upright():
    prepared = prepare_image(good_corpus()["rotated.jpg"])
    assert (prepared.width, prepared.height) == (48, 64)  # stored 64x48, orientation 6
    stored = decoded(prepared.jpeg)
    assert stored.getexif().get(0x0112, 1) == 1, "the stored image must not be rotated twice"
    reference = np.asarray(Image.fromarray(scene(64, 48, 1)).transpose(Image.Transpose.ROTATE_270), np.int16)
    assert np.abs(prepared.rgb.astype(np.int16) - reference).mean() < 8  # JPEG noise only


def test_sixteen_bit_is_rescaled_not_clipped():
    prepared = prepare_image(good_corpus()["grey16.png"])
    grey = prepared.rgb[..., 0].astype(int)
    expected = (np.arange(48 * 64).reshape(48, 64) * 21) / 257
    assert np.abs(grey - expected).max() <= 1
    assert grey.min() < 10 and grey.max() > 200


def test_transparency_is_composited_on_white():
    image = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # fully transparent red
    prepared = prepare_image(encode(image, "PNG"))
    assert (prepared.rgb == 255).all()


def test_cmyk_and_palette_are_converted():
    for name in ("cmyk.jpg", "palette.png"):
        prepared = prepare_image(good_corpus()[name])
        reference = scene(64, 48, 1).astype(np.int16)
        assert np.abs(prepared.rgb.astype(np.int16) - reference).mean() < 12, name


def test_large_images_are_resized_like_sa1b_short_side():
    data = encode(Image.fromarray(scene(300, 200, 7)), "JPEG")
    prepared = prepare_image(data, short_side=100)
    assert (prepared.width, prepared.height) == (150, 100)
    assert decoded(prepared.jpeg).size == (150, 100)
    assert prepared.original_size == (300, 200)
    # At or under the limit nothing changes, bytes included.
    assert prepare_image(data, short_side=200).jpeg == data


def test_rotated_large_image_is_rotated_then_resized():
    exif = Image.Exif()
    exif[0x0112] = 8
    data = encode(Image.fromarray(scene(300, 200, 8)), "JPEG", exif=exif)
    prepared = prepare_image(data, short_side=100)
    assert (prepared.width, prepared.height) == (100, 150)


def test_pixel_limit_is_configurable_and_checked_before_decoding():
    data = png_header_only(5000, 5000)  # 25 Mpx declared, a few bytes of data
    with pytest.raises(ImageError, match="max_pixels=1000000"):
        prepare_image(data, max_pixels=1_000_000)



def test_a_pixel_limit_above_pils_own_is_honoured(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL alone would refuse 64x48
    prepared = prepare_image(good_corpus()["plain.jpg"], max_pixels=10_000)
    assert (prepared.width, prepared.height) == (64, 48)


# --- metadata -------------------------------------------------------------------------
def _no_private_data(jpeg: bytes) -> None:
    from tests.conftest import SERIAL

    assert SERIAL.encode() not in jpeg
    stored = decoded(jpeg)
    assert not stored.getexif(), "no EXIF may be stored"
    assert not {"exif", "icc_profile", "comment", "xmp"} & set(stored.info), stored.info.keys()
    assert jpeg.endswith(b"\xff\xd9"), "nothing after the end marker"


def test_a_jpeg_needing_no_conversion_loses_its_metadata_but_not_a_bit_of_its_pixels():
    from tests.conftest import private_jpeg

    data = private_jpeg()
    original = decoded(data)
    assert original.getexif().get_ifd(0x8825), "the input does carry a GPS position"
    prepared = prepare_image(data)
    _no_private_data(prepared.jpeg)
    assert np.array_equal(np.asarray(decoded(prepared.jpeg)), np.asarray(original))  # lossless
    start = data.index(b"\xff\xda")  # the compressed scan is copied byte for byte
    assert data[start : data.index(b"\xff\xd9", start) + 2] in prepared.jpeg
    assert np.array_equal(prepared.rgb, np.asarray(original))


def test_a_rotated_jpeg_is_stored_upright_with_no_orientation_tag_or_metadata():
    from tests.conftest import private_jpeg

    prepared = prepare_image(private_jpeg(orientation=6))
    _no_private_data(prepared.jpeg)
    assert (prepared.width, prepared.height) == (48, 64)
    reference = np.asarray(Image.fromarray(scene(64, 48, 9)).transpose(Image.Transpose.ROTATE_270), np.int16)
    assert np.abs(np.asarray(decoded(prepared.jpeg), np.int16) - reference).mean() < 8


def test_metadata_is_kept_only_when_asked():
    from tests.conftest import private_jpeg

    assert prepare_image(private_jpeg(), strip_metadata=False).jpeg == private_jpeg()


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
def test_metadata_of_other_formats_is_not_carried_into_the_stored_jpeg(fmt):
    from tests.conftest import SERIAL

    exif = Image.Exif()
    exif[0x013B] = SERIAL  # Artist
    data = encode(Image.fromarray(scene(64, 48, 3)), fmt, exif=exif)
    assert SERIAL.encode() in data
    _no_private_data(prepare_image(data).jpeg)


@pytest.mark.parametrize(
    "params",
    [{"progressive": True}, {"restart_marker_blocks": 1}, {"subsampling": 0}, {"optimize": True}],
    ids=["progressive", "restart-markers", "4:4:4", "optimised"],
)
def test_metadata_strip_is_lossless_for_every_kind_of_jpeg_stream(params):
    from pipeline.inputs.images import strip_jpeg_metadata
    from tests.conftest import SERIAL

    image = Image.fromarray(scene(96, 64, 5))
    data = encode(image, "JPEG", comment=SERIAL.encode(), **params)
    stripped = strip_jpeg_metadata(data)
    assert stripped is not None and SERIAL.encode() not in stripped
    assert np.array_equal(np.asarray(decoded(stripped)), np.asarray(decoded(data)))
    grey = encode(image.convert("L"), "JPEG", **params)
    assert np.array_equal(np.asarray(decoded(strip_jpeg_metadata(grey))), np.asarray(decoded(grey)))


def test_a_jpeg_stream_the_stripper_cannot_follow_is_re_encoded():
    from pipeline.inputs.images import strip_jpeg_metadata

    data = good_corpus()["plain.jpg"]
    assert strip_jpeg_metadata(data[:-2]) is None  # no end marker
    assert strip_jpeg_metadata(b"GIF89a") is None


# --- memory ---------------------------------------------------------------------------
def test_decoded_bytes_count_bands_and_bytes_per_sample_before_decoding():
    from tests.conftest import sixteen_bit_png

    rgba16 = sixteen_bit_png(100, 50, bands=4)
    rgb8 = encode(Image.fromarray(scene(100, 50, 1)), "PNG")
    assert prepare_image(rgb8, max_decoded_bytes=100 * 50 * 3).width == 100
    with pytest.raises(ImageError, match=r"16 bits a sample decodes to 40000 bytes, "
                                         r"over stage.image.max_decoded_bytes=39999"):
        prepare_image(rgba16, max_decoded_bytes=100 * 50 * 8 - 1)
    assert prepare_image(rgba16, max_decoded_bytes=100 * 50 * 8).width == 100
    grey16 = sixteen_bit_png(100, 50, bands=1)
    with pytest.raises(ImageError, match="max_decoded_bytes"):
        prepare_image(grey16, max_decoded_bytes=100 * 50 * 2 - 1)
    # Refused from the header alone: a 20000 x 20000 16-bit RGBA PNG of a few bytes.
    bomb = png_header_only(20000, 20000, bit_depth=16, colour_type=6)
    with pytest.raises(ImageError, match="max_decoded_bytes"):
        prepare_image(bomb, max_pixels=10**9, max_decoded_bytes=10**9)


@pytest.mark.parametrize("kind", ["grey16", "rgba16", "palette-alpha", "float"])
def test_conversions_hold_no_full_size_numpy_temporaries(kind):
    """numpy reports its allocations to tracemalloc: converting 16-bit or float pixels
    used to hold three full-size float64 copies (24 bytes a pixel on top of the image)."""
    import tracemalloc

    from tests.conftest import sixteen_bit_png

    w, h = 800, 600
    if kind == "grey16":
        data = sixteen_bit_png(w, h, bands=1)
    elif kind == "rgba16":
        data = sixteen_bit_png(w, h, bands=4)
    elif kind == "palette-alpha":
        rgba = Image.fromarray(scene(w, h, 2)).convert("RGBA")
        rgba.putalpha(128)
        data = encode(rgba.convert("P", palette=Image.Palette.ADAPTIVE), "PNG", transparency=0)
    else:
        data = encode(Image.fromarray(np.random.default_rng(0).random((h, w), np.float32) * 1000, "F"), "TIFF")
    tracemalloc.start()
    try:
        prepared = prepare_image(data, short_side=None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert prepared.rgb.shape == (h, w, 3)
    extra = peak - prepared.rgb.nbytes - len(prepared.jpeg)
    assert extra <= 1.5 * w * h * 4, f"{extra / (w * h):.1f} bytes a pixel in numpy temporaries"


# --- privacy --------------------------------------------------------------------------
def test_privacy_step_blurs_the_face_and_counts_it():
    from tests.conftest import face_photo

    data = face_photo()
    plain = prepare_image(data)
    assert plain.blurred_regions is None and plain.record_fields() == {}
    prepared = prepare_image(data, privacy={"blur": True})
    assert prepared.blurred_regions == 1
    assert prepared.record_fields() == {"blurred_regions": 1}
    # The face (around its centre, x 180-350, y 130-300 in the 512x600 photo) lost its
    # detail; the rest of the picture is untouched.
    face = (slice(150, 280), slice(200, 330))
    detail = lambda rgb: np.abs(np.diff(rgb[face].astype(np.int16), axis=1)).mean()  # noqa: E731
    assert detail(prepared.rgb) < detail(plain.rgb) / 4
    assert np.array_equal(prepared.rgb[480:], plain.rgb[480:])
    # What is stored is what was annotated: the blurred pixels.
    assert np.abs(np.asarray(decoded(prepared.jpeg), np.int16) - prepared.rgb).mean() < 3


def test_privacy_step_blurs_licence_plates_and_leaves_other_images_alone():
    from tests.conftest import plate_photo

    assert prepare_image(plate_photo(), privacy={"blur": True}).blurred_regions == 1
    assert prepare_image(plate_photo(), privacy={"blur": True, "plates": False}).blurred_regions == 0
    data = good_corpus()["plain.jpg"]
    prepared = prepare_image(data, privacy={"blur": True})
    assert prepared.blurred_regions == 0 and prepared.jpeg == data  # nothing found: bytes kept
