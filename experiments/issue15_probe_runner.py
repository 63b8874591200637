"""The launcher shared by the issue-15 cell probes (``issue15_hbound_probe.py``, ``issue15_bilinear_probe.py``):
after a probe has patched the eager PyTorch path, run ``SCRIPT.py [its arguments]`` from the command line
as ``__main__``, with every learner loaded through ``vsml.evaluation.load.load_learner`` forced onto the
torch backend (the only path the probes patch)."""
from __future__ import annotations

import os
import runpy
import sys

from vsml.evaluation import load


def run_script(prog: str) -> None:
    """Run sys.argv[1] (train.py or an experiments/ script) with sys.argv[2:]; usage error if missing."""
    if len(sys.argv) < 2 or not os.path.isfile(sys.argv[1]):
        print(f"error: usage: {prog} SCRIPT.py [its arguments] (SCRIPT: train.py or an experiments/ script)",
              file=sys.stderr)
        sys.exit(2)
    _load = load.load_learner
    load.load_learner = lambda path, device="cpu", compile=True, backend=None: _load(path, device, False, "torch")
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
