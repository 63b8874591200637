"""Meta-gradient estimators: ES, PES / truncated ES, BPTT, BMG, learning-algorithm cloning.

One protocol and the clipping helper: :mod:`vsml.estimators.base`; the registry the trainer builds
from: :mod:`vsml.estimators.registry`."""
