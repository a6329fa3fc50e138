import numpy as np
import pytest
from PIL import Image

from detkit.data.image_io import ImageDecodeError, read_image


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
