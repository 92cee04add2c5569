"""Data: the embedded synthetic dataset (its pictures, and writing them with captions and attributes), image loading
and preprocessing, code shards and their side arrays (entropies, captions) over shared shard files, caption files,
what is checked when data is opened (checks), the seeded global data order and the batches the trainer reads (with
ragged caption token ids for text models; the text tokenizer is passed in, so this room does not import
dpar_scale.text).

May import: patching, config (and errors, integrity). Nothing here knows about models or ranks (a rank is just an
index into the global batch; the checks at open take their share of the work as an argument)."""
