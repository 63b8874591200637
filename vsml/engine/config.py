"""Typed configuration of the VSML engine.

Every field mirrors a key of the reference code (``configs/default.yaml`` of
louiskirsch/vsml-neurips2021); the conventions are listed in
``shared/reference/vsml.md`` ("Conventions this project follows").  Configs are
frozen dataclasses: validate once in ``__post_init__``, then pass around freely.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class SubLSTMConfig:
    """The sub-LSTM shared by every weight of the host network (vsml.md §1.2).

    Attributes:
        hidden: N, size of h and of c (reference 16).
        msg: M, size of the forward and of the backward message (reference 8).
        layer_norm: LayerNorm over the M message dims of both readouts (eps ``ln_eps``).
        init_rand_proportion: fraction of the cell dims drawn at random per episode (§1.6).
        ln_eps: LayerNorm epsilon.
        bilinear: two multiplicative paths in the cell (not in the reference; issue 15, RESULTS.md "The bilinear
            cell").  With x_a = →m_a[0] (the input side's forward element 0, the pixel in the first layer) and
            e_b = ←m_b[0] (the backward element 0, the error at the last layer):
              gates += w_xe · x_a e_b                       (w_xe ∈ R^4N: SGD's x·e update as a direct input)
              φ_ab  += x_a · (W_xφ h_ab + b_xφ)             (W_xφ ∈ R^{M×N}, b_xφ ∈ R^M: a w·x read-out)
            θ gains 4N + M·N + M values (W_xe, W_xphi, b_xphi, stored last).  A plain θ loaded into a bilinear
            config gets zeros there, which is the same learner (``vsml.engine.params.extend_theta``).
    """

    hidden: int = 16
    msg: int = 8
    layer_norm: bool = False
    init_rand_proportion: float = 0.5
    ln_eps: float = 1e-5
    bilinear: bool = False

    def __post_init__(self) -> None:
        _check(self.hidden >= 1, f"SubLSTMConfig.hidden must be >= 1, got {self.hidden}")
        _check(self.msg >= 2, f"SubLSTMConfig.msg must be >= 2 (element 0 carries the input/error, "
               f"element 1 the logit/label), got {self.msg}")
        _check(0.0 <= self.init_rand_proportion <= 1.0,
               f"SubLSTMConfig.init_rand_proportion must lie in [0, 1], got {self.init_rand_proportion}")
        _check(self.ln_eps > 0, f"SubLSTMConfig.ln_eps must be > 0, got {self.ln_eps}")

    @property
    def gates(self) -> int:
        """4N: pre-activations i, g, f, o."""
        return 4 * self.hidden

    @property
    def num_rand(self) -> int:
        """Cell dims drawn at random per episode: int(N * init_rand_proportion) (§1.6)."""
        return int(self.hidden * self.init_rand_proportion)


_CONV_RE = re.compile(r"^c(\d+)(?:k(\d+))?(?:s(\d+))?((?:-ref(?:bwd|init))*)$")


@dataclass(frozen=True)
class ConvSpec:
    """One convolutional VSML layer (vsml.md §1.9; implemented in ``vsml/engine/conv.py``).

    One sub-LSTM per (kernel tap, in-channel, out-channel), its state shared by every output
    position; SAME padding (TensorFlow's rule, ``ConvGeometry.pads``) so the output size is
    ceil(in / stride).

    Attributes:
        channels: OC, output channels.
        kernel: k, odd kernel size (k x k taps).
        stride: s >= 1, the same along height and width.
        bwd_norm: how the backward message into an input position is normalised:
            ``"connected"`` = mean over the (output position, tap) pairs that touch it (the analogue
            of the dense layer's mean over outputs b; equals the reference in the interior at stride 1);
            ``"kernel"`` = the reference's sum / k² (missing taps count as zeros, vsml.md §1.9).
        state_std: std of the random initial cell dims: ``"fan_in"`` = 1/√(k²·IC) (the dense rule
            1/√A with A the taps feeding one output), ``"kernel"`` = the reference's 1/√k (§8 #3).

    String form (CLI ``--vsml.conv c8k3s2,c16k3s1``): ``c<channels>[k<kernel>][s<stride>]`` with
    optional suffixes ``-refbwd`` (bwd_norm="kernel") and ``-refinit`` (state_std="kernel");
    kernel defaults to 3 and stride to 1.
    """

    channels: int
    kernel: int = 3
    stride: int = 1
    bwd_norm: Literal["connected", "kernel"] = "connected"
    state_std: Literal["fan_in", "kernel"] = "fan_in"

    def __post_init__(self) -> None:
        _check(int(self.channels) == self.channels and self.channels >= 1,
               f"ConvSpec.channels must be an integer >= 1, got {self.channels}")
        _check(int(self.kernel) == self.kernel and self.kernel >= 1 and self.kernel % 2 == 1,
               f"ConvSpec.kernel must be an odd integer >= 1 (SAME padding k//2 on each side), got {self.kernel}")
        _check(int(self.stride) == self.stride and self.stride >= 1,
               f"ConvSpec.stride must be an integer >= 1, got {self.stride}")
        _check(self.bwd_norm in ("connected", "kernel"),
               f"ConvSpec.bwd_norm must be 'connected' or 'kernel', got {self.bwd_norm!r}")
        _check(self.state_std in ("fan_in", "kernel"),
               f"ConvSpec.state_std must be 'fan_in' or 'kernel', got {self.state_std!r}")

    @classmethod
    def parse(cls, spec: "str | dict | ConvSpec") -> "ConvSpec":
        """A ConvSpec from its string form, a dict of its fields, or itself."""
        if isinstance(spec, ConvSpec):
            return spec
        if isinstance(spec, dict):
            known = {f.name for f in dataclasses.fields(cls)}
            _check(set(spec) <= known, f"unknown ConvSpec keys {sorted(set(spec) - known)}; known: {sorted(known)}")
            return cls(**spec)
        m = _CONV_RE.match(str(spec).strip())
        _check(m is not None, f"bad conv layer spec {spec!r}: expected c<channels>[k<kernel>][s<stride>] "
               f"[-refbwd][-refinit], e.g. 'c8k3s2'")
        ch, k, s, flags = m.groups()
        return cls(int(ch), int(k) if k else 3, int(s) if s else 1,
                   "kernel" if "-refbwd" in flags else "connected",
                   "kernel" if "-refinit" in flags else "fan_in")

    def __str__(self) -> str:
        out = f"c{self.channels}k{self.kernel}s{self.stride}"
        if self.bwd_norm == "kernel":
            out += "-refbwd"
        if self.state_std == "kernel":
            out += "-refinit"
        return out

    def out_size(self, size: int) -> int:
        """ceil(size / stride): the SAME-padded output length along one axis."""
        return -(-size // self.stride)


@dataclass(frozen=True)
class ConvGeometry:
    """Shapes of one conv layer for a given input image (derived, not configured)."""

    height: int
    width: int
    in_channels: int
    out_height: int
    out_width: int
    out_channels: int
    kernel: int
    stride: int

    @property
    def in_dim(self) -> int:
        return self.height * self.width * self.in_channels

    @property
    def pads(self) -> tuple[int, int, int, int]:
        """SAME padding (top, bottom, left, right) as in TensorFlow: total = max((out − 1)·s + k − in, 0),
        top/left = total // 2.  Equals the reference's k//2 on each side at stride 1; at stride > 1 the
        reference keeps k//2 on each side, which can leave the last rows/columns outside every receptive
        field (e.g. H = 9, k = 3, s = 3); this padding covers every input position whenever s <= k."""
        th = max((self.out_height - 1) * self.stride + self.kernel - self.height, 0)
        tw = max((self.out_width - 1) * self.stride + self.kernel - self.width, 0)
        return th // 2, th - th // 2, tw // 2, tw - tw // 2

    @property
    def out_dim(self) -> int:
        return self.out_height * self.out_width * self.out_channels


@dataclass(frozen=True)
class VSMLConfig:
    """A VSML network: a stack of dense VSML layers, each a grid of sub-LSTMs.

    The host network maps D inputs through ``hidden_sizes`` to the number of classes;
    D and the class count are *not* part of the config: one θ runs any input size and
    any class count (vsml.md §1.8).

    Attributes:
        cell: the sub-LSTM.
        hidden_sizes: widths of the hidden dense layers; ``()`` is the reference default
            (one layer D -> classes); ``(32,)`` is the ``deep`` config (D -> 32 -> classes).
        micro_ticks: micro-steps per layer update, incoming messages frozen (§1.3).
        backward_pass: two sweeps per example instead of the forward-only schedule (§1.5).
        feed_label: put the label in element 1 of the error message (λ = 1) (§1.4).
        layerwise: one θ per layer instead of one θ shared by every layer (§1.1).
        tanh_bound: logits are ``tanh_bound * tanh(logit_scale * m / tanh_bound)``.
        logit_scale: κ, the read-out's inverse temperature: logits ŷ = bound·tanh(κ·m[output_idx] / bound)
            (1 = the reference).  Not in the reference: with the layer's mean aggregation a sub-LSTM's bounded
            read-out caps the logits, so the error softmax(ŷ) − onehot never gets small and the learner keeps
            a high effective step size (no annealing); κ > 1 lets it become confident (issue 15, RESULTS.md
            "A logit scale").  The cloning teachers use the same read-out (their logits κ·mean_a w·x).
        input_idx: forward-message element carrying the input pixel (reference 0).
        output_idx: forward-message element read out as the logit (reference 1).
        error_idx: backward-message element carrying the error (reference 0).
        label_idx: backward-message element carrying the label when ``feed_label`` (reference 1).
        conv: convolutional VSML layers before the dense ones (vsml.md §1.9, ``vsml/engine/conv.py``), e.g.
            ``(ConvSpec(8, 3, 2),)`` or the strings ``("c8k3s2",)``; ``()`` = dense only.
        image_shape: how a flat input of D features is viewed by the first conv layer: ``(H, W)`` or
            ``(H, W, C)`` (channel-last, the order of the flattening); ``()`` = a square single-channel
            image (H = W = √D).  Ignored without conv layers.
        bwd_reset: with ``backward_pass``, also zero every layer's stored backward message after the
            reverse sweep (not only the last layer's error), so the forward sweep runs without error
            input.  Not in the reference (which keeps the lower layers' messages, §1.5); used by deep
            learning-algorithm cloning so that "error present" means "update now".
    """

    cell: SubLSTMConfig = field(default_factory=SubLSTMConfig)
    hidden_sizes: tuple[int, ...] = ()
    micro_ticks: int = 2
    backward_pass: bool = False
    feed_label: bool = False
    layerwise: bool = False
    tanh_bound: float = 100.0
    logit_scale: float = 1.0
    input_idx: int = 0
    output_idx: int = 1
    error_idx: int = 0
    label_idx: int = 1
    conv: tuple[ConvSpec, ...] = ()
    image_shape: tuple[int, ...] = ()
    bwd_reset: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.cell, dict):  # built from JSON
            object.__setattr__(self, "cell", SubLSTMConfig(**self.cell))
        conv = self.conv
        if isinstance(conv, (str, dict, ConvSpec)):
            conv = (conv,)
        object.__setattr__(self, "conv", tuple(ConvSpec.parse(c) for c in conv))
        object.__setattr__(self, "image_shape", tuple(int(v) for v in self.image_shape))
        _check(len(self.image_shape) in (0, 2, 3) and all(v >= 1 for v in self.image_shape),
               f"VSMLConfig.image_shape must be () (square, one channel), (H, W) or (H, W, C) with positive "
               f"entries, got {self.image_shape}")
        _check(not self.bwd_reset or self.backward_pass,
               "VSMLConfig.bwd_reset only applies to the backward-pass schedule; set backward_pass=True or "
               "bwd_reset=False")
        object.__setattr__(self, "hidden_sizes", tuple(int(h) for h in self.hidden_sizes))
        _check(all(h >= 1 for h in self.hidden_sizes),
               f"VSMLConfig.hidden_sizes must be positive, got {self.hidden_sizes}")
        _check(self.micro_ticks >= 1, f"VSMLConfig.micro_ticks must be >= 1, got {self.micro_ticks}")
        _check(self.tanh_bound > 0, f"VSMLConfig.tanh_bound must be > 0, got {self.tanh_bound}")
        _check(math.isfinite(self.logit_scale) and self.logit_scale > 0,
               f"VSMLConfig.logit_scale must be a finite number > 0 (1 = the reference read-out), got {self.logit_scale}")
        m = self.cell.msg
        for name in ("input_idx", "output_idx", "error_idx", "label_idx"):
            v = getattr(self, name)
            _check(0 <= v < m, f"VSMLConfig.{name}={v} must index a message element in [0, {m})")
        _check(self.error_idx != self.label_idx,
               "VSMLConfig.error_idx and label_idx must differ (both live in the backward message)")
        if self.cell.bilinear:
            _check(self.input_idx == 0 and self.error_idx == 0,
                   f"the bilinear cell multiplies forward element 0 by backward element 0; set input_idx=0 and "
                   f"error_idx=0 (got {self.input_idx}, {self.error_idx}) or cell.bilinear=False")
            _check(not self.conv, "the bilinear cell is implemented for dense VSML layers only; drop --vsml.conv "
                   "or set --vsml.cell.bilinear false")

    @property
    def num_layers(self) -> int:
        """K: conv layers plus dense layers."""
        return len(self.conv) + len(self.hidden_sizes) + 1

    def input_image(self, in_dim: int) -> tuple[int, int, int]:
        """(H, W, C) of a flat input of ``in_dim`` features for the first conv layer."""
        if self.image_shape:
            hw = self.image_shape + (1,) * (3 - len(self.image_shape))
            if math.prod(hw) != in_dim:
                raise ValueError(f"the input has D={in_dim} features but VSMLConfig.image_shape={self.image_shape} "
                                 f"has {math.prod(hw)}; set image_shape to the images' (H, W[, C])")
            return hw[0], hw[1], hw[2]
        side = math.isqrt(in_dim)
        if side * side != in_dim:
            raise ValueError(f"a conv VSML layer needs an image: D={in_dim} is not a square, so set "
                             f"VSMLConfig.image_shape=(H, W) or (H, W, C)")
        return side, side, 1

    def conv_geometry(self, in_dim: int) -> list[ConvGeometry]:
        """Shapes of every conv layer for inputs of ``in_dim`` features (empty without conv layers)."""
        if not self.conv:
            return []
        h, w, ch = self.input_image(in_dim)
        out = []
        for spec in self.conv:
            g = ConvGeometry(h, w, ch, spec.out_size(h), spec.out_size(w), spec.channels, spec.kernel, spec.stride)
            out.append(g)
            h, w, ch = g.out_height, g.out_width, g.out_channels
        return out

    @property
    def num_theta_sets(self) -> int:
        """L: how many θ sets there are (K when layerwise, else 1)."""
        return self.num_layers if self.layerwise else 1

    def layer_dims(self, in_dim: int, num_classes: int) -> list[tuple[int, int]]:
        """[(A_k, B_k)] for every *dense* layer k, with B_k = A_{k+1}; after conv layers the first dense
        layer's A is the last conv layer's flattened output Ho·Wo·OC."""
        geo = self.conv_geometry(in_dim)
        sizes = [geo[-1].out_dim if geo else in_dim, *self.hidden_sizes, num_classes]
        return list(zip(sizes[:-1], sizes[1:]))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VSMLConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        _check(not unknown, f"unknown VSMLConfig keys {sorted(unknown)}; known keys: {sorted(known)}")
        d = dict(d)
        if "cell" in d and isinstance(d["cell"], dict):
            d["cell"] = SubLSTMConfig(**d["cell"])
        if "conv" in d:
            d["conv"] = tuple(ConvSpec.parse(c) for c in d["conv"])
        return cls(**d)
