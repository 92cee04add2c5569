"""parallel.compile: DPAR's blocks compile without graph breaks (fullgraph=True raises on one), a compiled model
trains to the eager model's losses over steps with different layouts, and dynamo compiles each block once per
shape bucket (packed length padded to parallel.compile_bucket, patch count to PATCH_BUCKET), not once per batch.

aot_eager traces forward and backward exactly as inductor's front end does (functionalisation, autograd graphs,
the same guards and recompiles) but skips inductor's code generation, which costs minutes on a 2-core CPU."""
import copy

import torch

from dpar_scale.config import ParallelConfig
from dpar_scale.models import DPAR
from dpar_scale.models.dpar import PATCH_BUCKET
from dpar_scale.parallel.parallelize import apply_compile, packed_length_multiple, transformer_blocks
from dpar_scale.patching.layout import PatchLayout
from dpar_scale.train.loss import code_loss
from test_attention_backends import demo_lengths
from tolerances import assert_close, model_chain

GRID = (8, 8)
BUCKET = 128


def test_compiled_dpar_equals_eager_and_compiles_once_per_bucket():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = DPAR(dim=32, n_heads=2, n_encoder_layers=1, n_global_layers=1, n_decoder_layers=1, vocab_size=64,
                 num_classes=10, grid=GRID, multiple_of=16, dropout=0.0, class_dropout=0.0)
    with torch.no_grad():
        eager.output.weight.normal_(std=0.5)  # the LlamaGen init zeroes it
    compiled = copy.deepcopy(eager)
    apply_compile(compiled, backend="aot_eager", fullgraph=True)
    assert compiled.blocks_compiled and not eager.blocks_compiled
    n_blocks = len(transformer_blocks(compiled))
    opts = [torch.optim.SGD(m.parameters(), lr=0.01) for m in (eager, compiled)]
    losses, shapes, graphs = [[], []], [], []
    # mean patch lengths 1.2 and 2.6 give packed lengths in two buckets (256 and 128) and patch counts in two
    for step, mean in enumerate([1.2, 2.6, 1.25, 2.5]):
        lay = PatchLayout.from_lengths(demo_lengths(batch=4, grid=GRID[0], seed=step, mean=mean), GRID,
                                       pad_to_multiple=BUCKET)
        g = torch.Generator().manual_seed(step)
        codes, labels = torch.randint(0, 64, (4, 64), generator=g), torch.randint(0, 10, (4,), generator=g)
        for i, (model, opt) in enumerate(zip((eager, compiled), opts)):
            loss = code_loss(model(codes, labels, lay), codes)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[i].append(loss.detach())
        shapes.append((lay.packed_length, -(-lay.max_patches // PATCH_BUCKET)))
        graphs.append(counters["stats"]["unique_graphs"])
    assert len(set(shapes)) == 2 and shapes[0] != shapes[1] and shapes[2:] == shapes[:2], shapes
    assert not counters["graph_break"], dict(counters["graph_break"])
    # the first batch compiles every block once; the second bucket recompiles only the two blocks whose shapes it
    # changes (patch cross-attention: M; global: T); batches in buckets already seen compile nothing
    assert graphs[0] <= n_blocks + 1 and graphs[1] - graphs[0] <= 2 and graphs[3] == graphs[1], graphs
    chain = model_chain(eager, 128)
    chain["depth"] *= len(losses[0])  # the optimizer steps chain the rounding of every step before
    assert_close(torch.stack(losses[1]), torch.stack(losses[0]), **chain)


def test_packed_length_bucket():
    assert packed_length_multiple(ParallelConfig(tp=2)) == 2
    assert packed_length_multiple(ParallelConfig(tp=2, compile=True)) == 128
    assert packed_length_multiple(ParallelConfig(tp=3, compile=True, compile_bucket=64)) == 192
