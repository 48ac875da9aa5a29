"""Strict loading: a module built on the meta device gets every tensor of a read plan, or an error naming the keys.

A read plan is {module key: Entry(file keys, how they combine)} (read_plans.py makes them). Before anything is
read, the file's keys are checked against the plan (missing, unexpected), then every shape and dtype; all problems
of a kind are reported together. Then each tensor is read once (tensor_source.TensorSource) and assigned.
"""
import contextlib
import gc
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .checkpoint_file import FLOAT_DTYPES, CheckpointError
from .tensor_source import TensorSource

PROGRESS_BYTES = 16 << 20  # `load_planned` reports its reads to a progress bar in steps of about this many bytes


def _fmt_keys(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


@dataclass(frozen=True)
class Entry:
    """How one model tensor is made: the file tensors it is read from, and how they combine (None: a copy)."""

    sources: tuple[str, ...]
    combine: Callable | None = None
    shape: Callable | None = None  # the combined shape from the sources' shapes (default: combine on meta tensors)


def state_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """{state_dict key: shape} of a model, in state_dict order: its parameters and persistent buffers, read in one
    walk over the modules (`state_dict()` itself calls hooks and builds a detached tensor per entry)."""
    shapes = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        shapes.update((prefix + k, tuple(p.shape)) for k, p in module._parameters.items() if p is not None)
        shapes.update((prefix + k, tuple(b.shape)) for k, b in module._buffers.items()
                      if b is not None and k not in module._non_persistent_buffers_set)
    return shapes


def load_planned(model: nn.Module, src: TensorSource, plan: dict[str, Entry], *, scope: set[str],
                 ignored: set[str] = frozenset(), dtype: torch.dtype, device, label: str,
                 shapes: dict[str, tuple[int, ...]], on_read: Callable[[int], None] | None = None) -> nn.Module:
    """Strictly load `model` (built on the meta device) from `src` following `plan`, in eval mode, no gradients.

    scope: the file's keys that belong to this component; any not in the plan and not deliberately `ignored`
    is unexpected. All problems are collected and raised as one CheckpointError naming the keys.
    shapes: `state_shapes(model)`, which the caller has already made its plan from.
    on_read: called with the file bytes read so far since its last call, every PROGRESS_BYTES or so and once at
    the end (a progress bar's update).
    """
    check_plan(src, plan, shapes, scope=scope, ignored=ignored, label=label)
    state, work = {}, torch.promote_types(dtype, torch.float32)  # combined tensors: computed in >= float32
    pending = 0
    for key, entry in plan.items():
        if entry.combine is None:
            state[key] = src.get(entry.sources[0], dtype, device)
        else:
            state[key] = entry.combine(*(src.get(s, work, device) for s in entry.sources)).to(dtype)
        if on_read is not None:
            pending += sum(src.nbytes(s) for s in entry.sources)
            if pending >= PROGRESS_BYTES:
                on_read(pending)
                pending = 0
    if on_read is not None and pending:
        on_read(pending)
    src.release_buffer()
    left = assign_state(model, state)
    if left:
        raise CheckpointError(f"{label}: tensors left unloaded: {_fmt_keys(left)}")
    return model


def check_plan(src: TensorSource, plan: dict[str, Entry], expected: dict[str, tuple[int, ...]], *, scope: set[str],
               ignored: set[str], label: str) -> None:
    """Before anything is read: the file's keys (missing, unexpected), then every shape, then every dtype, each kind
    of problem raised as one CheckpointError naming the keys."""
    if set(plan) != set(expected):
        raise AssertionError(f"{label}: read plan and model disagree: {_fmt_keys(set(plan) ^ set(expected))}")
    needed = {s for e in plan.values() for s in e.sources}
    missing, unexpected = needed - src.keys(), scope - needed - set(ignored)
    if missing or unexpected:
        parts = [f"{len(missing)} missing: {_fmt_keys(missing)}"] if missing else []
        parts += [f"{len(unexpected)} unexpected: {_fmt_keys(unexpected)}"] if unexpected else []
        raise CheckpointError(f"{label} does not match the expected network: " + "; ".join(parts))
    wrong = [f"{entry.sources[0]}: file {_file_shapes(src, entry)}, expected {expected[key]}"
             for key, entry in plan.items() if _made_shape(src, entry) != expected[key]]
    if wrong:
        raise CheckpointError(f"{len(wrong)} tensors of {label} have the wrong shape: " + "; ".join(wrong[:8])
                              + (f" ... (+{len(wrong) - 8} more)" if len(wrong) > 8 else ""))
    not_float = sorted(f"{s} ({src.dtype(s)})" for s in needed if src.dtype(s) not in FLOAT_DTYPES)
    if not_float:
        raise CheckpointError(f"{len(not_float)} tensors of {label} are not floating point, expected F32, F16 or "
                              f"BF16: {_fmt_keys(not_float)}")


def _file_shapes(src: TensorSource, entry: Entry):
    """The file's shape of an entry's tensor, or of its sources (a combined entry), as an error names them."""
    shapes = tuple(src.shape(s) for s in entry.sources)
    return shapes[0] if entry.combine is None else shapes


def _made_shape(src: TensorSource, entry: Entry):
    """The shape an entry makes from the file's tensors (the sources' shapes where they cannot combine)."""
    shapes = [src.shape(s) for s in entry.sources]
    if entry.combine is None:
        return shapes[0]
    try:
        if entry.shape is not None:
            return tuple(entry.shape(*shapes))
        return tuple(entry.combine(*(torch.empty(s, device="meta") for s in shapes)).shape)
    except RuntimeError:
        return tuple(shapes)


def assign_state(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Make each tensor of `state` the model's parameter (requires_grad=False) or buffer of that name, as
    `load_state_dict(state, strict=True, assign=True)` does once keys and shapes are checked (`load_planned` checks
    them first), and put every module in eval mode, in one pass over the modules and one over the keys (torch's
    walks of every module with every key, then `eval()` and `requires_grad_()`, cost 0.04-0.08 s of a 0.15 s UNet
    load). Returns the names of the parameters and buffers still on the meta device (none if `state` is complete)."""
    modules = dict(model.named_modules())
    for key, value in state.items():
        owner, _, leaf = key.rpartition(".")
        module = modules[owner]
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        elif leaf in module._buffers and leaf not in module._non_persistent_buffers_set:
            module._buffers[leaf] = value
        else:
            raise AssertionError(f"{key} is neither a parameter nor a saved buffer of the model")
    left = []
    for name, module in modules.items():
        module.training = False
        left += [f"{name}.{k}".lstrip(".") for k, t in (*module._parameters.items(), *module._buffers.items())
                 if t is not None and t.is_meta]
    return left


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector paused while a model is built and loaded (and restored as it was): building
    the UNet leaves ~27k tracked objects, whose allocation sets off collections that each walk every live object,
    more so beside an already loaded model (docs/SPEED.md). Reference counting frees the tensors as ever; only cycles
    wait. Meant for svdlite's own module building: an import inside it (open_clip's, say) would leave its cycles, and
    their finalizers, to a collection in the middle of sampling."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
