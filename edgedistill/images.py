"""Image transfer sets: a folder, an .npz or the built-in photos; seeded train/eval views; mixup."""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from edgedistill.errors import DataError
from edgedistill.qt_resources import read_rcc

BUILTIN_NAME = "builtin:photos"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MAX_SHORT_SIDE_PX = 512  # wallpapers are often 4K-5K; 512 keeps a 224 crop sharp and a few hundred photos in RAM
PLASMA_WALLPAPERS_DIR = Path("/usr/share/wallpapers")

# scikit-image's natural RGB photographs shipped inside its wheel (no download). Left out: grayscale images
# (camera, moon, coins, brick, grass, gravel, ...), microscopy / medical / astronomy (immunohistochemistry, retina,
# hubble_deep_field), synthetic ones (colorwheel, logo) and motorcycle's right view (the left one, shifted).
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle")
# Debian's plasma-workspace-wallpapers (5.27) that are photographs; the other 19 are renderings or drawings.
# Each wallpaper ships a screenshot and up to 12 sizes (in Debian, symlinks to one real file, sometimes a second
# portrait or dark variant): only its largest landscape file is taken.
# Debian's gnome-backgrounds (43.1) holds no photograph (patterns, illustrations, SVGs), so none of it is used.
PLASMA_PHOTOS = ("BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey",
                 "Kite", "OneStandsOut", "Path", "summer_1am")
# Photographs shipped as plain files, by the Debian package (or wheel) that ships them; each photo is one file. They
# come after the ones above, so adding a source keeps the earlier photos' indices and hence their seeded views.
BACKGROUNDS_DIR = Path("/usr/share/backgrounds")
PHOTO_FILES: tuple[tuple[str, Path, tuple[str, ...]], ...] = (
    # Ubuntu Touch's 16.04 wallpapers: 14 of its 15 (left out: analogpattern, a close-up of textured paper)
    ("lomiri-wallpapers-16.04", BACKGROUNDS_DIR, tuple(f"{n}.jpg" for n in (
        "Bridge_by_Sander_Klootwijk", "Dragonfly_by_Bolly", "Picture_0B_by_freespace", "Picture_1A_by_freespace",
        "Wine_by_Jakkub_Mede", "aitzgorri_by_Aitzol_Berasategi", "free_by_Peter_Nerlich", "friends_by_Aitzol_Berasategi",
        "greentock_by_Peter_Nerlich", "life_by_Aitzol_Berasategi", "picosdeeuropa_by_Aitzol_Berasategi",
        "seeding_by_Clements_Engelhardt", "sunset_by_Aitzol_Berasategi", "umang_by_Abhishek_Mudgal"))),
    # MATE's nature folder, all photographs (its desktop/ and abstract/ folders are renderings)
    ("mate-backgrounds", BACKGROUNDS_DIR / "mate" / "nature", tuple(f"{n}.jpg" for n in (
        "Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops", "Storm", "TwoWings",
        "Wood", "YellowFlower"))),
)

# GCompris' photographs (Debian's gcompris-qt-data), packed in Qt resource bundles: (bundle, folder inside it). All
# 106 are photographs (animals: 33 + 15 + 9; monuments: 49); its other bundles hold drawings (lang, babyshapes, ...).
GCOMPRIS_RCC_DIR = Path("/usr/share/gcompris-qt/rcc")
GCOMPRIS_PHOTOS = (("erase.rcc", "erase/resource"), ("explore_world_animals.rcc", "explore_world_animals/resource"),
                   ("explore_farm_animals.rcc", "explore_farm_animals/resource"),
                   ("explore_monuments.rcc", "explore_monuments/resource"))


@dataclass
class ImageSet:
    """HxWx3 uint8 RGB images (and optional integer labels) the student learns from; `sha256` identifies the content."""

    images: list[np.ndarray]
    labels: list[int] | None
    class_names: list[str] | None
    source: str
    sha256: str
    names: list[str]

    def __len__(self) -> int:
        return len(self.images)


def _content_sha256(images: list[np.ndarray], labels: list[int] | None, class_names: list[str] | None) -> str:
    h = hashlib.sha256()
    for i, image in enumerate(images):
        h.update(repr(image.shape).encode())
        h.update(np.ascontiguousarray(image).tobytes())
        h.update(b"\x00" if labels is None else f"\x01{labels[i]}".encode())
    h.update("\x00".join(class_names or []).encode("utf-8"))
    return h.hexdigest()


