"""Fitting the embedded evaluator (`domain_classifier.DomainClassifier`) on an ImageFolder of real images.

Labels: "class" from the class folders (ImageFolder order); one more head per attribute named in `heads` (default
shape and colour) from DIR/attributes.jsonl (tools/make_dataset.py writes it: {"path": "00_disc/00000.png",
"shape": "disc", "colour": "red", ...}); an attribute head is skipped, with a note, when the file is absent.
Held out: every image whose seeded per-class rank falls in the last `held_out` fraction (at least one per
class), so the held-out set is balanced and a function of (seed, listing) only. Training is deterministic for a
given seed and thread count. The images are loaded once into memory (the embedded set is a few thousand small
pictures).
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dpar_scale.data.images import center_crop_arr, list_image_folder, load_rgb

from .domain_classifier import DomainClassifier, head_accuracy, predict
from .sources import EvaluationError, FolderImages

__all__ = ["DEFAULT_HEADS", "MIN_HELD_OUT_ACCURACY", "fit_domain_classifier", "load_labelled_images"]

DEFAULT_HEADS = ("shape", "colour")
MIN_HELD_OUT_ACCURACY = 0.95  # below it the evaluator's verdict on samples means little (issue 12)


def load_labelled_images(root: str, image_size: int | None = None, heads=DEFAULT_HEADS):
    """(images uint8 [N, S, S, 3], {head: int64 [N]}, {head: [value names]}, notes) of an ImageFolder; S is the
    first image's size unless given (every image is centre-cropped to it)."""
    try:
        classes, samples = list_image_folder(root)
    except FileNotFoundError as e:
        raise EvaluationError(f"{e}; make one with tools/make_dataset.py --out DIR") from None
    if len(samples) < 2 * len(classes):
        raise EvaluationError(f"{root}: {len(samples)} images for {len(classes)} classes; fitting needs at least "
                              f"2 per class (one to hold out)")
    if image_size is None:
        image_size = min(load_rgb(samples[0][0]).size)
    images = np.stack([np.asarray(center_crop_arr(load_rgb(p), image_size), dtype=np.uint8) for p, _ in samples])
    labels = {"class": np.array([c for _, c in samples], dtype=np.int64)}
    names = {"class": list(classes)}
    notes = []
    attr_path = os.path.join(root, "attributes.jsonl")
    wanted = [h for h in heads if h != "class"]
    if wanted and not os.path.isfile(attr_path):
        notes.append(f"no {attr_path}: only the class head is fitted (tools/make_dataset.py writes it)")
        wanted = []
    if wanted:
        by_path = {}
        with open(attr_path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                        by_path[os.path.normpath(record["path"])] = record
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise EvaluationError(f"{attr_path}:{n}: not a JSON object with a 'path'") from None
        for head in wanted:
            values = []
            for p, _ in samples:
                rel = os.path.normpath(os.path.relpath(p, root))
                record = by_path.get(rel)
                if record is None or not isinstance(record.get(head), str):
                    raise EvaluationError(f"{attr_path}: no string {head!r} for {rel}; write the dataset again with "
                                          f"tools/make_dataset.py or leave {head} out of --heads")
                values.append(record[head])
            names[head] = sorted(set(values))
            index = {v: i for i, v in enumerate(names[head])}
            labels[head] = np.array([index[v] for v in values], dtype=np.int64)
    return images, labels, names, notes


def _split(labels: np.ndarray, held_out: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 12])
    test = []
    for c in np.unique(labels):
        ids = np.flatnonzero(labels == c)
        ids = ids[rng.permutation(len(ids))]
        test.extend(ids[: max(1, int(round(held_out * len(ids))))].tolist())
    test = np.array(sorted(test), dtype=np.int64)
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def fit_domain_classifier(root: str, *, heads=DEFAULT_HEADS, epochs: int = 16, batch_size: int = 64,
                          lr: float = 4e-3, width: int = 32, held_out: float = 0.1, seed: int = 0,
                          image_size: int | None = None, work_size: int = 32, max_steps: int = 0,
                          progress: bool = True) -> tuple[DomainClassifier, dict]:
    """Fits a classifier on the real images under `root`; returns (model in eval mode, meta for the file), with
    meta["held_out_accuracy"] = {head: fraction} on the held-out images."""
    started = time.perf_counter()
    images, labels, names, notes = load_labelled_images(root, image_size, heads)
    size = images.shape[1]
    work = min(size, work_size) if work_size else size  # the model's input size (inputs are resized to it)
    train, test = _split(labels["class"], held_out, seed)
    torch.manual_seed(seed)
    model = DomainClassifier({h: len(v) for h, v in names.items()}, work, width)
    steps_per_epoch = -(-len(train) // batch_size)
    total = steps_per_epoch * epochs if not max_steps else max_steps
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.15)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    if work != size:  # resized once here (the model would resize every batch again)
        x_all = F.interpolate(x_all.float(), size=(work, work), mode="bilinear", antialias=True,
                              align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
    y_all = {h: torch.from_numpy(v) for h, v in labels.items()}
    rng = np.random.default_rng([seed, 13])
    model.train()
    step = 0
    bar = tqdm(total=total, desc="fit evaluator", unit="step", disable=not progress, dynamic_ncols=True)
    while step < total:
        order = train[rng.permutation(len(train))]
        for i in range(0, len(order), batch_size):
            if step >= total:
                break
            ids = torch.from_numpy(order[i:i + batch_size])
            x = x_all[ids]
            flip = torch.from_numpy(rng.random(len(ids)) < 0.5)  # left-right flips keep class, shape and colour
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            logits = model.head_logits(x)
            loss = sum(F.cross_entropy(logits[h], y_all[h][ids]) for h in logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    bar.close()
    model.eval()
    held = predict(model, x_all[torch.from_numpy(test)])
    accuracy = head_accuracy(held, {h: v[test] for h, v in labels.items()})
    folder = FolderImages(root, size)
    classes_json = os.path.join(root, "classes.json")
    identity = json.load(open(classes_json)) if os.path.isfile(classes_json) else {}
    per_class = {names["class"][c]: float((held["class"][labels["class"][test] == c] == c).mean())
                 for c in range(len(names["class"]))}
    meta = {"heads": names, "held_out_accuracy": accuracy, "held_out_class_accuracy": per_class, "num_train": int(len(train)),
            "num_held_out": int(len(test)),
            "data": {**folder.fingerprint(), "generator": identity.get("generator"), "seed": identity.get("seed")},
            "fit": {"work_size": work, "epochs": epochs, "steps": step, "batch_size": batch_size, "lr": lr,
                    "width": width,
                    "held_out": held_out, "seed": seed, "threads": torch.get_num_threads()},
            "seconds": round(time.perf_counter() - started, 2), "notes": notes}
    return model, meta
