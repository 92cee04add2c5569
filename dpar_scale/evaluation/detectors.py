"""Feature detectors: what maps images to the features FID / precision / recall compare, and to class probabilities.

A detector takes uint8 RGB images [B, 3, H, W] at their stored size and returns (features [B, F] float32,
probabilities [B, C] float32 or None). Two kinds, chosen by a spec string:

* `inception:PATH`: the TorchScript port of the TF Inception graph ADM's evaluator uses, `inception-2015-12-05.pt`
  (the file StyleGAN2-ADA's metrics and clean-fid load with torch.jit.load). Its
  `forward(img, return_features=False, use_fp16=False, no_output_bias=False)` resizes internally;
  `return_features=True` gives the 2048-d pool features (FID, precision/recall), `no_output_bias=True` the softmax
  of the 1008 logits without the output bias (ADM's Inception Score). Probabilities take a second forward pass.
* `domain:PATH`: a classifier trained on the dataset's own real images (no Inception exists for it). Its FID is
  reported as `fid_domain`, and its predictions give class accuracy. The file is the embedded evaluator
  tools/fit_evaluator.py writes (`domain_classifier`: a plain torch.save, read with weights_only=True), or any
  TorchScript module whose `forward(img)` returns (features [B, F], logits [B, C]).

Files are only ever read from the path the user gives; nothing is downloaded.
"""
from __future__ import annotations

import os
import warnings

import torch

from dpar_scale.data.shards import sha256_file

from .domain_classifier import FIT_HINT, is_domain_classifier_file, load_domain_classifier
from .sources import EvaluationError

__all__ = ["DETECTOR_KINDS", "DomainDetector", "FeatureDetector", "InceptionDetector", "load_detector",
           "parse_detector_spec"]

DETECTOR_KINDS = ("inception", "domain")
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_HINT = (f"download {INCEPTION_FILE} yourself (StyleGAN2-ADA's metrics detector, {INCEPTION_URL}; clean-fid "
                  f"uses the same file) and pass its local path with --inception PATH; this project never downloads "
                  f"it")
DOMAIN_HINT = FIT_HINT
_INCEPTION_ARGS = ("img", "return_features", "use_fp16", "no_output_bias")
_NEEDED_KEYWORDS = ("return_features", "no_output_bias")  # what we pass by name; the image goes by position


class FeatureDetector:
    """uint8 [B, 3, H, W] -> (features [B, F] float32, probabilities [B, C] float32 or None)."""

    kind: str = ""
    fid_key: str = "fid"  # the result key of the Fréchet distance in this detector's feature space

    def __init__(self, module, path: str):
        self.module, self.path = module, str(path)
        self.sha256 = sha256_file(self.path) if os.path.isfile(self.path) else ""
        self.feature_dim: int | None = None
        self.num_classes: int | None = None

    def to(self, device: torch.device | str) -> "FeatureDetector":
        self.module = self.module.to(device)
        return self

    def __call__(self, images: torch.Tensor, need_probs: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise EvaluationError(f"detector input must be uint8 [B, 3, H, W]; got {images.dtype} "
                                  f"{list(images.shape)}")
        with torch.no_grad():
            features, probs = self._forward(images, need_probs)
        self.feature_dim = self._checked(features, images.shape[0], "features")
        if probs is not None:
            self.num_classes = self._checked(probs, images.shape[0], "probabilities")
        return features.float(), None if probs is None else probs.float()

    def _forward(self, images, need_probs):
        raise NotImplementedError

    def _checked(self, out, batch: int, what: str) -> int:
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != batch or not out.is_floating_point():
            got = f"{out.dtype} {list(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise EvaluationError(f"{self.path}: the detector's {what} are {got} for a batch of {batch}; expected "
                                  f"floats [{batch}, dim]. {self._hint}")
        return int(out.shape[1])

    @property
    def _hint(self) -> str:
        return INCEPTION_HINT if self.kind == "inception" else DOMAIN_HINT

    def describe(self) -> dict:
        return {"kind": self.kind, "path": os.path.abspath(self.path), "sha256": self.sha256,
                "feature_dim": self.feature_dim, "num_classes": self.num_classes}


