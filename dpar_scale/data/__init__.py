"""Data: the embedded synthetic dataset, image loading and preprocessing, code shards and their side arrays
(entropies), what is checked when data is opened (checks), the seeded global data order and the batches the
trainer reads.

May import: patching, config (and errors, integrity). Nothing here knows about models or ranks (a rank is just an
index into the global batch; the checks at open take their share of the work as an argument)."""
