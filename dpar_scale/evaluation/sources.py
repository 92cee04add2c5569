"""Where evaluation images come from: an ADM-layout npz, an in-memory array, or an ImageFolder.

Every source is a sequence of uint8 RGB images [N, H, W, 3] read by row ranges (`read(start, stop)`), so a 50k x
256 x 256 x 3 file (9.8 GB) is never loaded whole and ranks can read disjoint batches of it.

* npz (`arr_0` uint8 [N, H, W, 3], optional `labels` int [N], optional precomputed FID `mu` [F] / `sigma` [F, F]
  as in ADM's reference batches): an uncompressed member (np.savez) is memory-mapped in place; a compressed one
  (np.savez_compressed) is streamed from the zip.
* ImageFolder (DIR/<class>/<image>, torchvision order): each image is decoded to RGB and brought to the samples'
  size with ADM's `center_crop_arr` (BOX halving, BICUBIC resize of the short side, centre crop), the crop ADM's
  reference batches were made with. Images already at that size pass unchanged.
"""
from __future__ import annotations

import hashlib
import os
import struct
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from dpar_scale.data.images import center_crop_arr, list_image_folder, load_rgb
from dpar_scale.errors import DparError

__all__ = ["ArrayImages", "EvaluationError", "FolderImages", "ImageSource", "NpzImages", "open_images"]

ADM_LAYOUT = "uint8 [N, H, W, 3] under the key arr_0 (np.savez(path, arr_0=images, labels=labels))"


class EvaluationError(DparError, ValueError):
    """Bad evaluation input (a file, an array, a detector): the message names it and says how to fix it."""


