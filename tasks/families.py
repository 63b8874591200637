"""Task families: a source plus per-episode augmentations (:class:`SourceFamily`), and mixtures of families
(:class:`MixtureFamily`).

Order of operations in :meth:`SourceFamily.sample` (vsml.md §3.2, with the project's decisions of §8):

1. class subset per episode (size chosen per batch, subset per episode; labels relabelled 0..k-1 in the
   original class order) - applied while drawing the examples;
2. draw the raw examples [E, T, H, W] (pixels in [0, 1]);
3. resize, bilinear, no antialiasing: [E, T, h, w];
4. normalise with the source's own train-split scalar mean / std;
5. flatten to [E, T, D];
6. pixel permutation, one per episode;
7. random projection, one Glorot-uniform matrix per episode (x' = x R, R [D, D']);
8. label permutation, one per episode.

Unlike the reference code (decision 4 of §8), projections and permutations are drawn **per episode** from
the seed, not once per process.

Where the work happens (``sample(..., device=...)``): example indices, class subsets and permutation keys
are drawn on the host (O(E·T) and O(E·D) work, batch streams); the examples are gathered from a copy of
the split on ``device``; resize, normalisation, permutation and projection run there.  On the CPU the
projections of a batch come from one stream (seed, split, "proj") consumed in episode order (the numbers
of every earlier version); on any other device, and whenever ``episodes=`` selects a subset, episode i's
matrix comes from its own stream (seed, split, "proj", i), so a distributed rank builds only its own
episodes and ``sample(E, ..., episodes=r)`` equals the rows r of ``sample(E, ..., episodes=range(E))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .augment import (
    apply_permutation,
    random_permutations,
    random_projection,
    resize_images,
    sample_class_subsets,
)
from .base import (
    SPLITS,
    EpisodeBatch,
    TaskFamily,
    check_sample_args,
    derive_seed,
    episode_selection,
    numpy_rng,
    sample_episodes,
    torch_generator,
)
from .sources import Source

__all__ = ["Augmentation", "MixtureFamily", "SourceFamily"]


@dataclass(frozen=True)
class Augmentation:
    """Which per-episode augmentations a :class:`SourceFamily` applies.

    Attributes:
        proj: apply a random projection.
        proj_dim: output dimension D' of the projection (``None``: same as the input, D' = D).
        perm: apply a random feature (pixel) permutation.
        labelperm: apply a random label permutation.
        classes: (k_min, k_max): a random class subset per episode with k drawn per batch uniformly from
            k_min..k_max (``classes<k>`` gives k_min = k_max = k).
        class_list: a fixed ordered class subset for every episode, relabelled by position (e.g. (5, 8, 1, 4, 2)
            maps class 5 to 0, 8 to 1, ...). Exclusive with ``classes``.
        resize: (h, w) to resize images to.
        affine: a per-episode brightness / contrast change of the normalised inputs, x ← s·x + b with
            log s ~ U(log ½, log 2) and b ~ U(−1, 1) (one s, b per episode, before any permutation or
            projection): the same images with the background at another value, as another dataset's
            normalisation puts it (issue 15: Fashion-MNIST's background is at −0.81, MNIST's at −0.42).
        label_noise: the probability (``noise<percent>``, 1..99) that an example's label is replaced by a class
            drawn uniformly from the episode's C classes (possibly the true one), independently per example and
            episode: tasks with a Bayes error, whose learners must average over many examples (issue 15).
        fixed_seed: if set, the projection, pixel permutation and label permutation are drawn once from this
            seed and shared by every episode of every batch and split (the reference code's behaviour, vsml.md §8
            decision 4, made reproducible); class subsets stay per episode. ``None`` (default): per episode.
    """

    proj: bool = False
    proj_dim: int | None = None
    perm: bool = False
    labelperm: bool = False
    classes: tuple[int, int] | None = None
    class_list: tuple[int, ...] | None = None
    resize: tuple[int, int] | None = None
    affine: bool = False
    label_noise: float = 0.0
    fixed_seed: int | None = None

    def suffix(self) -> str:
        """The spec-language modifiers, e.g. ``"+classes5+resize14+proj"``."""
        parts: list[str] = []
        if self.class_list is not None:
            parts.append("classes[" + ",".join(map(str, self.class_list)) + "]")
        if self.classes is not None:
            lo, hi = self.classes
            parts.append(f"classes{lo}" if lo == hi else f"classes{lo}-{hi}")
        if self.resize is not None:
            h, w = self.resize
            parts.append(f"resize{h}" if h == w else f"resize{h}x{w}")
        if self.affine:
            parts.append("affine")
        if self.perm:
            parts.append("perm")
        if self.proj:
            parts.append("proj" if self.proj_dim is None else f"proj{self.proj_dim}")
        if self.labelperm:
            parts.append("labelperm")
        if self.label_noise:
            parts.append(f"noise{round(self.label_noise * 100)}")
        if self.fixed_seed is not None:
            parts.append(f"fixed{self.fixed_seed}")
        return "".join("+" + p for p in parts)


class SourceFamily(TaskFamily):
    """One source (a dataset or a generated task) with per-episode augmentations.

    Args:
        source: where the examples come from.
        aug: the augmentations.
        name: the family name (defaults to the source name plus the modifiers, e.g. ``"mnist+proj"``).
    """

    def __init__(self, source: Source, aug: Augmentation | None = None, name: str | None = None) -> None:
        self.source = source
        self.aug = aug = aug or Augmentation()
        c = source.num_classes
        if aug.classes is not None and aug.class_list is not None:
            raise ValueError("use either a random class subset size or a fixed class list, not both")
        if aug.classes is not None:
            lo, hi = aug.classes
            if not 2 <= lo <= hi <= c:
                raise ValueError(f"{source.name}: class subset size range {lo}-{hi} must lie within 2..{c}")
        if aug.class_list is not None:
            cl = aug.class_list
            if len(cl) < 2 or len(set(cl)) != len(cl) or min(cl) < 0 or max(cl) >= c:
                raise ValueError(
                    f"{source.name}: class list {list(cl)} must hold >= 2 distinct classes in 0..{c - 1}"
                )
        if aug.resize is not None:
            if source.image_shape is None:
                raise ValueError(f"{source.name}: resize needs image data, but this source has no image shape")
            if min(aug.resize) < 1:
                raise ValueError(f"resize target {aug.resize} must be positive")
        if aug.fixed_seed is not None and not (aug.proj or aug.perm or aug.labelperm or aug.affine):
            raise ValueError("fixed<seed> only applies to proj, perm, labelperm or affine; none is given")
        if not 0.0 <= aug.label_noise < 1.0:
            raise ValueError(f"label noise must lie in [0, 1), got {aug.label_noise}")
        if aug.proj_dim is not None and aug.proj_dim < 1:
            raise ValueError(f"projection dimension must be positive, got {aug.proj_dim}")
        self.name = name or (source.name + aug.suffix())

    # -- static properties ---------------------------------------------------------------------------------

    @property
    def _base_shape(self) -> tuple[int, ...]:
        return self.aug.resize if self.aug.resize is not None else self.source.feature_shape

    @property
    def input_dim(self) -> int:
        d = int(np.prod(self._base_shape))
        return self.aug.proj_dim if (self.aug.proj and self.aug.proj_dim is not None) else d

    @property
    def image_shape(self) -> tuple[int, ...] | None:
        if self.source.image_shape is None:
            return None
        if self.aug.proj and self.aug.proj_dim is not None and self.aug.proj_dim != int(np.prod(self._base_shape)):
            return None
        return tuple(self._base_shape)

    @property
    def num_classes(self) -> int | None:
        if self.aug.class_list is not None:
            return len(self.aug.class_list)
        if self.aug.classes is not None:
            lo, hi = self.aug.classes
            return lo if lo == hi else None
        return self.source.num_classes

    def prepare(self, splits: Sequence[str] = SPLITS) -> None:
        for split in splits:
            self.source.prepare(split)
        self.source.stats()

    # -- sampling ------------------------------------------------------------------------------------------

    def subset_size(self, seed: int, split: str = "train") -> int | None:
        """The class subset size k a ``sample`` call with this seed and split uses (None: no subset)."""
        if self.aug.class_list is not None:
            return len(self.aug.class_list)
        if self.aug.classes is None:
            return None
        lo, hi = self.aug.classes
        return int(numpy_rng(seed, split, "classes-k").integers(lo, hi + 1))

    def sample(self, num_episodes, length, seed, split="train", *, device=None, episodes=None) -> EpisodeBatch:
        check_sample_args(num_episodes, length, seed, split)
        aug, src = self.aug, self.source
        e, t = int(num_episodes), int(length)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        sel = episode_selection(episodes, e)            # None: all E episodes
        # per-episode streams for the device-side draws (projections): on any device but the CPU, and
        # whenever a subset of the episodes is asked for; the CPU default keeps the batch streams (the
        # numbers of every earlier version)
        per_episode = sel is not None or dev.type != "cpu"
        e_out = e if sel is None else len(sel)

        def pick(v: torch.Tensor) -> torch.Tensor:
            return v if sel is None else v[sel.start:sel.stop]

        # 1. class subsets: [E, k] (host, cheap: drawn for all E, then this call's episodes kept)
        subsets = None
        k = self.subset_size(seed, split)
        if aug.class_list is not None:
            subsets = torch.tensor(aug.class_list, dtype=torch.int64).expand(e, -1).contiguous()  # [E, k]
        elif k is not None:
            present = src.present_classes(split)  # e.g. the fixed `random` set may lack some classes
            if present is None:
                subsets = sample_class_subsets(e, src.num_classes, k, torch_generator(seed, split, "classes"))
            elif present.numel() < k:
                raise ValueError(
                    f"{self.name}: only {present.numel()} classes have examples in the {split} split, "
                    f"cannot draw subsets of {k}"
                )
            else:  # subsets among the present classes; still sorted ascending since `present` is
                picks = sample_class_subsets(e, present.numel(), k, torch_generator(seed, split, "classes"))
                subsets = present[picks]  # [E, k]
        num_classes = src.num_classes if k is None else k

        # 2. raw examples: x [E, T, *feature_shape], y [E, T]; array sources draw the indices on the host
        # and gather on the device (only the indices travel); other sources draw on the host
        if hasattr(src, "draw_indices"):
            real, y = src.draw_indices(e, t, seed, split, subsets)
            x = src.gather(pick(real), split, dev)
            y = pick(y).to(dev)
        else:
            x, y = src.draw(e, t, seed, split, subsets)
            x = pick(x).to(dev)
            y = pick(y).to(dev)

        # 3. resize (before normalisation): [E, T, H, W] -> [E, T, h, w]
        if aug.resize is not None:
            x = resize_images(x, aug.resize)

        # 4. normalise with the source's train-split statistics
        mean, std = src.stats()
        if (mean, std) != (0.0, 1.0):
            x = x.sub_(mean).div_(std)

        # 5. flatten: [E, T, *shape] -> [E, T, D]
        x = x.reshape(e_out, t, -1)
        d = x.shape[2]

        # per-episode streams from (seed, split), or one draw shared by everything from the fixed seed
        fixed = aug.fixed_seed is not None
        aug_key: tuple = (aug.fixed_seed, "fixed") if fixed else (seed, split)
        n_draw = 1 if fixed else e

        # 5b. per-episode brightness / contrast: x ← s·x + b, s, b [E] drawn on the host for all E
        if aug.affine:
            gen = torch_generator(*aug_key, "affine")
            log_s = torch.empty(n_draw).uniform_(-math.log(2.0), math.log(2.0), generator=gen).expand(e)   # [E]
            shift = torch.empty(n_draw).uniform_(-1.0, 1.0, generator=gen).expand(e)                       # [E]
            x = x * pick(log_s.exp()).to(dev, x.dtype)[:, None, None] + pick(shift).to(dev, x.dtype)[:, None, None]

        # 6. per-episode feature permutation (host keys [E, D], this call's rows applied on the device)
        if aug.perm:
            perms = random_permutations(n_draw, d, torch_generator(*aug_key, "perm")).expand(e, d)  # [E, D]
            x = apply_permutation(x, pick(perms))

        # 7. per-episode random projection [E, D, D'] (drawn on the target device)
        if aug.proj:
            out_dim = aug.proj_dim if aug.proj_dim is not None else d
            if per_episode and not fixed:   # episode i's matrix from its own stream (seed, split, "proj", i)
                first = 0 if sel is None else sel.start
                gens = [torch_generator(seed, split, "proj", i, device=dev) for i in range(first, first + e_out)]
                x = random_projection(x, out_dim, gens)
            else:
                x = random_projection(x, out_dim, torch_generator(*aug_key, "proj", device=dev), shared=fixed)

        # 8. per-episode label permutation
        if aug.labelperm:
            gen = torch_generator(*aug_key, "labelperm")
            lperm = random_permutations(n_draw, num_classes, gen).expand(e, num_classes)  # [E, C]
            y = pick(lperm).to(dev).gather(1, y)

        # 9. label noise: per example, with probability p a uniformly drawn class (host draws [E, T] for all E)
        if aug.label_noise:
            gen = torch_generator(seed, split, "labelnoise")
            flip = torch.rand(e, t, generator=gen) < aug.label_noise                    # [E, T]
            rand_y = torch.randint(0, num_classes, (e, t), generator=gen)               # [E, T]
            y = torch.where(pick(flip).to(dev), pick(rand_y).to(dev, y.dtype), y)

        info = {"split": split, "seed": int(seed), "source": src.name, "subset_size": k}
        if sel is not None:
            info["episodes"] = (sel.start, sel.stop, e)
        return EpisodeBatch(
            x=x.contiguous(),
            y=y.contiguous(),
            num_classes=num_classes,
            name=self.name,
            image_shape=self.image_shape,  # None after a projection to another dimension
            info=info,
        )


class MixtureFamily(TaskFamily):
    """A mixture of task families (the ``mix:`` and ``all-but:`` specs).

    :meth:`sample` picks **one** member per call, from the seed (uniformly, or by ``weights``), so that the batch
    is homogeneous (one D and one class count); a trainer calling ``sample`` with a new seed every meta-step
    thus cycles through the members at random. :meth:`sample_many` instead splits the episodes over all
    members (as evenly as possible) and returns one batch per member, for trainers that want every member in
    every meta-step.
    """

    def __init__(self, members: Sequence[TaskFamily], name: str, weights: Sequence[float] | None = None) -> None:
        if not members:
            raise ValueError("a mixture needs at least one member")
        self._members = list(members)
        self.name = name
        if weights is None:
            self.weights = np.full(len(members), 1.0 / len(members))
        else:
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != (len(members),) or (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"mixture weights must be {len(members)} non-negative numbers, not all zero")
            self.weights = w / w.sum()

    def members(self) -> list[TaskFamily]:
        return list(self._members)

    def _common(self, attr: str):
        vals = {getattr(m, attr) for m in self._members}
        return vals.pop() if len(vals) == 1 else None

    @property
    def num_classes(self) -> int | None:
        return self._common("num_classes")

    @property
    def input_dim(self) -> int | None:
        return self._common("input_dim")

    @property
    def image_shape(self) -> tuple[int, ...] | None:
        return self._common("image_shape")

    def prepare(self, splits: Sequence[str] = SPLITS) -> None:
        for m in self._members:
            m.prepare(splits)

    def pick(self, seed: int, split: str = "train") -> int:
        """Index of the member that ``sample(..., seed, split)`` uses."""
        return int(numpy_rng(seed, split, "mixture-pick").choice(len(self._members), p=self.weights))

    def sample(self, num_episodes, length, seed, split="train", *, device=None, episodes=None) -> EpisodeBatch:
        check_sample_args(num_episodes, length, seed, split)
        i = self.pick(seed, split)
        batch = sample_episodes(self._members[i], num_episodes, length, derive_seed(seed, "member", i), split,
                                device=device, episodes=episodes)
        batch.info.update({"mixture": self.name, "member_index": i, "seed": int(seed)})
        return batch

    def sample_many(self, num_episodes, length, seed, split="train", *, device=None) -> list[EpisodeBatch]:
        check_sample_args(num_episodes, length, seed, split)
        m = len(self._members)
        counts = [num_episodes // m + (1 if i < num_episodes % m else 0) for i in range(m)]
        out = []
        for i, (member, n) in enumerate(zip(self._members, counts)):
            if n == 0:
                continue
            for batch in member.sample_many(n, length, derive_seed(seed, "member", i), split, device=device):
                batch.info.update({"mixture": self.name, "member_index": i, "seed": int(seed)})
                out.append(batch)
        return out