class InceptionDetector(FeatureDetector):
    kind, fid_key = "inception", "fid"

    def _forward(self, images, need_probs):
        features = self.module(images, return_features=True)
        if not need_probs:
            return features, None
        probs = self.module(images, no_output_bias=True)
        if isinstance(probs, torch.Tensor) and probs.ndim == 2:
            sums = probs.double().sum(1)
            if probs.min() < 0 or not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
                raise EvaluationError(f"{self.path}: forward(img, no_output_bias=True) does not return probabilities "
                                      f"(rows sum to {sums.min().item():.4g}..{sums.max().item():.4g}); "
                                      f"{INCEPTION_HINT}")
        return features, probs


class DomainDetector(FeatureDetector):
    kind, fid_key = "domain", "fid_domain"

    def _forward(self, images, need_probs):
        out = self.module(images)
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise EvaluationError(f"{self.path}: a domain detector's forward(img) must return (features [B, F], "
                                  f"logits [B, C]); got {type(out).__name__}. {DOMAIN_HINT}")
        features, logits = out
        if not need_probs:
            return features, None
        self._checked(logits, images.shape[0], "logits")
        return features, torch.softmax(logits.float(), dim=1)


def parse_detector_spec(spec: str) -> tuple[str, str]:
    """'inception:PATH' or 'domain:PATH' -> (kind, path)."""
    kind, sep, path = str(spec).partition(":")
    if not sep or kind not in DETECTOR_KINDS or not path:
        raise EvaluationError(f"detector {spec!r}: expected KIND:PATH with KIND one of {', '.join(DETECTOR_KINDS)} "
                              f"(e.g. inception:/models/{INCEPTION_FILE} or domain:runs/evaluator.pt)")
    return kind, path


def _load_torchscript(path: str, hint: str, what: str = "not a TorchScript file"):
    if not os.path.isfile(path):
        raise EvaluationError(f"{path}: detector file not found; {hint}")
    try:
        with warnings.catch_warnings():
            # torch marks TorchScript deprecated, but the standard Inception detector is a TorchScript file
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(path, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - whatever torch.jit.load raises, the file is not a usable detector
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EvaluationError(f"{path}: {what} (torch.jit.load failed: {first[:200]}); {hint}") \
            from None
    return module.eval()


def _forward_args(module) -> list[str]:
    try:
        return [a.name for a in module.forward.schema.arguments][1:]  # drop `self`
    except AttributeError:
        return []


def load_detector(spec: str | FeatureDetector, device: torch.device | str = "cpu") -> FeatureDetector:
    """A detector from 'inception:PATH' / 'domain:PATH' (or an existing detector), on `device`, in eval mode."""
    if isinstance(spec, FeatureDetector):
        return spec.to(device)
    kind, path = parse_detector_spec(spec)
    if kind == "inception":
        module = _load_torchscript(path, INCEPTION_HINT)
        args = _forward_args(module)
        if len(args) < 2 or not all(name in args[1:] for name in _NEEDED_KEYWORDS):
            raise EvaluationError(f"{path}: forward takes ({', '.join(args)}), not the Inception detector's "
                                  f"({', '.join(_INCEPTION_ARGS)}); {INCEPTION_HINT}")
        return InceptionDetector(module, path).to(device)
    if os.path.isfile(path) and is_domain_classifier_file(path):
        return DomainDetector(load_domain_classifier(path), path).to(device)
    module = _load_torchscript(path, DOMAIN_HINT, "damaged, or not an evaluator file (neither tools/fit_evaluator.py's "
                               "format nor TorchScript)")
    return DomainDetector(module, path).to(device)
