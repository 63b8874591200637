"""Meta-gradient estimators: ES, PES / truncated ES, BPTT, BMG, learning-algorithm cloning."""
