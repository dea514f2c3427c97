"""The authors' joint augmentation: one resize / crop / flip for both images of a pair."""
import collections

import numpy as np
import pytest
from PIL import Image

import tiny
from ip2p_jax.data import augment as A


def _coordinate_image(size: int) -> Image.Image:
    """Pixel (y, x) holds (y, x, 0): an output crop tells where it came from and if it was flipped."""
    yy, xx = np.mgrid[0:size, 0:size]
    return Image.fromarray(np.stack([yy, xx, np.zeros_like(yy)], -1).astype(np.uint8))


def test_same_image_twice_gives_identical_outputs():
    im = Image.fromarray(tiny.random_image(48, 40))
    cfg = A.AugmentConfig(min_resize=36, max_resize=44, crop_size=32, flip_prob=0.5)
    flips = 0
    for seed in range(40):
        a, b = A.augment_pair(im, im.copy(), cfg, np.random.default_rng(seed))
        assert a.shape == b.shape == (32, 32, 3) and a.dtype == np.uint8
        np.testing.assert_array_equal(a, b)
        p = A.draw_params(cfg, np.random.default_rng(seed))
        ref = np.asarray(im.resize((p.size, p.size), Image.Resampling.LANCZOS))[p.top:p.top + 32, p.left:p.left + 32]
        np.testing.assert_array_equal(a, ref[:, ::-1] if p.flip else ref)
        flips += p.flip
    assert 0 < flips < 40


def test_different_images_get_the_same_crop_and_flip():
    a_im, b_im = _coordinate_image(40), Image.fromarray(255 - np.asarray(_coordinate_image(40)))
    cfg = A.AugmentConfig(40, 40, 32, 0.5)
    for seed in range(20):
        a, b = A.augment_pair(a_im, b_im, cfg, np.random.default_rng(seed))
        np.testing.assert_array_equal(a, 255 - b)


def test_crop_and_flip_rates():
    size, crop, n = 40, 32, 3000
    im = _coordinate_image(size)
    cfg = A.AugmentConfig(size, size, crop, flip_prob=0.5)
    tops, lefts, flips = collections.Counter(), collections.Counter(), 0
    for seed in range(n):
        out, _ = A.augment_pair(im, im, cfg, np.random.default_rng(seed))
        top, flipped = int(out[0, 0, 0]), out[0, 0, 1] > out[0, -1, 1]
        left = int(out[0, -1, 1]) if flipped else int(out[0, 0, 1])
        tops[top] += 1
        lefts[left] += 1
        flips += flipped
    k = size - crop + 1  # offsets 0..8, uniform
    assert sorted(tops) == sorted(lefts) == list(range(k))
    for counts in (tops, lefts):
        assert all(abs(c / n - 1 / k) < 0.03 for c in counts.values()), counts
    assert abs(flips / n - 0.5) < 0.03
    # configured flip rates 0 and 1, and the resize range (inclusive)
    never = A.AugmentConfig(size, size, crop, flip_prob=0.0)
    always = A.AugmentConfig(size, size, crop, flip_prob=1.0)
    assert not any(A.draw_params(never, np.random.default_rng(s)).flip for s in range(200))
    assert all(A.draw_params(always, np.random.default_rng(s)).flip for s in range(200))
    sizes = {A.draw_params(A.AugmentConfig(33, 36, 32), np.random.default_rng(s)).size for s in range(300)}
    assert sizes == {33, 34, 35, 36}


def test_no_augmentation_and_values():
    im = Image.fromarray(tiny.random_image(50, 60))
    cfg = A.AugmentConfig(32, 48, 32, random=False)
    a, _ = A.augment_pair(im, im, cfg, np.random.default_rng(0))
    np.testing.assert_array_equal(a, np.asarray(im.resize((32, 32), Image.Resampling.LANCZOS)))
    x = A.to_float(np.array([[0, 255, 128]], np.uint8))
    np.testing.assert_allclose(x, [[-1.0, 1.0, 2 * 128 / 255 - 1]], atol=1e-6)
    assert x.dtype == np.float32
    with pytest.raises(ValueError, match="crop_size <= min_resize"):
        A.AugmentConfig(30, 40, 32)


def test_decode_rgb_converts_modes():
    import io
    for mode in ("L", "RGBA", "P"):
        buf = io.BytesIO()
        Image.fromarray(tiny.random_image(8, 8)).convert(mode).save(buf, "PNG")
        im = A.decode_rgb(buf.getvalue())
        assert im.mode == "RGB" and np.asarray(im).shape == (8, 8, 3)


def test_draft_decode_is_close_and_joint():
    import data_helpers as dh
    data = dh.encode(tiny.random_image(128, 128, seed=3), "JPEG")
    small = A.decode_rgb(data, draft_size=40)
    assert small.size == (64, 64) and small.mode == "RGB"  # 1/2 scale: the smallest not below 40
    cfg = A.AugmentConfig(40, 40, 32, draft_decode=True)
    p = A.draw_params(cfg, np.random.default_rng(0))
    exact = A.apply_params(A.decode_rgb(data), p, 32).astype(float)
    fast = A.apply_params(small, p, 32).astype(float)
    assert np.abs(exact - fast).mean() < 6  # same picture, slightly different filtering
    assert A.decode_rgb(dh.encode(tiny.random_image(20, 20), "PNG"), draft_size=8).size == (20, 20)
