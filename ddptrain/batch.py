"""The batch seam: the one place that turns a batch into a loss, an output and a target.

A batch is whatever the DataLoader yields: a tensor, tuples, lists, dicts, named tuples, dataclasses,
nested as deep as they like. How it reaches the model is decided here and nowhere else:
- `(input, target)`: `model(input)`, `model(*input)` for a tuple or list, `model(**input)` for a dict;
- a dict, dataclass or named tuple (a record): the field `target_key` (default `labels`) is the target
  and the other fields are keyword arguments, `model(**rest)`;
- `loss="model"`: the model computes its own loss (Hugging Face style); a record goes in whole,
  labels included, and the loss is read from `output.loss` or `output["loss"]`; with sequence labels
  (integer, 2+ dimensions) it is a mean over the labels that are not -100, or, for a model that takes
  `num_items_in_batch` (`takes_num_items`), its sum over them divided by the `num_items` it is given;
- a task's own `step(model, batch)` for everything else; it returns the loss, or `(loss, output, target)`.
The number of samples of a batch is the first dimension of its target, or, without a target, of the
first tensor in the batch.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import default_collate


def is_record(x) -> bool:
    return isinstance(x, Mapping) or (dataclasses.is_dataclass(x) and not isinstance(x, type)) or \
        (isinstance(x, tuple) and hasattr(x, "_fields"))


def fields(record) -> dict:
    if isinstance(record, Mapping):
        return dict(record)
    if isinstance(record, tuple):
        return record._asdict()
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}


def _rebuild(like, values: dict):
    """A record like `like` with these values; a mapping as torch's default_collate rebuilds one (a defaultdict, a
    UserDict keep their type and attributes), or a plain dict where its type cannot be made from one."""
    if type(like) is dict:
        return values
    if isinstance(like, MutableMapping):
        clone = copy.copy(like)
        clone.update(values)
        return clone
    if isinstance(like, Mapping):
        try:
            return type(like)(values)
        except TypeError:
            return values
    return type(like)(**values)


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], batch):
    """`batch` with `fn` applied to every tensor in it, its structure (and record types) unchanged."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if type(batch) in (tuple, list):
        return type(batch)(map_tensors(fn, b) for b in batch)
    if is_record(batch):
        return _rebuild(batch, {k: map_tensors(fn, v) for k, v in fields(batch).items()})
    return batch


def to_device(batch, device: torch.device, non_blocking: bool = True):
    """`batch` with every tensor in it on `device`, its structure (and record types) unchanged."""
    return map_tensors(lambda t: t.to(device, non_blocking=non_blocking), batch)


def _double(t: torch.Tensor) -> torch.Tensor:
    return t.double() if t.is_floating_point() else t


def collate(items: list):
    """torch's default_collate, plus dataclass items (collated field by field)."""
    first = items[0]
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        return type(first)(**{f.name: collate([getattr(i, f.name) for i in items]) for f in dataclasses.fields(first)})
    if isinstance(first, Mapping) and any(dataclasses.is_dataclass(v) for v in first.values()):
        return {k: collate([i[k] for i in items]) for k in first}
    if type(first) in (tuple, list) and any(dataclasses.is_dataclass(v) for v in first):
        return [collate(list(parts)) for parts in zip(*items)]
    return default_collate(items)


def collate_for(item) -> Callable[[list], Any]:
    """The collate function for items like `item`: torch's own where `collate` would come to it, so that the
    loader does not repeat collate's checks at every batch."""
    if (dataclasses.is_dataclass(item) or isinstance(item, Mapping) and any(map(dataclasses.is_dataclass, item.values()))
            or type(item) in (tuple, list) and any(map(dataclasses.is_dataclass, item))):
        return collate
    return default_collate


def tensors(x) -> Iterator[torch.Tensor]:
    """The tensors in `x`, depth first, through tuples, lists and records."""
    if isinstance(x, torch.Tensor):
        yield x
        return
    for v in fields(x).values() if is_record(x) else x if isinstance(x, (tuple, list)) else ():
        yield from tensors(v)


