"""What one optimizer step feeds the model: this rank's micro-batches drawn from the global order (fixed-size or
packed to a global-position budget), turned into model inputs on the device.

Everything here is a pure function of the training cursor and the layout (dp rank / size, TP degree), so every
layout consumes the same samples and a resumed run continues exactly where it stopped. Text models: each sample's
caption is chosen by (seed, epoch of its position, sample id) and caption dropout by (seed, step, sample id), so
the captions a step trains on do not depend on the layout either."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from dpar_scale.config import Config
from dpar_scale.data.loader import Batch, BatchSource, CodeData, GlobalOrder, rank_slice
from dpar_scale.flops.analytic import train_flops
from dpar_scale.models.layers import class_drop_mask


@dataclass
class StepPlan:
    """Which samples one optimizer step reads: the whole step's sample ids (every rank's micro-batches, what the
    cursor advances by) and this rank's micro-batches as (ids, patch lengths or None: the rule computes them)."""
    cursor: int
    step_ids: np.ndarray
    micro: list[tuple[np.ndarray, list[list[int]] | None]]
    # analytic training FLOPs of the whole step, every rank's micro-batches (None: fixed-size DPAR batches, whose
    # other ranks' patch counts this rank does not compute; the trainer sums each rank's own)
    global_flops: float | None = None
    # text models: the epoch of each sample of each micro-batch (caption choice), parallel to `micro`
    micro_epochs: list[np.ndarray] | None = None


