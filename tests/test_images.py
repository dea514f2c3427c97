"""Input images as people have them, resize rules and grids (no model needed)."""
import io
import os
import warnings

import numpy as np
import pytest
from PIL import Image

import tiny
from ip2p_jax import images as im


def _save(tmp_path, name, pil, **kw):
    p = os.path.join(tmp_path, name)
    pil.save(p, **kw)
    return p


def test_rgba_composited_on_white(tmp_path):
    a = np.zeros((10, 12, 4), np.uint8)
    a[..., 0] = 200
    a[:, :6, 3] = 255          # left half opaque red-ish, right half fully transparent
    out = np.asarray(im.load_image(_save(tmp_path, "a.png", Image.fromarray(a, "RGBA"))))
    assert out.shape == (10, 12, 3) and out.dtype == np.uint8
    assert (out[:, :6] == [200, 0, 0]).all()
    assert (out[:, 6:] == 255).all()


def test_grayscale_palette_cmyk(tmp_path):
    g = Image.fromarray(np.full((8, 8), 77, np.uint8), "L")
    assert (np.asarray(im.load_image(_save(tmp_path, "g.png", g))) == 77).all()
    p = Image.fromarray(tiny.random_image(16, 16)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    assert im.load_image(_save(tmp_path, "p.png", p)).mode == "RGB"
    p.info["transparency"] = 0
    out = np.asarray(im.load_image(_save(tmp_path, "pt.png", p, transparency=0)))
    idx = np.asarray(p) == 0
    assert idx.any() and (out[idx] == 255).all()
    c = Image.fromarray(tiny.random_image(16, 16)).convert("CMYK")
    out = im.load_image(_save(tmp_path, "c.jpg", c))
    assert out.mode == "RGB" and out.size == (16, 16)


def test_16bit_png(tmp_path):
    a = (np.arange(64 * 32).reshape(32, 64) * 32).astype(np.uint16)
    out = np.asarray(im.load_image(_save(tmp_path, "d.png", Image.fromarray(a))))
    assert out.shape == (32, 64, 3)
    np.testing.assert_allclose(out[..., 0], np.round(a / 65535 * 255), atol=1)
    # arrays too: uint16, float and 1-channel
    np.testing.assert_array_equal(np.asarray(im.to_rgb(np.full((4, 4, 3), 65535, np.uint16))), 255)
    np.testing.assert_array_equal(np.asarray(im.to_rgb(np.full((4, 4, 1), 0.5, np.float32))), 128)


def test_exif_rotation(tmp_path):
    base = Image.fromarray(tiny.random_image(20, 40))   # 40 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = 6                                     # rotate 90 degrees clockwise to display
    p = _save(tmp_path, "r.jpg", base, exif=exif.tobytes(), quality=95)
    assert Image.open(p).size == (40, 20)
    out = im.load_image(p)
    assert out.size == (20, 40)
    got = np.asarray(out, np.float32)
    right = np.abs(got - np.asarray(base.transpose(Image.Transpose.ROTATE_270), np.float32)).mean()
    wrong = np.abs(got - np.asarray(base.transpose(Image.Transpose.ROTATE_90), np.float32)).mean()
    assert right < 12 and wrong > 3 * right   # JPEG loss only; the other rotation is far off


def test_bad_files_are_named(tmp_path):
    bad = os.path.join(tmp_path, "corrupt.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(im.ImageError, match="corrupt.png"):
        im.load_image(bad)
    with pytest.raises(im.ImageError, match="missing.jpg: no such file"):
        im.load_image(os.path.join(tmp_path, "missing.jpg"))
    # truncated JPEG: header fine, data cut
    buf = io.BytesIO()
    Image.fromarray(tiny.random_image(64, 64)).save(buf, "JPEG")
    trunc = os.path.join(tmp_path, "trunc.jpg")
    with open(trunc, "wb") as f:
        f.write(buf.getvalue()[:300])
    with pytest.raises(im.ImageError, match="trunc.jpg"):
        im.load_image(trunc)


def test_pixel_limit(tmp_path):
    p = _save(tmp_path, "big.png", Image.new("RGB", (300, 200)))
    with pytest.raises(im.ImageError, match=r"big.png: 300x200 .* over the limit"):
        im.load_image(p, max_pixels=50_000)
    assert im.load_image(p, max_pixels=60_000).size == (300, 200)


def test_authors_rule():
    assert im.authors_size(512, 512, 512) == (512, 512)
    assert im.authors_size(640, 480, 512) == (512, 384)
    assert im.authors_size(1000, 600, 512) == (512, 320)
    assert im.authors_size(600, 1000, 512) == (320, 512)
    assert im.authors_size(300, 200, 256) == (256, 192)
    assert im.authors_size(123, 457, 512) == (192, 704)   # skinny: short side rounded up first
    assert im.authors_size(512, 100, 512) == (640, 128)
    for w, h in [(4000, 3000), (77, 64), (1920, 1080)]:
        ow, oh = im.authors_size(w, h, 512)
        assert ow % 64 == 0 and oh % 64 == 0 and 448 <= max(ow, oh) <= 576


def test_resize_modes():
    pic = Image.fromarray(tiny.random_image(52, 75))
    keep = im.resize_for_edit(pic, mode="keep")
    assert keep.size == (72, 48)
    same = Image.fromarray(tiny.random_image(48, 72))
    assert im.resize_for_edit(same, mode="keep") is same          # untouched when already a multiple of 8
    assert im.resize_for_edit(pic, mode="authors", resolution=128).size == (128, 128)
    assert im.resize_for_edit(Image.fromarray(tiny.random_image(90, 200)), mode="authors",
                              resolution=128).size == (128, 64)
    with pytest.raises(ValueError, match="resize must be one of"):
        im.resize_for_edit(pic, mode="stretch")
    with pytest.raises(im.ImageError, match="too large to edit at full size"):
        im.resize_for_edit(Image.new("RGB", (400, 400)), mode="keep", max_edit_pixels=100_000)


def test_tiny_image_upscaled_with_warning():
    small = Image.fromarray(tiny.random_image(10, 30))
    with pytest.warns(UserWarning, match="tiny"):
        out = im.resize_for_edit(small, mode="keep", name="small.png")
    assert min(out.size) >= im.MIN_SIDE and out.size[0] % 8 == 0 and out.size[1] % 8 == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        im.resize_for_edit(Image.fromarray(tiny.random_image(16, 24)), mode="keep")


def test_expand_paths(tmp_path):
    for n in ("b.png", "a.jpg", "notes.txt"):
        open(os.path.join(tmp_path, n), "wb").close()
    os.makedirs(os.path.join(tmp_path, "sub"))
    assert im.expand_paths([str(tmp_path)]) == [os.path.join(tmp_path, "a.jpg"), os.path.join(tmp_path, "b.png")]
    assert im.expand_paths([os.path.join(tmp_path, "*.png")]) == [os.path.join(tmp_path, "b.png")]
    assert im.expand_paths([os.path.join(tmp_path, "*.gif")]) == [os.path.join(tmp_path, "*.gif")]


def test_grid_layout():
    cells = [[Image.new("RGB", (32, 24), (10 * r, 20 * c, 0)) for c in range(3)] for r in range(2)]
    g = im.make_grid(cells, ["1.0", "1.5"], ["5", "7.5", "10"], title="make it winter",
                     row_title="image", col_title="text")
    assert g.width > 3 * 32 and g.height > 2 * 24
    a = np.asarray(g)
    # the bottom-right cell is pasted at the bottom-right corner
    assert (a[-24:, -32:] == [10, 40, 0]).all()
    with pytest.raises(ValueError, match="labels"):
        im.make_grid(cells, ["1"], ["5", "7.5", "10"])