def first_tensor(x) -> torch.Tensor | None:
    return next(tensors(x), None)


def on_cpu(x) -> bool:
    """Every tensor in `x` is on the CPU (the loader can pin such a batch; a dataset's CUDA tensors it cannot)."""
    return all(t.device.type == "cpu" for t in tensors(x))


def call(model: Callable, inputs):
    """The model on `inputs`: unpacked as positional arguments (tuple, list) or keywords (dict)."""
    if isinstance(inputs, torch.Tensor):  # the common case first: a Mapping check is an ABC's, slow
        return model(inputs)
    if type(inputs) in (tuple, list):
        return model(*inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def model_loss(output) -> torch.Tensor:
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if loss is None:
        raise ValueError(f"the model's output ({type(output).__name__}) has no `.loss` or ['loss']; with "
                         f"loss 'model' the model must compute its own loss (pass it the labels)")
    return loss


IGNORED = -100  # the label that a model's own loss does not count (Hugging Face's ignore_index)


def takes_num_items(model: nn.Module) -> bool:
    """Whether a model that computes its own loss takes `num_items_in_batch`, as Hugging Face's Trainer decides:
    its `accepts_loss_kwargs` where it has one, else a forward with that parameter or with `**kwargs`."""
    accepts = getattr(model, "accepts_loss_kwargs", None)
    if accepts is not None:
        return bool(accepts)
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "num_items_in_batch" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def shifts_labels(model: nn.Module) -> bool:
    """Whether the model's own loss is Hugging Face's causal-LM loss, which predicts labels[..., 1:] (position 0 is
    never a target), so that only those are counted, as the Trainer counts them. Read from the loss function the
    model uses (GPT-2's `loss_type` is None, yet it shifts); not for an encoder-decoder, whose labels are aligned."""
    losses = sys.modules.get("transformers.loss.loss_utils")  # imported with any Hugging Face model: never here
    if losses is None or getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return False
    return getattr(model, "loss_function", None) is getattr(losses, "ForCausalLMLoss", False)


def _sequence(t) -> bool:
    """An integer target of two or more dimensions: classes of (B, T, ...) tokens."""
    return isinstance(t, torch.Tensor) and t.dim() >= 2 and not t.is_floating_point()


@dataclass
class Computed:
    """One micro-batch's result: the loss (a mean), what metrics see, and how much it counts."""
    loss: torch.Tensor
    output: Any = None
    target: Any = None
    samples: int = 0
    weight: torch.Tensor | int = 0   # what the loss is a mean over: samples, or counted classes (tokens, a tensor)
    tokens: int = 0                  # target elements of a sequence target (B, T, ...); 0 otherwise
    num_items: float | None = None   # the num_items_in_batch a model divided its summed loss by (not a mean, then)


class Forward:
    """Computes a micro-batch's loss by the task's rules (see the module docstring)."""

    def __init__(self, loss_fn, step: Callable | None = None, target_key: str = "labels",
                 model: nn.Module | None = None):
        """`model`: the bare network, whose own loss (`loss_fn="model"`) may take `num_items_in_batch`."""
        self.loss_fn, self.step, self.target_key = loss_fn, step, target_key
        self.own_loss = loss_fn == "model"
        self.weigh = getattr(loss_fn, "weight", None)  # the built-in cross entropy counts its targets (tokens)
        # decided once, from the forward's signature, not per step
        hf = self.own_loss and step is None and model is not None
        self.num_items, self.shifts = hf and takes_num_items(model), hf and shifts_labels(model)
        self.flops_per_sample = 0  # the model's forward FLOPs per sample, counted by the pre-flight check
        self.cpu_batches = True  # the pre-flight check's training batch held CPU tensors only (they can be pinned)

    def split(self, batch) -> tuple[Any, Any]:
        """(model inputs, target) of a batch; the target is None when there is none."""
        if type(batch) in (list, tuple) and len(batch) == 2:  # the common case first: a named tuple is not it
            return batch[0], batch[1]
        if is_record(batch):
            values = fields(batch)
            target = values.get(self.target_key)
            if self.own_loss:
                return values, target
            return {k: v for k, v in values.items() if k != self.target_key}, target
        raise TypeError(f"a batch must be an (input, target) pair or a dict/dataclass/named tuple with "
                        f"'{self.target_key}', got {describe(batch)}; for other shapes give the task a "
                        f"`step(model, batch)` function")

    def _own_labels(self, values: dict):
        """The labels that a model's own loss counts, as Hugging Face's Trainer takes them: `shift_labels` where the
        batch has them, else the labels, less their first position for a causal LM (which shifts them)."""
        if "shift_labels" in values:
            return values["shift_labels"]
        labels = values.get(self.target_key)
        return labels[..., 1:] if self.shifts and _sequence(labels) else labels

    def counted(self, batch) -> int | None:
        """The targets that a sequence loss counts in `batch` (its tokens, from the target alone): the built-in one's,
        or the labels not -100 of a record for a model's own loss; None when the loss is a mean over samples."""
        if self.step is not None or (self.weigh is None and not self.own_loss):
            return None
        if self.own_loss:
            labels = self._own_labels(fields(batch)) if is_record(batch) else None
            return int((labels != IGNORED).sum()) if _sequence(labels) else None
        target = self.split(batch)[1]
        if not _sequence(target):
            return None
        return int(self.weigh(None, target))

    def __call__(self, model, batch, precise: bool = False, num_items: float | None = None) -> Computed:
        """`precise` (evaluation): the loss is taken in float64, so its sums do not depend on batching.
        `num_items`: the model's `num_items_in_batch` (where `self.num_items`), what it divides its summed loss by."""
        weight = None
        if self.step is not None:
            result = self.step(model, batch)
            loss, output, target = result if isinstance(result, (tuple, list)) else (result, None, None)
        else:
            inputs, target = self.split(batch)
            if num_items is not None:
                inputs = {**inputs, "num_items_in_batch": num_items}
            output = call(model, inputs)
            if self.own_loss:
                loss = model_loss(output)
                labels = self._own_labels(inputs) if is_record(batch) else None
                if _sequence(labels):  # what the loss is a mean (or sum) over: a device tensor, no host sync
                    weight = (labels != IGNORED).sum()
            elif precise and isinstance(output, torch.Tensor) and output.is_floating_point():
                loss = self.loss_fn(output.double(), map_tensors(_double, target))  # a target may be (y, weights)
            else:
                loss = self.loss_fn(output, target)
        if isinstance(target, torch.Tensor):
            dims = target.dim()
            samples = target.shape[0] if dims else 1
            tokens = target.numel() if dims >= 2 and not target.is_floating_point() else 0
        else:
            lead = first_tensor(batch if target is None else target)
            samples, tokens = lead.shape[0] if lead is not None and lead.dim() else 1, 0
        if weight is None:
            weight = self.weigh(output, target) if self.weigh is not None else samples
        return Computed(loss, output, target, samples, weight, tokens, num_items)


def describe(x, depth: int = 0) -> str:
    """A short structural description of a batch, for error messages: tuple(Tensor(2, 8), dict(a=...))."""
    if isinstance(x, torch.Tensor):
        return f"Tensor{tuple(x.shape)}"
    if depth > 2:
        return type(x).__name__
    if is_record(x):
        inner = ", ".join(f"{k}={describe(v, depth + 1)}" for k, v in list(fields(x).items())[:6])
        return f"{type(x).__name__}({inner})"
    if isinstance(x, (tuple, list)):
        return f"{type(x).__name__}({', '.join(describe(v, depth + 1) for v in x[:6])})"
    return type(x).__name__
