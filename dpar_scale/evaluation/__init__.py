"""Evaluation: the metrics the papers report (FID, Inception Score, precision / recall as in ADM's evaluator) and
their domain variants (FID-domain, class accuracy) for data that has no Inception.

Rooms: `sources` (samples / reference images from an npz, an array or an ImageFolder), `detectors` (the
TorchScript Inception detector and the domain classifier behind one interface), `features` (batched extraction,
split over ranks), `statistics` (the formulas, on features), `reference` (reference statistics and their cache),
`evaluate` (`evaluate_samples`: one call from a samples file to the metrics).

May import: models, data, parallel, config. Never train or launch (the trainer calls in here, not the reverse).
"""
