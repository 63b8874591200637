"""Core types of the task package: :class:`EpisodeBatch` (what a learner consumes), :class:`TaskFamily`
(what samples it) and the explicit seeding helpers every family uses.

Seeding: nothing here touches a global RNG. Every random draw comes from a ``torch.Generator`` or a
``numpy.random.Generator(PCG64)`` built by :func:`torch_generator` / :func:`numpy_rng` from
``(seed, split, stream name)``, hashed through :class:`numpy.random.SeedSequence`. Separate streams
(indices, projection, permutation, ...) mean that switching one augmentation on does not change what the
others draw.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = [
    "SPLITS",
    "EpisodeBatch",
    "TaskFamily",
    "check_sample_args",
    "derive_seed",
    "episode_generators",
    "episode_selection",
    "numpy_rng",
    "sample_episodes",
    "torch_generator",
]

SPLITS: tuple[str, ...] = ("train", "test")


# ----------------------------------------------------------------------------------------------------------
# Seeding
# ----------------------------------------------------------------------------------------------------------


def _key_int(key: object) -> int:
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        if key < 0:
            raise ValueError(f"seed keys must be non-negative integers, got {key}")
        return int(key)
    return zlib.crc32(str(key).encode("utf-8"))


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed derived from ``seed`` and any number of keys (ints or strings), e.g.
    ``derive_seed(7, "train", "proj")``. Different keys give statistically independent streams."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    ss = np.random.SeedSequence(entropy=int(seed), spawn_key=tuple(_key_int(k) for k in keys))
    return int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1))


def torch_generator(seed: int, *keys: object, device: torch.device | str | None = None) -> torch.Generator:
    """A ``torch.Generator`` (on ``device``, CPU by default) seeded with ``derive_seed(seed, *keys)``."""
    gen = torch.Generator(device=device if device is not None else "cpu")
    gen.manual_seed(derive_seed(seed, *keys))
    return gen


def numpy_rng(seed: int, *keys: object) -> np.random.Generator:
    """A ``numpy.random.Generator(PCG64)`` seeded with ``derive_seed(seed, *keys)``."""
    return np.random.Generator(np.random.PCG64(derive_seed(seed, *keys)))


def truncated_normal(shape: tuple[int, ...], std: float = 1.0,
                     generator: torch.Generator | Sequence[torch.Generator] | None = None,
                     dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """Normal(0, std) truncated at ±2 std, *without* variance correction (haiku's / TF's default).

    The project's one truncated-normal routine: θ initialisation and initial cell states
    (``vsml.engine.params``, ``vsml.engine.state``), baseline weights, the ``random`` task's images.
    Sampled by inverting the CDF on U(Φ(-2), Φ(2)): one uniform draw per element, so the result is
    a deterministic function of the generator's state and of the shape.

    ``generator``: one generator (the uniforms are drawn on its device, the result moved to ``device``), or
    a sequence of ``shape[0]`` generators, one per row of the leading axis (per-episode streams: row i
    depends only on generator i, so any subset of episodes can be drawn alone, e.g. one rank's share of
    an ES population; see :func:`episode_generators`).  With CUDA generators everything stays on the GPU.
    """
    lo = 0.5 * (1.0 + math.erf(-2.0 / math.sqrt(2.0)))
    if generator is not None and not isinstance(generator, torch.Generator):
        gens = list(generator)
        if len(gens) != shape[0]:
            raise ValueError(f"truncated_normal: {len(gens)} generators for a leading axis of {shape[0]}")
        gen_device = gens[0].device if gens else (device or "cpu")
        u = torch.empty(shape, dtype=torch.float64, device=gen_device)
        for i, g in enumerate(gens):                                  # one stream per row
            torch.rand(shape[1:], generator=g, dtype=torch.float64, device=gen_device, out=u[i])
    else:
        gen_device = generator.device if generator is not None else device
        u = torch.rand(shape, generator=generator, dtype=torch.float64, device=gen_device)
    u = lo + (1.0 - 2.0 * lo) * u
    z = math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)
    return (z.clamp_(-2.0, 2.0) * std).to(dtype=dtype, device=device)


def episode_generators(seeds: Sequence[int], device: torch.device | str | None = None) -> list[torch.Generator]:
    """One generator per episode on ``device`` (CPU by default), seeded with ``seeds[i]``: the per-episode
    streams :func:`truncated_normal` and ``vsml.engine.state.init_state`` accept."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return [torch.Generator(device=dev).manual_seed(int(s)) for s in seeds]


