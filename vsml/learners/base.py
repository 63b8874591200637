"""The interface every online learner satisfies, and generic helpers over inner-loop states.

A *learner* runs the online protocol of vsml.md §2.1 / §3.6: a stream of examples
(x_t, y_t), t = 1..T, per episode; ŷ_t is produced before y_t is seen; the meta-loss is the
mean online cross-entropy.  Its meta-parameters θ are what ES or BPTT optimise (vsml.md §2);
its inner-loop *state* is everything carried from one example to the next (VSML's sub-LSTM
states, a baseline's weights and optimiser moments, an LSTM's h and c, fast weights, ...).

Conventions every learner follows (the estimators and the train loop rely on them):

* θ is either *shared* (``theta.shape == init_theta().shape``) or *per-episode*
  (``[E, *init_theta().shape]``, an ES population: episode e reads θ[e]).
* A state is a tree of tensors (tensor / dataclass / tuple / list / dict, nested); **every
  tensor leaf has the episode axis first** ([E, ...]), so states can be sliced, repeated and
  concatenated along episodes.  Non-tensor leaves (ints, None, ...) are allowed but are
  treated as static: ``unroll`` must not change them.
* ``unroll(theta, x, y, num_classes, state=None, generator=None)``: x [E, T, D] (or
  [E, T, H, W, ...], flattened), y [E, T] int; with ``state=None`` a fresh initial state is
  drawn with ``generator``; passing ``out.state`` back continues the episode (truncated BPTT).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from vsml.engine.state import EpisodeOutput

__all__ = [
    "EpisodeOutput",
    "Learner",
    "is_meta_trainable",
    "state_cat",
    "state_detach",
    "state_from_leaves",
    "state_index",
    "state_map",
    "state_repeat_interleave",
    "tree_flatten",
]


@runtime_checkable
class Learner(Protocol):
    """What the estimators (vsml/estimators/core.py) and the train loop need from a learner.

    ``VSMLNetwork`` satisfies it as is.  An optional attribute ``meta_trainable: bool``
    (False for hand-designed learners such as online SGD / Adam, whose θ is empty) is read with
    :func:`is_meta_trainable`; it is not part of the protocol so that classes without it match.
    """

    def init_theta(self, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> torch.Tensor:
        """Initial meta-parameters (VSML: [L, P]; non-meta-learned baselines: an empty [0])."""
        ...

    def init_state(self, num_episodes: int, in_dim: int, num_classes: int,
                   generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> Any:
        """A fresh inner-loop state for ``num_episodes`` episodes (one random draw each)."""
        ...

    def unroll(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, num_classes: int | None = None,
               state: Any = None, generator: torch.Generator | None = None) -> EpisodeOutput:
        """Run the stream online: logits [E, T, C], loss [E, T], correct [E, T], final state."""
        ...


def state_generator(learner: Any, seed: int, device: torch.device | str | None = None) -> torch.Generator:
    """The generator an estimator draws ``learner``'s initial states from: on ``device`` when the learner
    draws its states with device generators (``learner.device_generators``, the VSML network: the states
    are then made on the GPU), else on the CPU (the states are drawn there and moved).  A CPU generator
    gives the numbers of every earlier version."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type != "cpu" and not getattr(learner, "device_generators", False):
        dev = torch.device("cpu")
    return torch.Generator(device=dev).manual_seed(int(seed))


def is_meta_trainable(learner: Any) -> bool:
    """``learner.meta_trainable`` if present, else True (VSMLNetwork has no such attribute)."""
    return bool(getattr(learner, "meta_trainable", True))


# --------------------------------------------------------------------------------------------
# generic tree helpers over states


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(obj, "_fields")


