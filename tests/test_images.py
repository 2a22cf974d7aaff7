"""Image transfer sets: folders, .npz, the built-in photos, errors, downscaling, seeded views, mixup."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgedistill import images as images_mod
from edgedistill.errors import DataError
from edgedistill.images import ImageSet, _random_resized_crop, load_image_set, make_views, mixup


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth colour image with some noise: compresses fast, and JPEG keeps it recognisable."""
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    rgb = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) * 127 // max(h + w - 2, 1)], -1)
    return np.clip(rgb + rng.integers(0, 16, (h, w, 3)), 0, 255).astype(np.uint8)


def _save(path, array, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


# ---- folders -----------------------------------------------------------------------------------------------------

def test_class_folder_labels_and_names(tmp_path):
    _save(tmp_path / "dog" / "b.png", _photo(20, 30, 1))
    _save(tmp_path / "dog" / "a.JPG", _photo(24, 24, 2), format="JPEG")
    _save(tmp_path / "cat" / "x.webp", _photo(16, 40, 3))
    (tmp_path / "empty_class").mkdir()  # still a class: ids must follow the folder's class list
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "cat" / "._x.jpg").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    s = load_image_set(tmp_path)
    assert isinstance(s, ImageSet) and len(s) == 3
    assert s.class_names == ["cat", "dog", "empty_class"]
    assert s.names == ["cat/x.webp", "dog/a.JPG", "dog/b.png"]
    assert s.labels == [0, 1, 1]
    assert [im.shape for im in s.images] == [(16, 40, 3), (24, 24, 3), (20, 30, 3)]
    assert all(im.dtype == np.uint8 for im in s.images)
    np.testing.assert_array_equal(s.images[2], _photo(20, 30, 1))  # PNG is lossless
    assert s.source == str(tmp_path) and len(s.sha256) == 64
    assert load_image_set(tmp_path).sha256 == s.sha256
    first = load_image_set(tmp_path, max_images=2)
    assert first.names == ["cat/x.webp", "dog/a.JPG"] and first.labels == [0, 1]
    assert first.class_names == s.class_names


def test_flat_folder_is_recursive_sorted_unlabelled(tmp_path):
    _save(tmp_path / "z.png", _photo(10, 12))
    _save(tmp_path / "trip" / "day1" / "a.bmp", _photo(11, 13))
    _save(tmp_path / "b.jpeg", _photo(14, 9), format="JPEG")
    s = load_image_set(str(tmp_path))
    assert s.names == ["b.jpeg", "trip/day1/a.bmp", "z.png"]
    assert s.labels is None and s.class_names is None


