"""Image listing, loading and LlamaGen-style preprocessing, without torchvision.

Faithfulness notes (checked against FoundationVision/LlamaGen@5a50452 and torchvision):
- Listing follows torchvision's ImageFolder (LlamaGen's `build_imagenet` is `ImageFolder(data_path)`):
  class folders sorted by name -> label index; files found by a sorted `os.walk(followlinks=True)` inside
  each class, names sorted as strings, extension test case-insensitive against torchvision's IMG_EXTENSIONS.
- Loading follows torchvision's `pil_loader`: `Image.open(f).convert("RGB")`. RGBA/LA/P-with-transparency
  are therefore *converted, not composited*: the alpha channel is dropped and the stored colour kept. No
  EXIF rotation is applied (torchvision does not either). 16-bit grey / 32-bit int / float modes are rescaled
  to 8 bits first, because PIL's `convert("RGB")` would clip them to 255.
- `center_crop_arr` is ADM's (LlamaGen dataset/augmentation.py): halve with BOX while the short side is
  >= 2*size, BICUBIC-resize so the short side equals `size` (rounding both sides), then crop the centre with
  offsets (h - size) // 2, (w - size) // 2.
- Ten-crop (LlamaGen autoregressive/train/extract_codes_c2i.py, `--ten-crop`): `center_crop_arr` to
  `int(image_size * crop_range)` (crop_range 1.1 by default; LlamaGen also keeps a 1.05 variant), then
  torchvision `TenCrop(image_size)` = five crops (tl, tr, bl, br, centre) of the image followed by the same
  five crops of its horizontal mirror. The centre crop uses torchvision's `int(round((H - h) / 2))`
  (Python's round-half-to-even). So ten-crop already contains flips: 10 views per image.
- Without ten-crop LlamaGen always stores the image and its horizontal flip (2 views). Here the flip is the
  `flip` option: 1 view without it, 2 with it; with ten-crop it adds nothing (flips are already included).
- Tensors: ToTensor + Normalize(0.5, 0.5) = (uint8 / 255 - 0.5) / 0.5 in float32, [3, H, W] in [-1, 1].
"""

from __future__ import annotations

import os
import numpy as np
import torch
from PIL import Image

from dpar_scale.errors import MissingFileError

__all__ = [
    "IMG_EXTENSIONS", "list_image_folder", "load_rgb", "center_crop_arr", "five_crop", "ten_crop",
    "pil_to_tensor", "view_names", "make_views", "ImageViews",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

FIVE_CROP_NAMES = ("tl", "tr", "bl", "br", "center")


def _is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def list_image_folder(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, samples) of an ImageNet-layout folder, in torchvision ImageFolder order.

    samples are (absolute path, label). Raises FileNotFoundError if `root` is missing or has no class
    folders. A class folder without images keeps its label (so labels stay aligned with the folder list);
    callers decide whether an empty sample list is an error.
    """
    if not os.path.isdir(root):
        raise MissingFileError(f"image folder {root!r} does not exist or is not a directory")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise MissingFileError(
            f"no class folders in {root!r}: expected an ImageFolder layout {root}/<class_name>/<image>")
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        cdir = os.path.abspath(os.path.join(root, name))
        for dirpath, _dirs, files in sorted(os.walk(cdir, followlinks=True)):
            for fname in sorted(files):
                if _is_image_file(fname):
                    samples.append((os.path.join(dirpath, fname), label))
    return classes, samples


def _to_8bit_rgb(img: Image.Image) -> Image.Image:
    """RGB for any PIL mode; high-bit-depth single-channel modes are rescaled rather than clipped."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0  # 0..65535 -> 0..255
        elif mode == "I":
            if arr.max(initial=0) > 255:  # 16-bit PNGs open as "I" in some Pillow versions
                arr = arr / 257.0
        else:  # "F": floats; treat <= 1 as unit range
            if arr.max(initial=0) <= 1.0:
                arr = arr * 255.0
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "RGB":
        return img
    return img.convert("RGB")  # RGBA/LA/P/L/1/CMYK/YCbCr/LAB/HSV: PIL's own conversion, alpha dropped


def load_rgb(path: str) -> Image.Image:
    """Decode an image file fully (so truncation raises here) and return it as 8-bit RGB."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
        out = _to_8bit_rgb(img)
    if out.width < 1 or out.height < 1:
        raise ValueError(f"image has zero size {out.size}")
    return out


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM/LlamaGen centre crop: BOX halving, BICUBIC resize of the short side, centre crop."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size])


def five_crop(img: Image.Image, size: int) -> list[Image.Image]:
    """torchvision five_crop order: top-left, top-right, bottom-left, bottom-right, centre."""
    w, h = img.size
    if size > w or size > h:
        raise ValueError(f"crop size {size} is bigger than the image {h}x{w}")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    boxes = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), (top, left)]
    return [img.crop((x, y, x + size, y + size)) for y, x in boxes]


def ten_crop(img: Image.Image, size: int) -> list[Image.Image]:
    """torchvision TenCrop: five crops of the image, then five crops of its horizontal mirror."""
    return five_crop(img, size) + five_crop(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), size)


_ten_crop = ten_crop  # make_views' `ten_crop` flag shadows the function name


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 RGB -> float32 [3, H, W] in [-1, 1], bit-identical to ToTensor() + Normalize(0.5, 0.5)."""
    arr = np.asarray(img, dtype=np.uint8)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255)
    return t.sub_(0.5).div_(0.5)


def view_names(ten_crop: bool, flip: bool) -> list[str]:
    """Names of the augmented views in storage order (the augmentation index is the position here)."""
    if ten_crop:
        return list(FIVE_CROP_NAMES) + [f"{n}_flip" for n in FIVE_CROP_NAMES]
    return ["center", "center_flip"] if flip else ["center"]


def make_views(img: Image.Image, image_size: int, ten_crop: bool = False, flip: bool = False,
               crop_range: float = 1.1) -> torch.Tensor:
    """All augmented views of one RGB image as float [V, 3, image_size, image_size] in [-1, 1]."""
    if ten_crop:
        crop_size = int(image_size * crop_range)  # LlamaGen: int(args.image_size * args.crop_range)
        views = _ten_crop(center_crop_arr(img, crop_size), image_size)
    else:
        base = center_crop_arr(img, image_size)
        views = [base] + ([base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)] if flip else [])
    return torch.stack([pil_to_tensor(v) for v in views])


class ImageViews(torch.utils.data.Dataset):
    """Dataset over (path, label) samples returning preprocessed views; bad files become error records.

    Item i -> dict(index=i, label=..., path=..., views=Tensor[V,3,S,S] or None, error=str or None), so a
    DataLoader (with any number of workers) never dies on one unreadable file.
    """

    def __init__(self, samples: list[tuple[str, int]], image_size: int, ten_crop: bool = False,
                 flip: bool = False, crop_range: float = 1.1):
        self.samples = samples
        self.image_size, self.ten_crop, self.flip, self.crop_range = image_size, ten_crop, flip, crop_range

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        path, label = self.samples[i]
        try:
            views = make_views(load_rgb(path), self.image_size, self.ten_crop, self.flip, self.crop_range)
            return {"index": i, "label": label, "path": path, "views": views, "error": None}
        except Exception as e:  # noqa: BLE001 - any decode failure is reported and the file skipped
            return {"index": i, "label": label, "path": path, "views": None,
                    "error": f"{type(e).__name__}: {e}"}

