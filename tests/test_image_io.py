import logging
import time
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from conftest import garbage_exif_jpeg, png_bytes
from detkit.data.image_io import DEFAULT_MAX_PIXELS, ImageDecodeError, read_image


def _gradient(w=40, h=30):
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :, None].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.uint8)[:, None, None].repeat(w, 1)
    return np.concatenate([x, y, 255 - x], axis=2)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "1", "LA"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    img = Image.fromarray(_gradient())
    if mode == "I;16":
        img = Image.fromarray((np.asarray(img.convert("L"), dtype=np.uint16) * 257))
    else:
        img = img.convert(mode)
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    img.save(path)
    out = read_image(path)
    assert out.mode == "RGB" and out.size == (40, 30)


def test_exif_orientation_is_applied(tmp_path):
    shown = Image.fromarray(_gradient(40, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to display
    shown.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "r.jpg", quality=98, exif=exif.tobytes())
    out = read_image(tmp_path / "r.jpg")
    assert out.size == (40, 30)
    assert np.abs(np.asarray(out, np.int16) - np.asarray(shown, np.int16)).mean() < 4


def test_pixel_limit_refuses_before_decoding(tmp_path):
    Image.new("RGB", (200, 100)).save(tmp_path / "big.png")
    with pytest.raises(ImageDecodeError, match="over the limit"):
        read_image(tmp_path / "big.png", max_pixels=10_000)


def test_corrupt_truncated_and_missing_files_name_the_path(tmp_path):
    Image.fromarray(_gradient(200, 200)).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image")
    for name, reason in [("trunc.jpg", "truncated"), ("junk.jpg", "not a recognised image"),
                         ("missing.jpg", "not found")]:
        with pytest.raises(ImageDecodeError) as info:
            read_image(tmp_path / name)
        assert name in str(info.value) and reason in str(info.value)


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty.jpg: not a recognised image file"):
        read_image(tmp_path / "empty.jpg")


def test_decompression_bomb_header_is_refused_at_the_default_limit(tmp_path):
    # 40000 x 40000 1-bit gray, 1.6 gigapixels: 200 MB as a bitmap, 4.8 GB as RGB, in a file of 70 bytes
    (tmp_path / "bomb.png").write_bytes(png_bytes(40000, 40000, 1, 0, bytes(64)))
    assert 40000 * 40000 > DEFAULT_MAX_PIXELS
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ImageDecodeError, match="bomb.png: .*decompression bomb"):
            read_image(tmp_path / "bomb.png")
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5 and peak < 50e6


def test_sixteen_bit_png_gray_and_rgb(tmp_path):
    ramp = np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)  # 0, 257, ..., 65535: 8-bit v as v * 257
    Image.fromarray(ramp).save(tmp_path / "gray16.png")
    with Image.open(tmp_path / "gray16.png") as stored:
        assert stored.mode.startswith("I")  # really read as 16 bits
    out = np.asarray(read_image(tmp_path / "gray16.png"))
    assert out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out[..., 0], ramp // 257)
    assert (out[..., 0] == out[..., 2]).all()

    # 48-bit RGB, written by hand (bit depth 16, colour type 2), big-endian samples after a 0 filter byte per row
    rgb = np.stack([ramp, ramp[::-1], np.full_like(ramp, 0x8000)], axis=2).astype(">u2")
    rows = b"".join(b"\x00" + rgb[r].tobytes() for r in range(16))
    (tmp_path / "rgb48.png").write_bytes(png_bytes(16, 16, 16, 2, rows))
    out = np.asarray(read_image(tmp_path / "rgb48.png"))
    assert out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out.astype(np.int64), rgb.astype(np.int64) >> 8)  # the high byte of each sample


def test_cmyk_jpeg(tmp_path):
    shown = Image.fromarray(_gradient())
    shown.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    with Image.open(tmp_path / "cmyk.jpg") as stored:
        assert stored.mode == "CMYK"
    out = read_image(tmp_path / "cmyk.jpg")
    assert out.mode == "RGB" and out.size == (40, 30)
    assert np.abs(np.asarray(out, np.int16) - np.asarray(shown, np.int16)).mean() < 8


def test_corrupt_exif_keeps_the_stored_orientation(tmp_path, caplog):
    stored = Image.fromarray(_gradient(40, 30))
    (tmp_path / "bad_exif.jpg").write_bytes(garbage_exif_jpeg(stored))  # orientation 6, and a field Pillow rejects
    with caplog.at_level(logging.WARNING, logger="detkit.data.image_io"):
        out = read_image(tmp_path / "bad_exif.jpg")
    assert out.size == (40, 30)  # not rotated: the EXIF block as a whole is not trusted
    assert np.abs(np.asarray(out, np.int16) - np.asarray(stored, np.int16)).mean() < 4
    assert "bad_exif.jpg" in caplog.text and "unreadable EXIF" in caplog.text and "struct.error" in caplog.text