def state_map(fn: Callable[[torch.Tensor], torch.Tensor], state: Any) -> Any:
    """Apply ``fn`` to every tensor leaf of a state; containers are rebuilt, other leaves kept.

    Handles tensors, dataclass instances (fields mapped on a shallow copy, so frozen dataclasses
    and ``init=False`` fields work), (named) tuples, lists and dicts, nested arbitrarily.
    """
    if torch.is_tensor(state):
        return fn(state)
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        new = copy.copy(state)
        for f in dataclasses.fields(state):
            object.__setattr__(new, f.name, state_map(fn, getattr(state, f.name)))
        return new
    if _is_namedtuple(state):
        return type(state)(*(state_map(fn, v) for v in state))
    if isinstance(state, (tuple, list)):
        return type(state)(state_map(fn, v) for v in state)
    if isinstance(state, dict):
        return type(state)((k, state_map(fn, v)) for k, v in state.items())
    return state


def state_detach(state: Any) -> Any:
    """Cut the autograd graph of every tensor in the state (between BPTT truncations)."""
    if hasattr(state, "detach") and not torch.is_tensor(state):
        return state.detach()  # VSMLState.detach
    return state_map(torch.Tensor.detach, state)


def state_repeat_interleave(state: Any, repeats: int) -> Any:
    """[E, ...] -> [E*repeats, ...] on every leaf: e.g. both members of an antithetic pair share
    one initial-state draw (vsml.md §2.2)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if hasattr(state, "repeat_interleave") and not torch.is_tensor(state):
        return state.repeat_interleave(repeats)  # VSMLState.repeat_interleave
    return state_map(lambda t: t.repeat_interleave(repeats, dim=0), state)


def state_index(state: Any, idx: Any) -> Any:
    """Select episodes (first axis) of every leaf, e.g. ``state_index(s, slice(0, 64))``."""
    return state_map(lambda t: t[idx], state)


def state_cat(states: Sequence[Any]) -> Any:
    """Concatenate states of the same structure along the episode axis."""
    if not states:
        raise ValueError("state_cat needs at least one state")
    leaves0, rebuild = tree_flatten(states[0])
    all_leaves = [tree_flatten(s)[0] for s in states]
    for lv in all_leaves:
        if len(lv) != len(leaves0):
            raise ValueError("state_cat: states have different structures")
    return rebuild([torch.cat([lv[i] for lv in all_leaves], 0) for i in range(len(leaves0))])


def tree_flatten(state: Any) -> tuple[list[torch.Tensor], Callable[[Sequence[torch.Tensor]], Any]]:
    """Flatten a state to its tensor leaves (depth-first, in field / item order) and return a
    function that rebuilds a state of the same structure from a sequence of new leaves.

    Used to pass a state through ``torch.utils.checkpoint`` (which only tracks tensors given as
    positional arguments).  Non-tensor leaves are kept as they are (static).
    """
    leaves: list[torch.Tensor] = []

    def collect(t: torch.Tensor) -> torch.Tensor:
        leaves.append(t)
        return t

    state_map(collect, state)
    n = len(leaves)

    def rebuild(new_leaves: Sequence[torch.Tensor]) -> Any:
        if len(new_leaves) != n:
            raise ValueError(f"tree_flatten.rebuild: expected {n} tensors, got {len(new_leaves)}")
        it = iter(new_leaves)
        return state_map(lambda _t: next(it), state)

    return leaves, rebuild


def state_from_leaves(template: Any, leaves: Sequence[torch.Tensor], what: str = "the saved state") -> Any:
    """A state with ``template``'s structure and ``leaves`` (saved by ``tree_flatten(state)[0]``) as its
    tensors, each moved to its template leaf's device.  ValueError (naming ``what``) when the count or a
    shape does not fit: the state was saved under another learner / task config."""
    tmpl, rebuild = tree_flatten(template)
    if len(tmpl) != len(leaves) or any(a.shape != b.shape for a, b in zip(tmpl, leaves)):
        raise ValueError(f"{what} does not fit this learner / task config; resume with the config it was "
                         "written with")
    return rebuild([t.to(a.device) for t, a in zip(leaves, tmpl)])
