"""Patching: which codes DPAR merges into patches, and the packed layout that follows from it.

`rule` (the entropy patch rule, its alignments and modes, θ calibration), `layout` (PatchLayout: patch ids,
packed global sequence, cu_seqlens, RoPE positions), `entropy` (next-code entropies from the entropy model's
logits). May import: config only; every other room builds on this one.
"""
