"""What one optimizer step feeds the model: this rank's micro-batches drawn from the global order (fixed-size or
packed to a global-position budget), turned into model inputs on the device.

Everything here is a pure function of the training cursor and the layout (dp rank / size, TP degree), so every
layout consumes the same samples and a resumed run continues exactly where it stopped."""
from __future__ import annotations

import numpy as np

from dpar_scale.config import Config
from dpar_scale.data.loader import Batch, BatchSource, CodeData, GlobalOrder, rank_slice
from dpar_scale.models.layers import class_drop_mask


class StepBatches:
    def __init__(self, cfg: Config, data: CodeData, order: GlobalOrder, source: BatchSource, dp_rank: int,
                 dp_size: int, device):
        self.cfg, self.data, self.order, self.source = cfg, data, order, source
        self.dp_rank, self.dp_size, self.device = dp_rank, dp_size, device

    @property
    def conditional(self) -> bool:
        return self.cfg.model.kind != "entropy"

    def model_inputs(self, batch: Batch, step: int) -> dict:
        """The model's keyword arguments for `batch` at optimizer step `step` (class dropout depends on it)."""
        inputs = {"codes": batch.codes.to(self.device), "labels": batch.labels.to(self.device)}
        if self.conditional and self.cfg.model.class_dropout > 0:
            # decided per (sample, step), not per rank: the same labels drop under every layout
            inputs["drop_class"] = class_drop_mask(batch.sample_ids, step, self.cfg.train.seed,
                                                   self.cfg.model.class_dropout).to(self.device)
        if batch.patch_lengths is not None:
            from dpar_scale.patching.layout import PatchLayout

            from dpar_scale.parallel.parallelize import packed_length_multiple

            inputs["layout"] = PatchLayout.from_lengths(batch.patch_lengths, grid=self.data.grid,
                                                        pad_to_multiple=packed_length_multiple(self.cfg.parallel)
                                                        ).to(self.device)
        return inputs

    def for_step(self, cursor: int) -> tuple[list[Batch], np.ndarray]:
        """This rank's micro-batches for the optimizer step starting at global sample `cursor`, and the sample ids
        the whole step consumes from the global order, all ranks together (the caller advances the cursor by their
        count)."""
        if self.cfg.data.global_tokens_per_microbatch > 0:
            return self.packed(cursor)
        global_ids = self.order.ids(cursor, self.cfg.data.batch_size)
        micro_ids = global_ids.reshape(self.cfg.train.grad_accum, -1)
        return [self.source.make(rank_slice(ids, self.dp_rank, self.dp_size)) for ids in micro_ids], global_ids

    def packed(self, cursor: int) -> tuple[list[Batch], np.ndarray]:
        """DPAR with a global-position budget: grad_accum x dp micro-batches, each filled from the stream until
        Σ (M_i + 1) (padded to the TP degree) would exceed data.global_tokens_per_microbatch, so the number of
        images per micro-batch follows their patch counts. Every rank packs the same global stream from the same
        cursor (a pure function of it), then takes its own grad_accum micro-batches."""
        from dpar_scale.data.packing import pack_microbatches

        accum = self.cfg.train.grad_accum
        wanted = accum * self.dp_size

        def stream(chunk: int = 256):
            position = cursor
            while True:
                ids = self.order.ids(position, chunk)
                yield from zip(ids.tolist(), self.source.patch_lengths(ids))
                position += chunk

        micro = []
        for mb in pack_microbatches(stream(), self.cfg.data.global_tokens_per_microbatch,
                                    pad_to_multiple=self.cfg.parallel.tp):
            micro.append(mb)
            if len(micro) == wanted:
                break
        mine = micro[self.dp_rank * accum:(self.dp_rank + 1) * accum]
        batches = [self.source.make(np.array(mb.sample_ids, dtype=np.int64), patch_lengths=mb.lengths) for mb in mine]
        return batches, np.array([i for mb in micro for i in mb.sample_ids], dtype=np.int64)


def global_positions(batch: Batch) -> int:
    """Positions the big transformer runs over: codes for token models, Σ (M_i + 1) for DPAR."""
    if batch.patch_lengths is None:
        return batch.num_codes
    return batch.num_patches + len(batch.patch_lengths)