def load_image_set(path: str | Path | None, max_images: int | None = None) -> ImageSet:
    """Return the images in a folder (flat, or one subfolder per class) or an .npz, or the built-in photos for None."""
    if path is None:
        images, names = _builtin_photos(max_images)
        labels, class_names, source = None, None, BUILTIN_NAME
    else:
        path = Path(path)
        source = str(path)
        if path.is_dir():
            images, labels, class_names, names = _read_folder(path, max_images)
        elif path.is_file() and path.suffix.lower() == ".npz":
            images, labels, class_names, names = _read_npz(path, max_images)
        elif path.is_file():
            raise DataError(f"image data {path} is neither a folder nor an .npz file",
                            hint="pass --data PATH to a folder of images or an .npz with an 'images' array")
        else:
            raise DataError(f"image data {path} does not exist",
                            hint="pass --data PATH to a folder of images or an .npz with an 'images' array")
    if not images:
        raise DataError(f"{source} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})",
                        hint="pass a folder holding .jpg/.png/.webp/.bmp files, or an .npz with an 'images' array")
    return ImageSet(images=images, labels=labels, class_names=class_names, source=source,
                    sha256=_content_sha256(images, labels, class_names), names=names)


def _is_image_file(p: Path) -> bool:
    # dot-files are skipped: macOS writes '._x.jpg' resource forks that are not images
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _read_folder(root: Path, max_images: int | None) -> tuple[list[np.ndarray], list[int] | None, list[str] | None, list[str]]:
    files = sorted((p for p in root.rglob("*") if _is_image_file(p)), key=lambda p: p.relative_to(root).as_posix())
    rel = [p.relative_to(root) for p in files]
    labels = class_names = None
    if rel and all(len(r.parts) == 2 for r in rel):
        # class/xxx.jpg: every subfolder is a class, empty ones too, so label ids match the folder's class list
        class_names = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        index = {name: i for i, name in enumerate(class_names)}
        labels = [index[r.parts[0]] for r in rel]
    if max_images is not None:
        files, rel = files[:max_images], rel[:max_images]
        labels = labels[:max_images] if labels is not None else None
    return [decode_image(p) for p in files], labels, class_names, [r.as_posix() for r in rel]


def decode_image(path: Path, data: bytes | None = None) -> np.ndarray:
    """Return the image file (or `data`, the bytes of the file named `path`) as HxWx3 uint8 RGB, EXIF orientation
    applied, short side at most 512 px."""
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as im:
            if im.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 scale when that still leaves >= 512 px
                scale = MAX_SHORT_SIDE_PX / min(im.size)
                if scale < 1:
                    im.draft("RGB", (int(im.width * scale) + 1, int(im.height * scale) + 1))
            im = ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # Pillow's decoders raise all four
        raise DataError(f"cannot decode image {path} ({type(e).__name__}: {str(e)[:120]})",
                        hint="remove or replace the corrupt file") from None
    return _cap_size(im)


def _cap_size(im) -> np.ndarray:
    """Return the PIL image as an array, downscaled (antialiased) so its short side is at most 512 px."""
    w, h = im.size
    if min(w, h) > MAX_SHORT_SIDE_PX:
        scale = MAX_SHORT_SIDE_PX / min(w, h)
        size = (MAX_SHORT_SIDE_PX, round(h * scale)) if w <= h else (round(w * scale), MAX_SHORT_SIDE_PX)
        im = im.resize(size, Image.Resampling.LANCZOS)
    return np.array(im, dtype=np.uint8)  # a writable copy, as arrays from scikit-image and .npz files are


def _cap_array(image: np.ndarray) -> np.ndarray:
    """Return the HxWx3 uint8 array, downscaled like a decoded file when its short side exceeds 512 px."""
    return _cap_size(Image.fromarray(image)) if min(image.shape[:2]) > MAX_SHORT_SIDE_PX else image


