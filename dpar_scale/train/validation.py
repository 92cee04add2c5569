"""Is the model right for its data, and how well does it predict data it never trained on.

`check_model_fits_data` runs at set-up (and at launch time, dpar_scale.launch.job): vocabulary, grid and classes of
the model config against the opened code data. `held_out_loss` is the validation loss: the mean code loss over a
fixed set of held-out images, the same whatever the process layout."""
from __future__ import annotations

import torch

from dpar_scale.config import Config, ConfigError
from dpar_scale.data.loader import CodeData, rank_share
from dpar_scale.parallel.process_group import all_reduce_sum
from dpar_scale.train.loss import code_loss_per_image


def check_model_fits_data(cfg: Config, data: CodeData) -> None:
    m = cfg.model
    if m.vocab_size != data.vocab_size:
        raise ConfigError(f"model.vocab_size={m.vocab_size} but the codes in {cfg.data.codes_dir} come from a "
                          f"tokenizer with {data.vocab_size} entries: set model.vocab_size={data.vocab_size}")
    if tuple(m.grid) != tuple(data.grid):
        raise ConfigError(f"model.grid={list(m.grid)} but the codes are on a {list(data.grid)} grid: "
                          f"set model.grid={list(data.grid)}")
    if m.kind != "entropy" and m.conditioning != "text" and m.num_classes < data.num_classes:
        raise ConfigError(f"model.num_classes={m.num_classes} but the data has {data.num_classes} classes: "
                          f"set model.num_classes={data.num_classes}")


@torch.no_grad()
def held_out_loss(trainer, ids) -> float:
    """Mean code loss of `trainer`'s model over the held-out images `ids`: global micro-batches split over the
    data-parallel ranks (`rank_share` weights the padding of an uneven split out), summed over them."""
    t = trainer
    t.model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=t.device)  # loss sum, code count
    for start in range(0, len(ids), t.global_micro_batch):
        local, weight = rank_share(ids[start:start + t.global_micro_batch], t.dp_rank, t.dp_size)
        batch = t.source.make(local, epochs=0 if t.source.text is not None else None)
        with t.autocast():
            logits = t.model(**t.model_inputs(batch))
        per_image = code_loss_per_image(logits, batch.codes.to(t.device)).double()
        weight = weight.to(t.device, torch.float64)
        sums += torch.stack([(per_image * weight).sum(), weight.sum() * batch.codes.shape[1]])
    total = all_reduce_sum(sums, t.dp_group)
    return float(total[0] / total[1])