def test_modes_and_exif_orientation_become_upright_rgb(tmp_path):
    Image.fromarray(_photo(12, 18)).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(_photo(12, 18)).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(_photo(12, 18)).convert("L").save(tmp_path / "gray.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(_photo(20, 40)).save(tmp_path / "rotated.jpg", exif=exif)
    s = load_image_set(tmp_path)
    shapes = dict(zip(s.names, (im.shape for im in s.images)))
    assert shapes == {"gray.png": (12, 18, 3), "palette.png": (12, 18, 3), "rgba.png": (12, 18, 3),
                      "rotated.jpg": (40, 20, 3)}
    gray = s.images[s.names.index("gray.png")]
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


def test_large_images_are_downscaled_to_short_side_512(tmp_path):
    _save(tmp_path / "big.jpg", _photo(3000, 4000), format="JPEG", quality=85)  # JPEG: decoded at reduced scale
    _save(tmp_path / "tall.png", _photo(1200, 900))
    s = load_image_set(tmp_path)
    assert [im.shape for im in s.images] == [(512, 683, 3), (683, 512, 3)]
    # antialiased: the downscaled gradient stays close to a Pillow resize of the original
    expected = np.asarray(Image.fromarray(_photo(1200, 900)).resize((512, 683), Image.Resampling.LANCZOS))
    assert np.abs(s.images[1].astype(int) - expected).mean() < 1.0


# ---- .npz --------------------------------------------------------------------------------------------------------

def test_npz_rgb_with_labels_and_class_names(tmp_path):
    arr = np.stack([_photo(8, 10, i) for i in range(4)])
    np.savez(tmp_path / "set.npz", images=arr, labels=np.array([2, 0, 1, 2]), class_names=np.array(["a", "b", "c"]))
    s = load_image_set(tmp_path / "set.npz")
    assert len(s) == 4 and s.labels == [2, 0, 1, 2] and s.class_names == ["a", "b", "c"]
    assert s.names == ["npz[0]", "npz[1]", "npz[2]", "npz[3]"]
    np.testing.assert_array_equal(np.stack(s.images), arr)
    assert load_image_set(tmp_path / "set.npz", max_images=2).labels == [2, 0]


def test_npz_grayscale_becomes_rgb(tmp_path):
    gray = np.arange(2 * 6 * 7, dtype=np.uint8).reshape(2, 6, 7)
    np.savez(tmp_path / "g.npz", images=gray)
    s = load_image_set(tmp_path / "g.npz")
    assert s.labels is None and s.class_names is None
    assert s.images[0].shape == (6, 7, 3)
    np.testing.assert_array_equal(s.images[1][..., 2], gray[1])


def test_same_content_same_hash_whatever_the_container(tmp_path):
    arrays = [_photo(9, 11, 5), _photo(9, 11, 6)]
    _save(tmp_path / "dir" / "a" / "0.png", arrays[0])
    _save(tmp_path / "dir" / "b" / "1.png", arrays[1])
    np.savez(tmp_path / "s.npz", images=np.stack(arrays), labels=np.array([0, 1]), class_names=np.array(["a", "b"]))
    from_dir, from_npz = load_image_set(tmp_path / "dir"), load_image_set(tmp_path / "s.npz")
    assert from_dir.sha256 == from_npz.sha256
    np.savez(tmp_path / "t.npz", images=np.stack(arrays), labels=np.array([1, 1]), class_names=np.array(["a", "b"]))
    assert load_image_set(tmp_path / "t.npz").sha256 != from_npz.sha256


# ---- errors ------------------------------------------------------------------------------------------------------

def _npz(tmp_path, **arrays):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


def _file(path, data: bytes):
    path.write_bytes(data)
    return path


def _folder_without_images(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "readme.txt").write_text("x")
    return tmp_path / "d"


@pytest.mark.parametrize("make, words", [
    (lambda p: p / "missing", "does not exist"),
    (_folder_without_images, "holds no images"),
    (lambda p: _file(p / "img.png", b"\x89PNG\r\n\x1a\n"), "neither a folder nor an .npz"),
    (lambda p: _file(p / "x.npz", b"not a zip at all" * 4), "cannot read"),
    (lambda p: _npz(p, pixels=np.zeros((1, 4, 4, 3), np.uint8)), "no array 'images'"),
    (lambda p: _npz(p, images=np.zeros((1, 4, 4, 3), np.float32)), "float32"),
    (lambda p: _npz(p, images=np.zeros((1, 4, 4, 4), np.uint8)), "(1, 4, 4, 4)"),
    (lambda p: _npz(p, images=np.zeros((4, 4), np.uint8)), "(4, 4)"),
    (lambda p: _npz(p, images=np.zeros((0, 4, 4), np.uint8)), "holds no images"),
    (lambda p: _npz(p, images=np.zeros((3, 4, 4, 3), np.uint8), labels=np.array([0, 1])), "'labels'"),
    (lambda p: _npz(p, images=np.zeros((2, 4, 4, 3), np.uint8), labels=np.array([0.5, 1.0])), "float64"),
    (lambda p: _npz(p, images=np.zeros((2, 4, 4, 3), np.uint8), labels=np.array([0, 3]),
                    class_names=np.array(["a", "b"])), "of 2 class names"),
    (lambda p: _npz(p, images=np.array([np.zeros((2, 2)), "x"], dtype=object)), "unpickling"),
    (lambda p: _npz(p, images=np.zeros((1, 4, 4, 3), np.uint8), class_names=np.array(["a", 1], dtype=object)),
     "unpickling"),
])
def test_bad_inputs_raise_data_error(tmp_path, make, words):
    path = make(tmp_path)
    with pytest.raises(DataError) as info:
        load_image_set(path)
    assert words in info.value.message
    assert info.value.hint and "\n" not in str(info.value)


def test_corrupt_image_is_named(tmp_path):
    _save(tmp_path / "ok.png", _photo(8, 8))
    good = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "broken.png").write_bytes(good[: len(good) // 2])  # truncated
    (tmp_path / "junk.jpg").write_bytes(b"this is no jpeg")
    with pytest.raises(DataError, match=r"cannot decode image .*broken\.png"):
        load_image_set(tmp_path)
    (tmp_path / "broken.png").unlink()
    with pytest.raises(DataError, match=r"cannot decode image .*junk\.jpg") as info:
        load_image_set(tmp_path)
    assert "corrupt" in info.value.hint


def test_npz_is_never_unpickled(tmp_path, monkeypatch):
    seen = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: seen.append(k.get("allow_pickle")) or real_load(*a, **k))
    load_image_set(_npz(tmp_path, images=np.zeros((1, 4, 4, 3), np.uint8)))
    assert seen == [False]


# ---- built-in photos ---------------------------------------------------------------------------------------------

def test_builtin_photos_load_and_hash_is_stable():
    pytest.importorskip("skimage")
    s = load_image_set(None)
    skimage_names = [f"skimage.data.{n}" for n in images_mod.SKIMAGE_PHOTOS]
    assert s.names[:5] == skimage_names and s.source == "builtin:photos"
    assert s.labels is None and s.class_names is None
    assert all(im.ndim == 3 and im.shape[2] == 3 and im.dtype == np.uint8 and min(im.shape[:2]) <= 512
               for im in s.images)
    plasma = [n for n in s.names if n.startswith("/usr/share/wallpapers/")]
    assert all("screenshot" not in n for n in plasma) and len(plasma) <= len(images_mod.PLASMA_PHOTOS)
    files = [str(folder / f) for _, folder, names in images_mod.PHOTO_FILES for f in names]
    sklearn = ["sklearn.datasets.load_sample_images:china.jpg", "sklearn.datasets.load_sample_images:flower.jpg"]
    gcompris = [n for n in s.names if n.startswith(str(images_mod.GCOMPRIS_RCC_DIR))]
    # in this order, so that adding a source keeps the earlier photos' indices (their seeded views)
    assert s.names[5:] == plasma + [n for n in files if n in s.names] + sklearn + gcompris
    if Path("/usr/share/backgrounds/mate/nature").is_dir():  # `make install` installs the Debian photos
        assert len(s.names) == 5 + len(images_mod.PLASMA_PHOTOS) + len(files) + 2 + 106 == 150
        assert gcompris[0].endswith(":/gcompris/src/activities/erase/resource/alpaca.webp")
        assert gcompris[-1].endswith("/explore_monuments/resource/wonders/tajMahal.webp")
    assert len(set(s.names)) == len(s.names)
    again = load_image_set(None)
    assert again.sha256 == s.sha256
    assert load_image_set(None, max_images=3).names == skimage_names[:3]


def test_builtin_photos_without_wallpapers(monkeypatch, tmp_path):
    pytest.importorskip("skimage")
    monkeypatch.setattr(images_mod, "PLASMA_WALLPAPERS_DIR", tmp_path / "absent")
    monkeypatch.setattr(images_mod, "PHOTO_FILES", ())
    monkeypatch.setattr(images_mod, "GCOMPRIS_RCC_DIR", tmp_path / "absent")
    s = load_image_set(None)
    assert s.names[:5] == [f"skimage.data.{n}" for n in images_mod.SKIMAGE_PHOTOS] and len(s.names) == 7
    assert s.images[1].shape == (300, 451, 3)  # chelsea, below the 512 px cap, untouched


# ---- views -------------------------------------------------------------------------------------------------------

def test_train_views_shapes_and_determinism():
    imgs = [_photo(60, 80, 1), _photo(90, 50, 2), _photo(40, 40, 3)]
    views, index = make_views(imgs, views_per_image=4, size=32, seed=7, train=True)
    assert views.shape == (12, 3, 32, 32) and views.dtype == np.uint8
    assert index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    again, _ = make_views(imgs, 4, 32, 7, True)
    assert again.tobytes() == views.tobytes()
    other, _ = make_views(imgs, 4, 32, 8, True)
    assert other.tobytes() != views.tobytes()
    assert len({views[k].tobytes() for k in range(4)}) == 4  # the views of one image differ
    # image i's views depend on (seed, i) only, not on the images around it
    alone, _ = make_views(imgs[:1], 4, 32, 7, True)
    assert alone.tobytes() == views[:4].tobytes()


def test_random_resized_crop_bounds_and_fallback():
    rng = np.random.default_rng(0)
    for _ in range(300):
        top, left, h, w = _random_resized_crop(rng, 120, 160)
        assert 0 <= top <= 120 - h and 0 <= left <= 160 - w
        assert 0.25 * 120 * 160 * 0.9 <= h * w <= 120 * 160
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    # a 10x1000 strip: no crop of scale >= 0.25 and ratio <= 4/3 fits, so it falls back to the center crop
    assert _random_resized_crop(np.random.default_rng(0), 10, 1000) == (0, 493, 10, 13)
    assert _random_resized_crop(np.random.default_rng(0), 1000, 10) == (493, 0, 13, 10)


def test_eval_views_are_resize_then_center_crop():
    image = _photo(300, 400, 4)
    views, index = make_views([image, _photo(50, 20)], views_per_image=5, size=224, seed=0, train=False)
    assert views.shape == (2, 3, 224, 224) and index.tolist() == [0, 1]
    # by hand: short side 300 -> 256, so 400 -> int(256 * 400 / 300) = 341; crop offsets round((341 - 224) / 2) = 58
    # (Python rounds 58.5 to even, as torchvision's CenterCrop does) and (256 - 224) / 2 = 16
    resized = np.asarray(Image.fromarray(image).resize((341, 256), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(views[0], resized[16:240, 58:282].transpose(2, 0, 1))
    again, _ = make_views([image, _photo(50, 20)], 1, 224, 123, False)
    assert again.tobytes() == views.tobytes()  # eval views ignore the seed


def test_crop_scale_and_resize_set_the_views():
    image = _photo(28, 28, 3)
    whole, _ = make_views([image], 1, 28, 0, train=False, resize_px=28)
    np.testing.assert_array_equal(whole[0], image.transpose(2, 0, 1))  # --resize N: nothing cropped
    cropped, _ = make_views([image], 1, 28, 0, train=False)
    assert cropped.tobytes() != whole.tobytes()  # default: resize 32, center crop 28
    for _ in range(50):
        top, left, h, w = _random_resized_crop(np.random.default_rng(_), 120, 160, (0.8, 1.0))
        assert 0.8 * 120 * 160 * 0.9 <= h * w <= 120 * 160


def test_eval_views_match_the_teachers_preprocessing():
    from edgedistill.teachers.vision import Preprocess, preprocess_image

    image = _photo(333, 250, 9)
    views, _ = make_views([image], 1, 224, 0, train=False)
    x = preprocess_image(image, Preprocess(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))
    np.testing.assert_allclose(x.numpy() * 255.0, views[0].astype(np.float32), atol=1e-3)


# ---- mixup -------------------------------------------------------------------------------------------------------

def test_mixup_is_a_seeded_convex_mix():
    x = torch.randn(6, 3, 4, 4)
    mixed, perm, lam = mixup(x, 0.4, torch.Generator().manual_seed(3))
    assert mixed.shape == x.shape and 0.0 <= lam <= 1.0
    assert sorted(perm.tolist()) == list(range(6))
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[perm])
    mixed2, perm2, lam2 = mixup(x, 0.4, torch.Generator().manual_seed(3))
    assert lam2 == lam and torch.equal(perm2, perm) and torch.equal(mixed2, mixed)
    lams = [mixup(x, 0.4, torch.Generator().manual_seed(s))[2] for s in range(200)]
    assert abs(np.mean(lams) - 0.5) < 0.08 and np.mean([min(v, 1 - v) < 0.1 for v in lams]) > 0.3  # Beta(0.4, 0.4)