def _read_npz(path: Path, max_images: int | None) -> tuple[list[np.ndarray], list[int] | None, list[str] | None, list[str]]:
    hint = "save uint8 'images' (N,H,W,3) or (N,H,W), optional int 'labels' (N,) and str 'class_names' with np.savez"
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"cannot read {path} as an .npz archive ({str(e)[:100]})", hint=hint) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path} is a single .npy array, not an .npz archive", hint=hint)
    with archive:
        if "images" not in archive.files:
            raise DataError(f"{path} has no array 'images' (arrays: {archive.files})", hint=hint)
        arrays = {}
        for key in ("images", "labels", "class_names"):
            if key in archive.files:
                try:
                    arrays[key] = archive[key]
                except ValueError:  # object arrays: loading them would mean unpickling
                    raise DataError(f"array '{key}' in {path} holds Python objects, which load only by unpickling",
                                    hint=hint) from None
    images = arrays["images"]
    if images.dtype != np.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
        raise DataError(f"'images' in {path} is {images.dtype} {images.shape}, not uint8 (N,H,W,3) or (N,H,W)", hint=hint)
    if images.ndim == 3:
        images = np.repeat(images[..., None], 3, axis=-1)
    n = len(images)
    labels = class_names = None
    if "labels" in arrays:
        raw = arrays["labels"]
        if raw.dtype.kind not in "iu" or raw.shape != (n,):
            raise DataError(f"'labels' in {path} is {raw.dtype} {raw.shape}; the {n} images need int labels ({n},)",
                            hint=hint)
        labels = [int(v) for v in raw]
    if "class_names" in arrays:
        raw = arrays["class_names"]
        if raw.dtype.kind not in "US" or raw.ndim != 1:
            raise DataError(f"'class_names' in {path} is {raw.dtype} {raw.shape}, not a 1-D str array", hint=hint)
        class_names = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in raw.tolist()]
    if labels and not all(0 <= v < (len(class_names) if class_names else np.inf) for v in labels):
        known = f" of {len(class_names)} class names" if class_names else ""
        raise DataError(f"'labels' in {path} range {min(labels)}..{max(labels)}, not class ids{known}", hint=hint)
    keep = n if max_images is None else min(n, max_images)
    out = [_cap_array(images[i]) for i in range(keep)]
    return out, labels[:keep] if labels is not None else None, class_names, [f"npz[{i}]" for i in range(keep)]


def _builtin_photos(max_images: int | None) -> tuple[list[np.ndarray], list[str]]:
    """Return the natural photos on this machine: scikit-image's (if installed), Plasma's photo wallpapers, the
    photographs of PHOTO_FILES, scikit-learn's two sample photos (if installed), then GCompris' (if installed)."""
    images, names = [], []
    try:
        import skimage.data
    except ImportError:
        skimage = None
    for name in SKIMAGE_PHOTOS if skimage is not None else ():
        try:
            photo = getattr(skimage.data, name)()
        except (OSError, ModuleNotFoundError, KeyError, ValueError):  # a file missing from the wheel needs pooch
            continue
        photo = photo[0] if name == "stereo_motorcycle" else photo  # (left, right, disparity)
        images.append(_cap_array(photo))
        names.append(f"skimage.data.{name}")
    for name in PLASMA_PHOTOS:
        best = _largest_landscape(PLASMA_WALLPAPERS_DIR / name / "contents" / "images")
        if best is not None:
            images.append(decode_image(best))
            names.append(str(best))
    for _package, folder, files in PHOTO_FILES:
        for name in files:
            if (folder / name).is_file():
                images.append(decode_image(folder / name))
                names.append(str(folder / name))
    try:
        import sklearn.datasets
    except ImportError:
        sklearn = None
    if sklearn is not None:
        folder = Path(sklearn.datasets.__file__).parent / "images"
        for name in ("china.jpg", "flower.jpg"):
            if (folder / name).is_file():
                images.append(decode_image(folder / name))
                names.append(f"sklearn.datasets.load_sample_images:{name}")
    for bundle, folder in GCOMPRIS_PHOTOS:
        if (GCOMPRIS_RCC_DIR / bundle).is_file():
            files = read_rcc(GCOMPRIS_RCC_DIR / bundle, prefix=f"/gcompris/src/activities/{folder}/")
            for name, data in files.items():
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    images.append(decode_image(GCOMPRIS_RCC_DIR / bundle / name.lstrip("/"), data))
                    names.append(f"{GCOMPRIS_RCC_DIR / bundle}:{name}")
    if not images:
        raise DataError("no built-in photos found on this machine",
                        hint="pip install scikit-image (or apt-get install plasma-workspace-wallpapers), or pass --data")
    return images[:max_images], names[:max_images]