class StepBatches:
    def __init__(self, cfg: Config, data: CodeData, order: GlobalOrder, source: BatchSource, dp_rank: int,
                 dp_size: int, device):
        self.cfg, self.data, self.order, self.source = cfg, data, order, source
        self.dp_rank, self.dp_size, self.device = dp_rank, dp_size, torch.device(device)
        # batches built ahead are pinned so that their copy to the GPU is asynchronous (non_blocking)
        self.pin = self.device.type == "cuda"
        self._chunk_hint: int | None = None  # packed: images the planner reads at once (set from the last step)

    @property
    def codes_per_image(self) -> int:
        return self.data.grid[0] * self.data.grid[1]

    @property
    def conditional(self) -> bool:
        return self.cfg.model.kind != "entropy"

    @property
    def text(self) -> bool:
        return self.cfg.model.conditioning == "text"

    def model_inputs(self, batch: Batch, step: int) -> dict:
        """The model's keyword arguments for `batch` at optimizer step `step` (class dropout depends on it), on the
        device (copied non-blocking: from pinned memory the copy overlaps the work already queued)."""
        inputs = {"codes": batch.codes.to(self.device, non_blocking=True),
                  "labels": batch.labels.to(self.device, non_blocking=True)}
        if self.text:
            if batch.text_ids is None:
                raise ValueError("a text model's batch carries no captions (BatchSource needs a TextSource)")
            # text_lengths stay on the host: the layout (DPAR) or the left padding (GPT) is built from them there
            inputs.update(text_ids=batch.text_ids.to(self.device, non_blocking=True), text_lengths=batch.text_lengths)
            if self.cfg.model.text.dropout > 0:  # per (sample, step) like class dropout: the same on every layout
                # on the host: DPAR builds its attention plan (documents) from it there
                inputs["drop_text"] = class_drop_mask(batch.sample_ids, step, self.cfg.train.seed,
                                                      self.cfg.model.text.dropout)
        elif self.conditional and self.cfg.model.class_dropout > 0:
            # decided per (sample, step), not per rank: the same labels drop under every layout
            inputs["drop_class"] = class_drop_mask(batch.sample_ids, step, self.cfg.train.seed,
                                                   self.cfg.model.class_dropout).to(self.device)
        if batch.patch_lengths is not None:
            layout = batch.layout if batch.layout is not None else self.layout(batch)
            inputs["layout"] = layout.to(self.device, non_blocking=True)
        return inputs

    def layout(self, batch: Batch):
        from dpar_scale.parallel.parallelize import packed_length_multiple
        from dpar_scale.patching.layout import PatchLayout

        # TP degree, or the compile bucket under parallel.compile (a handful of shapes, not one per batch)
        return PatchLayout.from_lengths(batch.patch_lengths, grid=self.data.grid,
                                        pad_to_multiple=packed_length_multiple(self.cfg.parallel),
                                        cond_lengths=None if batch.text_lengths is None
                                        else batch.text_lengths.tolist())

    def for_step(self, cursor: int) -> tuple[list[Batch], np.ndarray]:
        """This rank's micro-batches for the optimizer step starting at global sample `cursor`, and the sample ids
        the whole step consumes from the global order, all ranks together (the caller advances the cursor by their
        count). The same as `build(plan(cursor))`, which background workers run ahead (train/prefetch.py)."""
        plan = self.plan(cursor)
        return self.build(plan), plan.step_ids

    def plan(self, cursor: int) -> StepPlan:
        if self.cfg.data.global_tokens_per_microbatch > 0:
            return self.packed(cursor)
        global_ids = self.order.ids(cursor, self.cfg.data.batch_size)
        micro_ids = global_ids.reshape(self.cfg.train.grad_accum, -1)
        micro = [(rank_slice(ids, self.dp_rank, self.dp_size), None) for ids in micro_ids]
        epochs = None
        if self.text:  # caption choice reads each sample's epoch
            micro_epochs = self.order.epochs(cursor, self.cfg.data.batch_size).reshape(self.cfg.train.grad_accum, -1)
            epochs = [rank_slice(ep, self.dp_rank, self.dp_size) for ep in micro_epochs]
        flops = None
        # token models: every micro-batch of every rank has the same shape (text: caption lengths differ, so the
        # trainer sums each rank's own batches)
        if self.source.patch_cfg is None and not self.text:
            flops = len(micro) * self.dp_size * train_flops(self.cfg.model, batch_images=len(micro[0][0]),
                                                              n_codes=self.codes_per_image)
        return StepPlan(cursor, global_ids, micro, flops, epochs)

    def build(self, plan: StepPlan) -> list[Batch]:
        """The planned micro-batches: codes gathered from the shards, patch lengths (when not planned already),
        layouts; pinned when training on CUDA."""
        batches = []
        for k, (ids, lengths) in enumerate(plan.micro):
            epochs = plan.micro_epochs[k] if plan.micro_epochs is not None else None
            batch = self.source.make(ids, patch_lengths=lengths, epochs=epochs)
            if batch.patch_lengths is not None:
                batch.layout = self.layout(batch)
            batches.append(pinned(batch) if self.pin else batch)
        return batches

    def packed(self, cursor: int) -> StepPlan:
        """DPAR with a global-position budget: grad_accum x dp micro-batches, each filled from the stream until
        Σ (M_i + 1) (text: Σ (M_i + L_i); padded to the TP degree) would exceed
        data.global_tokens_per_microbatch (or it holds data.max_images_per_microbatch images), so the number of
        images per micro-batch follows their patch counts. Every rank packs the same global stream from the same
        cursor (a pure function of it), then takes its own grad_accum micro-batches."""
        from dpar_scale.data.packing import pack_columns

        accum = self.cfg.train.grad_accum
        wanted = accum * self.dp_size

        # Read the entropies in chunks: the packed micro-batches are a function of the positions alone, whatever
        # the chunk, which only sets how much patch-rule work is done ahead. The first step reads as many images as
        # the step can hold at most (no patch is longer than P_max, so an image takes at least ceil(N / P_max) + 1
        # positions; +1: the packer reads the image that closes the last micro-batch) — 2.3x what it packs at
        # B proportions; later steps read about what the previous one packed (+1/8 + 8), and more if needed.
        budget, cap = self.cfg.data.global_tokens_per_microbatch, self.cfg.data.max_images_per_microbatch
        per_micro = budget // (-(-self.codes_per_image // self.cfg.model.patch.max_patch_length) + 1)
        bound = min(max(wanted * (min(per_micro, cap) if cap else per_micro) + 1, 1), 4096)

        def stream(chunk: int = min(self._chunk_hint or bound, bound)):  # columns: ids, patch lengths, cond lengths
            position = cursor
            while True:
                ids = self.order.ids(position, chunk)
                # text: the caption's tokens take the class position's place in the budget
                yield (ids.tolist(), self.source.patch_lengths(ids),
                       self.source.text_lengths(ids, self.order.epochs(position, chunk)) if self.text else None)
                position += chunk

        micro = []
        for mb in pack_columns(stream(), budget, pad_to_multiple=self.cfg.parallel.tp, max_images=cap or None):
            micro.append(mb)
            if len(micro) == wanted:
                break
        mine = micro[self.dp_rank * accum:(self.dp_rank + 1) * accum]
        first = np.cumsum([0] + [len(mb) for mb in micro])  # global-order offset of each micro-batch
        self._chunk_hint = int(first[-1]) + int(first[-1]) // 8 + 8
        epochs = [self.order.epochs(cursor + int(first[k]), len(micro[k]))
                  for k in range(len(micro))] if self.text else None
        # every rank packed every rank's micro-batches: the step's FLOPs need no communication
        flops = sum(train_flops(self.cfg.model, batch_images=len(mb), patch_lengths=mb.lengths,
                                n_codes=self.codes_per_image,
                                text_lengths=self.source.text_lengths(np.array(mb.sample_ids), epochs[k])
                                if self.text else None) for k, mb in enumerate(micro))
        return StepPlan(cursor, np.array([i for mb in micro for i in mb.sample_ids], dtype=np.int64),
                        [(np.array(mb.sample_ids, dtype=np.int64), mb.lengths) for mb in mine], flops,
                        epochs[self.dp_rank * accum:(self.dp_rank + 1) * accum] if self.text else None)


def pinned(batch: Batch) -> Batch:
    """`batch` with its tensors (and its layout's) in page-locked memory, for asynchronous copies to the GPU."""
    def pin(obj):
        moved = {f.name: getattr(obj, f.name).pin_memory() for f in dataclasses.fields(obj)
                 if isinstance(getattr(obj, f.name), torch.Tensor)}
        return dataclasses.replace(obj, **moved)

    out = pin(batch)
    if out.layout is not None:
        out.layout = pin(out.layout)
    return out


def global_positions(batch: Batch) -> int:
    """Positions the big transformer runs over: codes for token models, Σ (M_i + 1) for DPAR (with text: the
    caption tokens instead of the class, Σ (M_i + L_i); a text GPT's Σ (N - 1 + L_i))."""
    cond = int(batch.text_lengths.sum()) if batch.text_lengths is not None else None
    if batch.patch_lengths is None:
        return batch.num_codes if cond is None else batch.num_codes - len(batch.codes) + cond
    return batch.num_patches + (len(batch.patch_lengths) if cond is None else cond)