class ImageSource:
    """uint8 RGB images [N, H, W, 3], read by row ranges."""

    name: str = "images"
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        raise NotImplementedError

    def read(self, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def fingerprint(self) -> dict | None:
        """What identifies this source's content for a cache (None: not cacheable)."""
        return None

    def precomputed_fid_stats(self) -> tuple[np.ndarray, np.ndarray] | None:
        return None


def _check_images(name: str, shape: tuple, dtype: np.dtype, what: str) -> None:
    if np.dtype(dtype) != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        fix = (" Convert float images in [0, 1] with np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)."
               if np.dtype(dtype).kind == "f" else "")
        raise EvaluationError(f"{name}: images are {np.dtype(dtype)} {list(shape)}; {what} must hold {ADM_LAYOUT}."
                              f"{fix}")
    if shape[0] < 2:
        raise EvaluationError(f"{name}: holds {shape[0]} image(s); FID needs at least 2 (a covariance over N-1)")


def _check_labels(name: str, labels: np.ndarray, n: int) -> np.ndarray:
    if labels.ndim != 1 or labels.shape[0] != n or labels.dtype.kind not in "iu":
        raise EvaluationError(f"{name}: labels are {labels.dtype} {list(labels.shape)}; expected integers [{n}], "
                              f"one class index per image of arr_0")
    return labels.astype(np.int64)


class ArrayImages(ImageSource):
    """An in-memory uint8 array [N, H, W, 3] (numpy or a CPU tensor)."""

    def __init__(self, images, labels=None, name: str = "the image array"):
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        images = np.asarray(images)
        _check_images(name, images.shape, images.dtype, "an image array")
        self.images, self.name = images, name
        self.labels = None if labels is None else _check_labels(name, np.asarray(labels), images.shape[0])

    @property
    def shape(self):
        return tuple(self.images.shape)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.images[start:stop]


class NpzImages(ImageSource):
    """`arr_0` of an npz file, memory-mapped when stored uncompressed, streamed otherwise."""

    def __init__(self, path: str | os.PathLike):
        self.path = self.name = str(path)
        if not os.path.isfile(self.path):
            raise EvaluationError(f"{self.path}: no such file; give an npz holding {ADM_LAYOUT}")
        try:
            with zipfile.ZipFile(self.path) as zf:
                members = zf.namelist()
                if "arr_0.npy" not in members:
                    keys = ", ".join(m[:-4] for m in members if m.endswith(".npy")) or "nothing"
                    raise EvaluationError(f"{self.path}: no arr_0 in this npz (it holds {keys}); the ADM layout "
                                          f"stores the images as {ADM_LAYOUT}")
                info = zf.getinfo("arr_0.npy")
                with zf.open(info) as f:
                    self._shape, fortran, self._dtype, header_len = _read_npy_header(f, self.path)
                _check_images(self.path, self._shape, self._dtype, "arr_0")
                self._mmap = None
                if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 1 and not fortran:
                    self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r", shape=self._shape,
                                           offset=_member_data_offset(self.path, info) + header_len)
                elif fortran:
                    raise EvaluationError(f"{self.path}: arr_0 is stored in Fortran order; save it C-contiguous "
                                          f"(np.ascontiguousarray) in {ADM_LAYOUT}")
                self.labels = None
                if "labels.npy" in members:
                    with zf.open("labels.npy") as f:
                        self.labels = _check_labels(self.path, np.load(f), self._shape[0])
                self._stats = None
                if "mu.npy" in members and "sigma.npy" in members:
                    with zf.open("mu.npy") as f_mu, zf.open("sigma.npy") as f_sigma:
                        mu, sigma = np.load(f_mu).astype(np.float64), np.load(f_sigma).astype(np.float64)
                    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
                        raise EvaluationError(f"{self.path}: precomputed mu {list(mu.shape)} / sigma "
                                              f"{list(sigma.shape)} do not fit together; expected [F] and [F, F]")
                    self._stats = (mu, sigma)
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
            if isinstance(e, EvaluationError):
                raise
            raise EvaluationError(f"{self.path}: not a readable npz file ({type(e).__name__}: {e}); it may be "
                                  f"truncated or corrupt: write it again with np.savez") from None
        self._stream = None  # (open ZipFile, open member, next row) for compressed members

    @property
    def shape(self):
        return tuple(self._shape)

    def read(self, start: int, stop: int) -> np.ndarray:
        stop = min(stop, self._shape[0])
        if self._mmap is not None:
            return np.array(self._mmap[start:stop])  # a writable copy (torch warns on read-only arrays)
        return self._read_streamed(start, stop)

    def _read_streamed(self, start: int, stop: int) -> np.ndarray:
        row_bytes = int(np.prod(self._shape[1:]))
        if self._stream is None or self._stream[2] > start:  # (re)open and skip to `start`
            self.close()
            zf = zipfile.ZipFile(self.path)
            member = zf.open("arr_0.npy")
            _read_npy_header(member, self.path)
            self._stream = [zf, member, 0]
        zf, member, row = self._stream
        while row < start:  # skip forward in bounded pieces
            n = min(start - row, max(1, (64 << 20) // row_bytes))
            member.read(n * row_bytes)
            row += n
        data = member.read((stop - start) * row_bytes)
        if len(data) != (stop - start) * row_bytes:
            raise EvaluationError(f"{self.path}: arr_0 ends early (rows {start}..{stop} of {self._shape[0]}); the "
                                  f"file is truncated: write it again")
        self._stream[2] = stop
        return np.frombuffer(bytearray(data), dtype=np.uint8).reshape(stop - start, *self._shape[1:])

    def close(self) -> None:
        if self._stream is not None:
            self._stream[1].close()
            self._stream[0].close()
            self._stream = None

    def fingerprint(self) -> dict:
        st = os.stat(self.path)
        return {"kind": "npz", "path": os.path.abspath(self.path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
                "shape": list(self._shape)}

    def precomputed_fid_stats(self):
        return self._stats


def _read_npy_header(f, path: str) -> tuple[tuple, bool, np.dtype, int]:
    """(shape, fortran_order, dtype, header length in bytes) of the .npy stream `f`, left at the data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise EvaluationError(f"{path}: arr_0 uses .npy format version {version}; save it with np.savez "
                              f"(format 1.0 / 2.0)")
    return tuple(shape), fortran, dtype, f.tell()


def _member_data_offset(path: str, info: zipfile.ZipInfo) -> int:
    """Byte offset in the file where a stored zip member's data starts (after its local header)."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise EvaluationError(f"{path}: broken zip local header for {info.filename}: write the file again")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


class FolderImages(ImageSource):
    """An ImageFolder (DIR/<class>/<image>), each image centre-cropped to `image_size` as ADM's references were."""

    def __init__(self, root: str | os.PathLike, image_size: int, num_threads: int = 8):
        self.root = self.name = str(root)
        try:
            classes, samples = list_image_folder(self.root)
        except FileNotFoundError as e:
            raise EvaluationError(str(e)) from None
        if len(samples) < 2:
            raise EvaluationError(f"{self.root}: {len(samples)} image(s) under its class folders; FID needs at "
                                  f"least 2")
        self.classes, self.samples, self.image_size = classes, samples, int(image_size)
        self.labels = np.array([label for _, label in samples], dtype=np.int64)
        self.num_threads = num_threads

    @property
    def shape(self):
        return (len(self.samples), self.image_size, self.image_size, 3)

    def _load(self, path: str) -> np.ndarray:
        try:
            return np.asarray(center_crop_arr(load_rgb(path), self.image_size), dtype=np.uint8)
        except Exception as e:  # noqa: BLE001 - any decode failure is the user's file to fix
            raise EvaluationError(f"{path}: cannot read this reference image ({type(e).__name__}: {e}); remove or "
                                  f"replace it") from None

    def read(self, start: int, stop: int) -> np.ndarray:
        paths = [p for p, _ in self.samples[start:stop]]
        with ThreadPoolExecutor(min(self.num_threads, max(1, len(paths)))) as pool:
            return np.stack(list(pool.map(self._load, paths)))

    def fingerprint(self) -> dict:
        listing = hashlib.sha256()
        for path, label in self.samples:
            st = os.stat(path)
            listing.update(f"{os.path.relpath(path, self.root)}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return {"kind": "folder", "path": os.path.abspath(self.root), "num_images": len(self.samples),
                "listing_sha256": listing.hexdigest(), "image_size": self.image_size, "crop": "adm_center_crop"}


def open_images(obj, image_size: int | None = None, what: str = "images") -> ImageSource:
    """An ImageSource for a path (npz file or ImageFolder), an array / tensor, or an ImageSource (returned as is).

    `image_size` is needed for an ImageFolder only (the size its images are centre-cropped to)."""
    if isinstance(obj, ImageSource):
        return obj
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return ArrayImages(obj, name=f"the {what} array")
    path = Path(obj)
    if path.is_dir():
        if image_size is None:
            raise EvaluationError(f"{path}: an ImageFolder needs the image size to crop to (that of the samples)")
        return FolderImages(path, image_size)
    if not path.exists():
        raise EvaluationError(f"{path}: no such file or folder; the {what} must be an npz holding {ADM_LAYOUT}"
                              + (" or an ImageFolder (DIR/<class>/<image>)" if what == "reference" else ""))
    return NpzImages(path)
