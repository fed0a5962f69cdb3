"""read_image at the file's precision, one test per Pillow mode; probe_image on broken files."""
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from epban.imageio import ImageReadError, probe_image, read_image

H, W = 13, 17


def _rgb8(seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _read(path) -> np.ndarray:
    x = read_image(path)
    assert x.dtype == torch.float32 and x.shape == (3, H, W)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    return x.permute(1, 2, 0).numpy()


def _png16(path, samples: np.ndarray, color_type: int, filters=(0, 1, 2, 3, 4)):
    """A 16-bit PNG written by hand (Pillow writes no 16-bit colour), each row with the next
    of ``filters`` (none, sub, up, average, Paeth), so that every row filter is decoded."""
    samples = np.asarray(samples, dtype=np.uint16)
    h = samples.shape[0]
    bpp = 2 * (1 if samples.ndim == 2 else samples.shape[2])
    rows = [np.frombuffer(samples[y].astype(">u2").tobytes(), np.uint8).astype(np.int32) for y in range(h)]
    data, prev = b"", np.zeros_like(rows[0])
    for y, row in enumerate(rows):
        f = filters[y % len(filters)]
        left = np.concatenate([np.zeros(bpp, np.int32), row[:-bpp]])
        up_left = np.concatenate([np.zeros(bpp, np.int32), prev[:-bpp]])
        if f == 4:
            p = left + prev - up_left
            pa, pb, pc = abs(p - left), abs(p - prev), abs(p - up_left)
            predicted = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, up_left))
        else:
            predicted = [0 * row, left, prev, (left + prev) // 2][f]
        data += bytes([f]) + ((row - predicted) % 256).astype(np.uint8).tobytes()
        prev = row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", samples.shape[1], h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(data))
                     + chunk(b"IEND", b""))
    return path


def _sixteen(seed=0, channels=3) -> np.ndarray:
    shape = (H, W) if channels == 1 else (H, W, channels)
    return np.random.default_rng(seed).integers(0, 65536, shape, dtype=np.uint16)


# ----------------------------------------------------------------------------- 8-bit modes
@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_rgb_and_rgba(tmp_path, mode):
    rgb = _rgb8()
    arr = rgb if mode == "RGB" else np.dstack([rgb, np.full((H, W), 7, np.uint8)])
    Image.fromarray(arr, mode).save(tmp_path / "x.png")
    np.testing.assert_array_equal(_read(tmp_path / "x.png") * 255, rgb)


def test_grey_l(tmp_path):
    grey = _rgb8()[:, :, 0]
    Image.fromarray(grey, "L").save(tmp_path / "x.png")
    np.testing.assert_array_equal(_read(tmp_path / "x.png") * 255, np.repeat(grey[:, :, None], 3, 2))


def test_grey_with_alpha_la(tmp_path):
    grey = _rgb8()[:, :, :2]
    Image.fromarray(grey, "LA").save(tmp_path / "x.png")
    np.testing.assert_array_equal(_read(tmp_path / "x.png") * 255, np.repeat(grey[:, :, :1], 3, 2))


def test_palette_p(tmp_path):
    palette = _rgb8(1).reshape(-1)[:768]
    palette = np.concatenate([palette, np.zeros(768 - palette.size, np.uint8)])
    index = np.random.default_rng(2).integers(0, 50, (H, W), dtype=np.uint8)
    im = Image.fromarray(index, "P")
    im.putpalette(palette.tolist())
    im.save(tmp_path / "x.png")
    np.testing.assert_array_equal(_read(tmp_path / "x.png") * 255, palette.reshape(256, 3)[index])


def test_bilevel_1(tmp_path):
    bits = np.random.default_rng(3).integers(0, 2, (H, W)).astype(bool)
    Image.fromarray(bits).save(tmp_path / "x.png")
    np.testing.assert_array_equal(_read(tmp_path / "x.png"), np.repeat(bits[:, :, None], 3, 2).astype(np.float32))


def test_cmyk(tmp_path):
    rgb = _rgb8()
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "x.tif")
    assert Image.open(tmp_path / "x.tif").mode == "CMYK"
    np.testing.assert_allclose(_read(tmp_path / "x.tif") * 255, rgb, atol=1)


# ----------------------------------------------------------------------------- 16-bit and wider modes
def test_sixteen_bit_grey_png_i16(tmp_path):
    """The case that read as mostly white: Pillow's convert clips 16-bit grey at 255."""
    grey = _sixteen(channels=1)
    Image.fromarray(grey).save(tmp_path / "x.png")
    assert Image.open(tmp_path / "x.png").mode == "I;16"
    np.testing.assert_array_equal(_read(tmp_path / "x.png") * 65535, np.repeat(grey[:, :, None], 3, 2))


def test_sixteen_bit_grey_png_every_row_filter(tmp_path):
    grey = _sixteen(1, channels=1)
    np.testing.assert_array_equal(_read(_png16(tmp_path / "x.png", grey, 0)) * 65535,
                                  np.repeat(grey[:, :, None], 3, 2))


