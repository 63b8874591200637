"""Thread policy of the command-line tools (``train.py``, ``eval.py``).

The engine's tensors are small (a few thousand sub-LSTMs), so intra-op threads buy little when the
machine is idle, and with any other busy process OpenMP's spinning worker threads make every op
wait for a descheduled thread (README, "Threads"; numbers measured there).  Unless the user chose
(``OMP_NUM_THREADS`` or ``VSML_THREADS`` set), the CLIs therefore run with
``min(available cores, VSML_DEFAULT_THREADS)`` intra-op threads, where the default is 1.
"""

from __future__ import annotations

import os

DEFAULT_THREADS = 1


def apply_thread_policy() -> int:
    """Set torch's intra-op threads per the policy above; returns the number in use."""
    import torch
    if "VSML_THREADS" in os.environ:
        n = int(os.environ["VSML_THREADS"])
    elif "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()          # the user's (or the launcher's) choice
    else:
        n = DEFAULT_THREADS
    n = max(1, min(n, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
    torch.set_num_threads(n)
    return n
