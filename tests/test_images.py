"""pipeline.images: every conversion of the corpus, and every refusal with its reason."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.images import ImageError, prepare_image
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