def test_sixteen_bit_big_endian_i16b(tmp_path):
    grey = _sixteen(2, channels=1)
    Image.frombytes("I;16B", (W, H), grey.astype(">u2").tobytes()).save(tmp_path / "x.tif")
    assert Image.open(tmp_path / "x.tif").mode == "I;16B"
    np.testing.assert_array_equal(_read(tmp_path / "x.tif") * 65535, np.repeat(grey[:, :, None], 3, 2))


def test_thirty_two_bit_integer_i(tmp_path):
    grey = _sixteen(3, channels=1).astype(np.int32)
    Image.fromarray(grey).save(tmp_path / "x.tif")
    assert Image.open(tmp_path / "x.tif").mode == "I"
    np.testing.assert_array_equal(_read(tmp_path / "x.tif") * 65535, np.repeat(grey[:, :, None], 3, 2))
    Image.fromarray(grey * 4).save(tmp_path / "wide.tif")  # beyond 16 bits: no known scale
    with pytest.raises(ImageReadError, match="wide.tif: 32-bit integer samples"):
        read_image(tmp_path / "wide.tif")


def test_float_f(tmp_path):
    grey = np.random.default_rng(4).random((H, W), dtype=np.float32)
    Image.fromarray(grey).save(tmp_path / "x.tif")
    assert Image.open(tmp_path / "x.tif").mode == "F"
    np.testing.assert_array_equal(_read(tmp_path / "x.tif"), np.repeat(grey[:, :, None], 3, 2))
    Image.fromarray(grey * 255).save(tmp_path / "scaled.tif")
    with pytest.raises(ImageReadError, match=r"scaled.tif: floating-point samples in \[.*\]; expected \[0, 1\]"):
        read_image(tmp_path / "scaled.tif")


@pytest.mark.parametrize("color_type, channels", [(2, 3), (6, 4), (4, 2)], ids=["RGB", "RGBA", "LA"])
def test_sixteen_bit_colour_png(tmp_path, color_type, channels):
    """Pillow opens these as 8-bit RGB / RGBA (the high bytes); every bit is read."""
    samples = _sixteen(5, channels)
    x = _read(_png16(tmp_path / "x.png", samples, color_type)) * 65535
    want = samples[:, :, :3] if channels >= 3 else np.repeat(samples[:, :, :1], 3, 2)
    np.testing.assert_array_equal(x, want)
    assert np.any(x % 256 != 0)  # the low bytes are there


@pytest.mark.parametrize("layout", ["little", "big", "zlib", "strips", "rgba"])
def test_sixteen_bit_colour_tiff(tmp_path, layout):
    tifffile = pytest.importorskip("tifffile")
    samples = _sixteen(6, 4 if layout == "rgba" else 3)
    kwargs = {"zlib": {"compression": "zlib"}, "strips": {"rowsperstrip": 4}}.get(layout, {})
    tifffile.imwrite(tmp_path / "x.tif", samples.astype(">u2") if layout == "big" else samples, **kwargs)
    np.testing.assert_array_equal(_read(tmp_path / "x.tif") * 65535, samples[:, :, :3])


def test_sixteen_bit_grey_scores_as_identical(tmp_path):
    """The same 16-bit grey content as SR and HR: SSIM 1, not the 0.27 of the clipped read."""
    from epban.ops.ssim import ssim

    grey = np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64)
    Image.fromarray(grey).save(tmp_path / "a.png")
    Image.fromarray(grey).save(tmp_path / "b.tif")
    a, b = read_image(tmp_path / "a.png")[None], read_image(tmp_path / "b.tif")[None]
    assert float((a > 0.99).float().mean()) < 0.02
    assert float(ssim(a, b)) == pytest.approx(1.0, abs=1e-6)


# ----------------------------------------------------------------------------- broken files
def test_probe_finds_truncated_and_corrupt_files(tmp_path):
    Image.fromarray(_rgb8()).save(tmp_path / "good.png")
    assert probe_image(tmp_path / "good.png") == (H, W)
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:len(data) - 30])  # the header is whole: Image.open succeeds
    Image.open(tmp_path / "cut.png").close()
    with pytest.raises(ImageReadError, match="cut.png: cannot read as an image"):
        probe_image(tmp_path / "cut.png")
    flipped = bytearray(data)
    flipped[60] ^= 0xFF  # inside the image data: its checksum no longer matches
    (tmp_path / "flipped.png").write_bytes(bytes(flipped))
    with pytest.raises(ImageReadError, match="flipped.png"):
        probe_image(tmp_path / "flipped.png")
    (tmp_path / "text.png").write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match="text.png: cannot read as an image"):
        probe_image(tmp_path / "text.png")
    with pytest.raises(ImageReadError, match="none.png: no such file"):
        probe_image(tmp_path / "none.png")
    with pytest.raises(ImageReadError, match="cut.png: cannot read as an image"):
        read_image(tmp_path / "cut.png")