def check_sample_args(num_episodes: int, length: int, seed: int, split: str) -> None:
    """Validate the arguments of :meth:`TaskFamily.sample` with clear errors."""
    for arg, val in (("num_episodes", num_episodes), ("length", length)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
            raise ValueError(f"{arg} must be a positive int, got {val!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def episode_selection(episodes: range | slice | None, num_episodes: int) -> range | None:
    """``episodes`` (a range or slice of step 1 within [0, E)) as a range; None for all E episodes."""
    if episodes is None:
        return None
    if isinstance(episodes, slice):
        episodes = range(*episodes.indices(num_episodes))
    if not isinstance(episodes, range) or episodes.step != 1:
        raise ValueError(f"episodes must be a contiguous range or slice (step 1), got {episodes!r}")
    if len(episodes) < 1 or episodes.start < 0 or episodes.stop > num_episodes:
        raise ValueError(f"episodes {episodes!r} must be a non-empty part of range({num_episodes})")
    return episodes


def sample_episodes(family: "TaskFamily", num_episodes: int, length: int, seed: int, split: str = "train", *,
                    device: torch.device | str | None = None, episodes: range | slice | None = None
                    ) -> "EpisodeBatch":
    """``family.sample(...)`` restricted to ``episodes`` of the E: through the family's own ``episodes=``
    argument when it has one (per-episode streams, only those episodes are built), else by building all E
    and selecting (families without per-episode support: generated tasks, the Guessing Game)."""
    sel = episode_selection(episodes, int(num_episodes))
    if sel is None:
        return family.sample(num_episodes, length, seed, split, device=device)
    import inspect
    if "episodes" in inspect.signature(family.sample).parameters:
        return family.sample(num_episodes, length, seed, split, device=device, episodes=sel)
    return family.sample(num_episodes, length, seed, split, device=device).select(slice(sel.start, sel.stop))


# ----------------------------------------------------------------------------------------------------------
# EpisodeBatch
# ----------------------------------------------------------------------------------------------------------


@dataclass
class EpisodeBatch:
    """A batch of E episodes of T online steps, all with the same input size and class count.

    Attributes:
        x: float32 [E, T, D]: the inputs, already resized, normalised, permuted / projected and flattened.
        y: int64 [E, T]: the labels, in [0, num_classes).
        num_classes: number of classes C of every episode in the batch.
        name: the task family (or dataset) name, e.g. ``"mnist+proj"``.
        image_shape: the shape x[e, t] can be reshaped to, e.g. (28, 28) or (14, 14); ``None`` for non-image
            inputs (teacher tasks, mnist1d, or a projection to another dimension).
        info: free-form metadata (split, seed, source, subset size, mixture member, ...).
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    name: str
    image_shape: tuple[int, ...] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.x, torch.Tensor) or not isinstance(self.y, torch.Tensor):
            raise TypeError("EpisodeBatch: x and y must be torch.Tensors")
        if self.x.dtype != torch.float32:
            raise TypeError(f"EpisodeBatch: x must be float32, got {self.x.dtype}")
        if self.y.dtype != torch.int64:
            raise TypeError(f"EpisodeBatch: y must be int64, got {self.y.dtype}")
        if self.x.dim() != 3:
            raise ValueError(f"EpisodeBatch: x must be [E, T, D], got shape {tuple(self.x.shape)}")
        if self.y.dim() != 2 or tuple(self.y.shape) != tuple(self.x.shape[:2]):
            raise ValueError(
                f"EpisodeBatch: y must be [E, T] = {tuple(self.x.shape[:2])}, got shape {tuple(self.y.shape)}"
            )
        if self.x.device != self.y.device:
            raise ValueError(f"EpisodeBatch: x on {self.x.device} but y on {self.y.device}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, (int, np.integer)) \
                or self.num_classes < 1:
            raise ValueError(f"EpisodeBatch: num_classes must be a positive int, got {self.num_classes!r}")
        self.num_classes = int(self.num_classes)
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("EpisodeBatch: name must be a non-empty string")
        if self.image_shape is not None:
            self.image_shape = tuple(int(s) for s in self.image_shape)
            if int(np.prod(self.image_shape)) != self.x.shape[2]:
                raise ValueError(
                    f"EpisodeBatch: image_shape {self.image_shape} has {int(np.prod(self.image_shape))} elements "
                    f"but D = {self.x.shape[2]}"
                )
        if self.y.device.type == "cpu" and self.y.numel():  # a range check on an accelerator would sync
            lo, hi = int(self.y.min()), int(self.y.max())
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(f"EpisodeBatch: labels span [{lo}, {hi}], outside [0, {self.num_classes})")

    @property
    def num_episodes(self) -> int:
        """E."""
        return int(self.x.shape[0])

    @property
    def length(self) -> int:
        """T, the number of online steps."""
        return int(self.x.shape[1])

    @property
    def input_dim(self) -> int:
        """D."""
        return int(self.x.shape[2])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> EpisodeBatch:
        """A copy with x and y on ``device`` (metadata shared)."""
        return dataclasses.replace(
            self,
            x=self.x.to(device, non_blocking=non_blocking),
            y=self.y.to(device, non_blocking=non_blocking),
            info=dict(self.info),
        )

    def images(self) -> torch.Tensor:
        """x viewed as images: [E, T, *image_shape]. Raises ``ValueError`` for non-image batches."""
        if self.image_shape is None:
            raise ValueError(f"EpisodeBatch {self.name!r} has no image shape")
        return self.x.reshape(self.num_episodes, self.length, *self.image_shape)  # [E, T, D] -> [E, T, H, W]

    def select(self, episodes: slice | Sequence[int] | torch.Tensor) -> EpisodeBatch:
        """The sub-batch of the given episodes (a slice, a list of indices or an index tensor)."""
        return dataclasses.replace(self, x=self.x[episodes], y=self.y[episodes], info=dict(self.info))

    def one_hot(self) -> torch.Tensor:
        """float32 [E, T, C] one-hot labels."""
        return torch.nn.functional.one_hot(self.y, self.num_classes).to(torch.float32)

    @staticmethod
    def concat(batches: Sequence[EpisodeBatch]) -> EpisodeBatch:
        """Concatenate batches along the episode axis; they must agree in T, D, num_classes and image_shape."""
        if not batches:
            raise ValueError("EpisodeBatch.concat needs at least one batch")
        first = batches[0]
        for b in batches[1:]:
            if (b.length, b.input_dim, b.num_classes, b.image_shape) != (
                first.length, first.input_dim, first.num_classes, first.image_shape
            ):
                raise ValueError(
                    "EpisodeBatch.concat: batches differ in (T, D, num_classes, image_shape): "
                    f"{(first.length, first.input_dim, first.num_classes, first.image_shape)} vs "
                    f"{(b.length, b.input_dim, b.num_classes, b.image_shape)}"
                )
        names = sorted({b.name for b in batches})
        return EpisodeBatch(
            x=torch.cat([b.x for b in batches]),  # [sum E_i, T, D]
            y=torch.cat([b.y for b in batches]),  # [sum E_i, T]
            num_classes=first.num_classes,
            name=names[0] if len(names) == 1 else "|".join(names),
            image_shape=first.image_shape,
            info={"parts": [b.info for b in batches]},
        )


# ----------------------------------------------------------------------------------------------------------
# TaskFamily
# ----------------------------------------------------------------------------------------------------------


class TaskFamily(abc.ABC):
    """A distribution over classification tasks; :meth:`sample` draws a batch of episodes.

    ``sample(E, T, seed, split)`` is a pure function of its arguments (and of the data on disk): the same
    call gives the same batch. Augmentations (projection, permutation, class subset, label permutation)
    are drawn per episode from the seed. Meta-training uses ``split="train"``; meta-testing ``"test"``.
    """

    name: str = "task"

    @property
    def num_classes(self) -> int | None:
        """Number of classes of every sampled batch, or ``None`` when it varies between batches."""
        return None

    @property
    def input_dim(self) -> int | None:
        """Input size D of every sampled batch, or ``None`` when it varies between batches."""
        return None

    @property
    def image_shape(self) -> tuple[int, ...] | None:
        """Image shape of every sampled batch, or ``None`` (non-image, or varies)."""
        return None

    @abc.abstractmethod
    def sample(
        self,
        num_episodes: int,
        length: int,
        seed: int,
        split: str = "train",
        *,
        device: torch.device | str | None = None,
    ) -> EpisodeBatch:
        """Draw ``num_episodes`` episodes of ``length`` steps from ``split``; deterministic in (seed, split).

        ``device`` (optional) is where the batch is built and returned; index sampling always runs on the CPU,
        so only the projection matrices (drawn on ``device``) depend on the device type.  Families that can
        build a subset of the episodes alone also take ``episodes=`` (a range of [0, E)); use
        :func:`sample_episodes` to ask any family.
        """

    def sample_many(
        self,
        num_episodes: int,
        length: int,
        seed: int,
        split: str = "train",
        *,
        device: torch.device | str | None = None,
    ) -> list[EpisodeBatch]:
        """Draw ``num_episodes`` episodes possibly spread over several homogeneous batches (one per mixture
        member for :class:`~tasks.families.MixtureFamily`); a single batch for plain families."""
        return [self.sample(num_episodes, length, seed, split, device=device)]

    def prepare(self, splits: Sequence[str] = SPLITS) -> None:
        """Load (and if needed download) all data now, so that missing data fails early. No-op by default."""

    def members(self) -> list[TaskFamily]:
        """The plain families this family draws from (itself for a plain family)."""
        return [self]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
