"""The embedded evaluator: a small conv classifier of the dataset's own real images (no Inception on a laptop).

Its penultimate features are what FID-domain, precision and recall compare (`fid_domain`, never `fid`), its class
head gives class accuracy (is a sample of class c recognised as c), and its attribute heads (by default `shape`
and `colour`, read from the dataset's attributes.jsonl) let text-conditioned models report per-attribute accuracy.
tools/fit_evaluator.py fits one (`domain_fit.fit_domain_classifier`).

File format (a plain `torch.save`, loadable with `torch.load(..., weights_only=True)`):
    {"format": "dpar-domain-classifier", "version": 1, "state_dict": {name: tensor}, "meta": {...}}
meta (JSON-able): heads {head: [value names, index order]} ("class" first: the ImageFolder class folders),
image_size (inputs of another size are resized to it, bilinear with antialias), width, feature_dim,
held_out_accuracy {head: fraction}, num_train / num_held_out, data (the images folder's fingerprint and
classes.json identity), fit settings and seconds.

API: `load_domain_classifier(path)` -> DomainClassifier (eval mode, `.meta`); `model(images)` -> (features,
class logits) (the detector interface); `model.head_logits(images)` -> {head: logits}; `predict(model, images)`
-> {head: int64 [N] predictions}; `head_accuracy(predictions, targets)` -> {head: fraction}.
"""
from __future__ import annotations

import os
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .sources import EvaluationError

__all__ = ["FORMAT", "FIT_HINT", "DomainClassifier", "head_accuracy", "is_domain_classifier_file",
           "load_domain_classifier", "predict", "save_domain_classifier"]

FORMAT, VERSION = "dpar-domain-classifier", 1
FIT_HINT = ("fit one on the dataset's real images with `python tools/fit_evaluator.py --images DIR --out PATH` "
            "(DIR: the ImageFolder tools/make_dataset.py wrote) and pass --features domain:PATH")


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class DomainClassifier(nn.Module):
    """uint8 RGB [B, 3, H, W] -> (penultimate features [B, F], class logits [B, C]); one linear head per entry of
    `heads` ({name: number of values}; "class" must be one of them)."""

    def __init__(self, heads: dict[str, int], image_size: int, width: int = 32, meta: dict | None = None):
        super().__init__()
        if "class" not in heads:
            raise ValueError("a domain classifier needs a 'class' head")
        self.image_size, self.width = int(image_size), int(width)
        w = self.width
        # two conv stages with max pooling, then one at a quarter of the size and a global average: the objects are
        # large and centred, so a shallow net sees a whole one; BatchNorm (eval mode at evaluation: a sample's
        # features do not depend on its batch) makes a 2-minute CPU fit converge
        self.body = nn.Sequential(*_block(3, w), *_block(w, w), nn.MaxPool2d(2), *_block(w, 2 * w),
                                  *_block(2 * w, 2 * w), nn.MaxPool2d(2), *_block(2 * w, 4 * w))
        self.feature_dim = 4 * w
        self.project = nn.Sequential(nn.Linear(8 * w, 4 * w), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(4 * w, int(n)) for name, n in heads.items()})
        self.meta = dict(meta or {})

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> normalised float at the model's size (resized when the size differs)."""
        x = images.to(self.heads["class"].weight.device, torch.float32) / 255.0
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return (x - 0.5) / 0.25

    def features(self, images: torch.Tensor) -> torch.Tensor:
        # average and max over positions: the max keeps a small local cue (a corner, a dot) that the average of a
        # large flat object dilutes
        z = self.body(self.prepare(images))
        return self.project(torch.cat([z.mean((2, 3)), z.amax((2, 3))], 1))

    def head_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(images)
        return {name: head(f) for name, head in self.heads.items()}

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(images)
        return f, self.heads["class"](f)


def save_domain_classifier(path: str | os.PathLike, model: DomainClassifier, meta: dict) -> None:
    """Writes the plain-file format (atomically: a crash leaves no half-written evaluator)."""
    heads = {name: int(h.out_features) for name, h in model.heads.items()}
    meta = {**meta, "image_size": model.image_size, "width": model.width, "feature_dim": model.feature_dim,
            "head_sizes": heads}
    payload = {"format": FORMAT, "version": VERSION,
               "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
               "meta": meta}
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, path)
    model.meta = meta


def is_domain_classifier_file(path: str) -> bool:
    """Whether `path` is a torch.save zip (this module's format) rather than a TorchScript archive (which the
    domain detector also accepts: forward(img) -> (features, logits))."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return not any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def load_domain_classifier(path: str | os.PathLike, device: torch.device | str = "cpu") -> DomainClassifier:
    """The classifier saved at `path`, in eval mode on `device`, with `.meta`; EvaluationError naming the fix when
    the file is missing, damaged or not an evaluator."""
    path = str(path)
    if not os.path.isfile(path):
        raise EvaluationError(f"{path}: evaluator file not found; {FIT_HINT}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever torch.load raises, the file is not a usable evaluator
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise EvaluationError(f"{path}: cannot read this evaluator file ({first[:160]}); it is damaged or not an "
                              f"evaluator: {FIT_HINT}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise EvaluationError(f"{path}: not a domain-classifier file (no format {FORMAT!r}); {FIT_HINT}")
    if payload.get("version") != VERSION:
        raise EvaluationError(f"{path}: evaluator format version {payload.get('version')}, this code reads "
                              f"{VERSION}; {FIT_HINT}")
    meta = payload["meta"]
    try:
        model = DomainClassifier(meta["head_sizes"], meta["image_size"], meta["width"], meta=meta)
        model.load_state_dict(payload["state_dict"])
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise EvaluationError(f"{path}: the evaluator's weights do not match its description "
                              f"({str(e).splitlines()[0][:160]}); {FIT_HINT}") from None
    return model.to(device).eval()


@torch.no_grad()
def predict(model: DomainClassifier | str, images, batch_size: int = 256,
            device: torch.device | str | None = None) -> dict[str, np.ndarray]:
    """{head: int64 [N] predicted value index} for uint8 images [N, H, W, 3] (numpy, as in samples.npz) or
    [N, 3, H, W] (tensor); `model.meta["heads"][head]` names the values."""
    if not isinstance(model, DomainClassifier):
        model = load_domain_classifier(model, device or "cpu")
    model.eval()
    x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise EvaluationError(f"predict needs uint8 images [N, H, W, 3] or [N, 3, H, W]; got {x.dtype} "
                              f"{list(x.shape)}")
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    out: dict[str, list] = {name: [] for name in model.heads}
    for i in range(0, x.shape[0], batch_size):
        for name, logits in model.head_logits(x[i:i + batch_size].contiguous()).items():
            out[name].append(logits.argmax(1).cpu())
    return {name: (torch.cat(v) if v else torch.zeros(0, dtype=torch.long)).numpy() for name, v in out.items()}


def head_accuracy(predictions: dict[str, np.ndarray], targets: dict[str, np.ndarray]) -> dict[str, float]:
    """{head: fraction of rows predicted as their target} for the heads present in both."""
    out = {}
    for name in predictions:
        if name in targets:
            p, t = np.asarray(predictions[name]), np.asarray(targets[name])
            if p.shape != t.shape:
                raise EvaluationError(f"head {name}: {p.shape[0]} predictions for {t.shape[0]} targets")
            out[name] = float((p == t).mean()) if len(t) else float("nan")
    return out
