"""FLOP accounting: the analytic count of a model's training FLOPs from its shape and real patch lengths, GPU peak
tables and MFU (`analytic`), and the op-level counters (fvcore, FlopCounterMode) that cross-check it on the real
modules (`counting`).

May import: models, patching, config.
"""
