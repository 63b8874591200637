"""Analysis tools for recorded learner states and loss curves (badger-bmg-es.md §B).

Usable on any learner: states are arrays [S, n_parts, d] (S samples, e.g. tasks at one inner step;
n parts, e.g. Micro-Badger experts or VSML sub-LSTMs; d dims each), loss curves are 1-D series.

* :mod:`.mutual_info` — Gaussian / Gaussian-copula / KSG mutual information between parts (§B.1);
* :mod:`.binding` — binding information, residual entropy, total correlation, O-information (§B.2);
* :mod:`.hurst` — Hurst exponent by rescaled range (nolds-compatible, §B.3) and exact fGn;
* :mod:`.lyapunov` — largest Lyapunov exponent, Rosenstein (nolds-compatible, §B.4);
* :mod:`.graph` — Laplacian spectrum, algebraic connectivity, strongly connected components (§B.5);
* :func:`frequency_errors` — Δ_F(k) of the frequency-principle variant (§A.4).
"""

from tasks.guessing import frequency_errors

from .binding import (
    binding_information,
    information_decomposition,
    information_from_cov,
    o_information,
    residual_entropy,
    total_correlation,
)
from .graph import algebraic_connectivity, graph_summary, laplacian, laplacian_spectrum, strongly_connected_components
from .hurst import expected_rs, fgn, hurst_rs, logmid_n, loss_curve_hurst
from .lyapunov import delay_embedding, loss_curve_lyapunov, lyap_r
from .mutual_info import gaussian_entropy, gaussian_mi, ksg_mi, mi_matrix, mi_summary

__all__ = [
    "algebraic_connectivity", "binding_information", "delay_embedding", "expected_rs", "fgn",
    "frequency_errors", "gaussian_entropy", "gaussian_mi", "graph_summary", "hurst_rs", "information_decomposition",
    "information_from_cov", "ksg_mi", "laplacian", "laplacian_spectrum", "logmid_n", "loss_curve_hurst",
    "loss_curve_lyapunov", "lyap_r", "mi_matrix", "mi_summary", "o_information", "residual_entropy",
    "strongly_connected_components", "total_correlation",
]