def _largest_landscape(folder: Path) -> Path | None:
    sizes = {}
    for p in sorted(folder.glob("*")) if folder.is_dir() else ():
        if _is_image_file(p) and not p.is_symlink():  # Debian links the smaller sizes to the one real file
            try:
                with Image.open(p) as im:  # reads the header only
                    sizes[p] = im.size
            except OSError:
                continue
    return max(sizes, key=lambda p: (sizes[p][0] >= sizes[p][1], sizes[p][0] * sizes[p][1]), default=None)


DEFAULT_CROP_SCALE = 0.25  # the smallest share of an image a random training crop covers (torchvision's is 0.08)


def eval_resize(size: int, resize_px: int | None = None) -> int:
    """Return the short side held-out images are resized to before the center crop: ImageNet's 256 for 224."""
    return resize_px if resize_px is not None else round(size * 256 / 224)


def to_pixels(views: np.ndarray) -> torch.Tensor:
    """Return uint8 views (N, 3, H, W) as the float [0, 1] pixels every model here takes."""
    return torch.from_numpy(np.asarray(views)).float() / 255.0


def make_views(images: list[np.ndarray], views_per_image: int, size: int, seed: int, train: bool,
               crop_scale: float = DEFAULT_CROP_SCALE, resize_px: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (uint8 (M, 3, size, size) views, the source image index of each view).

    train: `views_per_image` random views per image (torchvision's RandomResizedCrop(scale crop_scale-1, ratio
    3/4-4/3), horizontal flip p 0.5, brightness/contrast/saturation jitter 0.8-1.2); image i's views depend only on
    (seed, i). Eval: one view per image, short side resized to `eval_resize(size, resize_px)`, center crop `size`.
    """
    per = views_per_image if train else 1
    views = np.empty((len(images) * per, 3, size, size), dtype=np.uint8)
    index = np.repeat(np.arange(len(images)), per)
    for i, array in enumerate(images):
        im = Image.fromarray(array)
        rng = np.random.default_rng((seed, i))
        for k in range(per):
            if train:
                top, left, h, w = _random_resized_crop(rng, im.height, im.width, (crop_scale, 1.0))
                view = im.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
                if rng.random() < 0.5:
                    view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                # PIL's enhancers are what torchvision's ColorJitter applies to PIL images
                for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
                    view = enhancer(view).enhance(rng.uniform(0.8, 1.2))
            else:
                view = _resize_center_crop(im, eval_resize(size, resize_px), size)
            views[i * per + k] = np.asarray(view, dtype=np.uint8).transpose(2, 0, 1)
    return views, index


def _random_resized_crop(rng: np.random.Generator, height: int, width: int, scale: tuple[float, float] = (0.25, 1.0),
                         ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """Return (top, left, h, w) as torchvision's RandomResizedCrop.get_params does, drawn from `rng`."""
    area = height * width
    log_ratio = (np.log(ratio[0]), np.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(*log_ratio))
        w = int(round(np.sqrt(target_area * aspect)))
        h = int(round(np.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _resize_center_crop(im, short_px: int, crop_px: int):
    """Return torchvision's Resize(short_px) (bilinear, antialiased) then CenterCrop(crop_px) of a PIL image."""
    w, h = im.size
    size = (short_px, int(short_px * h / w)) if w <= h else (int(short_px * w / h), short_px)
    im = im.resize(size, Image.Resampling.BILINEAR)
    left, top = int(round((size[0] - crop_px) / 2)), int(round((size[1] - crop_px) / 2))
    return im.crop((left, top, left + crop_px, top + crop_px))


def mixup(x: torch.Tensor, alpha: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Return (lam * x + (1 - lam) * x[perm], perm, lam) with lam ~ Beta(alpha, alpha), all drawn from `generator`."""
    perm = torch.randperm(x.shape[0], generator=generator, device=generator.device).to(x.device)
    # torch's Beta sampler takes no generator: seed numpy's from it, so `generator` alone fixes lam
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    return x * lam + x[perm] * (1.0 - lam), perm, lam
