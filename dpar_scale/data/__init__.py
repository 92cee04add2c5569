"""Data: the embedded synthetic dataset, image loading and preprocessing, code shards and their side arrays
(entropies), the seeded global data order and the batches the trainer reads.

May import: patching, config. Nothing here knows about models or ranks (a rank is just an index into the global
batch)."""
