"""Test tasks whose batches are not (tensor, tensor): the same regression problem and the same initial
weights in every shape, so that the shape is the only difference between runs."""
from __future__ import annotations

import collections
import contextlib
import dataclasses

import torch
from torch import nn
from torch.utils.data import Dataset

from ddptrain import Task
from ddptrain.losses import squared_error

MODELS: list[nn.Module] = []


class TwoInputs(nn.Module):
    """forward(a, b): 5 numeric features and 3 more, as two inputs."""

    def __init__(self, own_loss: bool = False):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(5, 16), nn.Linear(3, 16), nn.Linear(16, 1)
        self.own_loss = own_loss

    def forward(self, a, b, labels=None):
        out = self.head(torch.tanh(self.a(a) + self.b(b)))
        if self.own_loss:  # as a Hugging Face model does
            return {"loss": nn.functional.mse_loss(out, labels), "logits": out}
        return out


class Nested(TwoInputs):
    def forward(self, a, rest):
        return super().forward(a, rest[0])


class OneInput(TwoInputs):
    def forward(self, x):
        return super().forward(x[:, :5], x[:, 5:])


@dataclasses.dataclass
class Item:
    a: torch.Tensor
    b: torch.Tensor
    labels: torch.Tensor


Record = collections.namedtuple("Record", ["a", "b", "labels"])


class Items(Dataset):
    def __init__(self, x, y, shape):
        self.x, self.y, self.shape = x, y, shape

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        a, b, y = self.x[i, :5], self.x[i, 5:], self.y[i]
        return {
            "pair": lambda: (self.x[i], y),
            "tuple": lambda: ((a, b), y),
            "dict": lambda: ({"a": a, "b": b}, y),
            "nested": lambda: ({"a": a, "rest": [b]}, y),
            "hf": lambda: {"a": a, "b": b, "labels": y},
            "own_loss": lambda: {"a": a, "b": b, "labels": y},
            "dataclass": lambda: Item(a, b, y),
            "namedtuple": lambda: Record(a, b, y),
            "triple": lambda: (a, b, y),
        }[self.shape]()


def _output(out):
    return out["logits"] if isinstance(out, dict) else out


def shapes(cfg) -> Task:
    """task_args.shape picks how items look; the data, the initial weights and the loss are the same."""
    shape = cfg.task_args.get("shape", "pair")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(160, 8, generator=g)
    y = torch.tanh(x @ torch.randn(8, 1, generator=g)) + 0.05 * torch.randn(160, 1, generator=g)
    torch.manual_seed(cfg.seed)
    # task_args.meta: built on the meta device, for ddptrain to give it the same weights (models.materialize)
    with torch.device("meta") if cfg.task_args.get("meta") else contextlib.nullcontext():
        model = {"pair": OneInput, "nested": Nested}.get(shape, TwoInputs)(own_loss=shape == "own_loss")
    MODELS.append(model)
    train, val = Items(x[:96], y[:96], shape), Items(x[96:], y[96:], shape)
    step = None
    if cfg.task_args.get("custom_step"):
        step = distillation_step()
    return Task(model=model, train=train, val=val, test=val, step=step,
                loss="model" if shape == "own_loss" else None if step else nn.functional.mse_loss,
                metrics={"mse": lambda out, t: squared_error(_output(out), t)})


def distillation_step():
    """Two losses, one of them against a frozen teacher that is not part of the trained model."""
    teacher = nn.Linear(8, 1)
    for p in teacher.parameters():
        p.requires_grad_(False)

    def step(model, batch):
        (a, b), y = batch
        out = model(a, b)
        soft = teacher.to(a.device)(torch.cat([a, b], 1))
        return nn.functional.mse_loss(out, y) + 0.1 * nn.functional.mse_loss(out, soft), out, y
    return step


class CausalLM(nn.Module):
    """A one-block causal self-attention LM whose mask (-inf above the diagonal) is a persistent buffer."""

    def __init__(self, vocab: int = 16, block: int = 12, width: int = 32):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, width), nn.Parameter(0.02 * torch.randn(block, width))
        self.attn = nn.MultiheadAttention(width, 2, batch_first=True, dropout=0.1)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(block))

    def forward(self, idx):
        h = self.embed(idx) + self.pos[: idx.shape[1]]
        t = idx.shape[1]
        h = h + self.attn(h, h, h, attn_mask=self.mask[:t, :t], need_weights=False)[0]
        return self.head(h)


class Sequences(Dataset):
    """Counting sequences modulo vocab from random starts: the next token is learnable."""

    def __init__(self, n, block, vocab, seed, as_dict=False):
        g = torch.Generator().manual_seed(seed)
        starts, steps = torch.randint(0, vocab, (n, 1), generator=g), torch.randint(1, 3, (n, 1), generator=g)
        self.data = (starts + steps * torch.arange(block + 1)) % vocab
        self.as_dict = as_dict

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i, :-1], self.data[i, 1:]
        return {"idx": x, "labels": y} if self.as_dict else (x, y)


def causal_lm(cfg) -> Task:
    a = cfg.task_args
    model = CausalLM()
    MODELS.append(model)
    as_dict = a.get("dict", False)
    return Task(model=model, train=Sequences(128, 12, 16, 1, as_dict), val=Sequences(40, 12, 16, 2, as_dict),
                test=Sequences(40, 12, 16, 3, as_dict),
                metrics={"accuracy": lambda out, y: (out.argmax(-1) == y).float()})


def gpt2(cfg) -> Task:
    """A real Hugging Face GPT-2 (2 layers, random weights, no download) that computes its own loss."""
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    MODELS.append(model)

    class HF(Sequences):
        def __getitem__(self, i):
            return {"input_ids": self.data[i, :-1], "labels": self.data[i, :-1]}

    return Task(model=model, train=HF(96, 12, 16, 1), val=HF(32, 12, 16, 2), loss="model",
                metrics={"accuracy": lambda out, y: (out.logits[:, :-1].argmax(-1) == y[:, 1:]).float()})


class TinyLM(nn.Module):
    """Embeddings and a head, no dropout: its training depends on the data alone."""

    def __init__(self, vocab: int = 16, width: int = 8):
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, width), nn.Linear(width, vocab)

    def forward(self, idx):
        return self.head(torch.tanh(self.embed(idx)))


class Padded(Dataset):
    """Sequences of 1 to `block` tokens, padded: inputs with 0, labels with -100 (uneven tokens per sample)."""

    def __init__(self, n, block, vocab, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(1, vocab, (n, block), generator=g)
        self.y = (3 * self.x + 1) % vocab
        pad = torch.arange(block) >= torch.randint(1, block + 1, (n, 1), generator=g)
        self.x[pad], self.y[pad] = 0, -100

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def padded_lm(cfg) -> Task:
    torch.manual_seed(cfg.seed)
    model = TinyLM()
    if cfg.task_args.get("tied"):  # the head's weight is the embedding's
        model.head.weight = model.embed.weight
    MODELS.append(model)
    return Task(model=model, train=Padded(64, 10, 16, 1), val=Padded(37, 10, 16, 2), test=Padded(37, 10, 16, 3))


class OwnLossLM(TinyLM):
    """TinyLM computing its own loss as a Hugging Face model does: the sum over the labels that are not -100
    divided by `num_items_in_batch` when given, else their mean."""

    def forward(self, input_ids, labels=None, num_items_in_batch=None):
        logits = super().forward(input_ids)
        reduction = "mean" if num_items_in_batch is None else "sum"
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                           reduction=reduction)
        return {"loss": loss if num_items_in_batch is None else loss / num_items_in_batch, "logits": logits}


class MeanLossLM(TinyLM):
    """Its own loss, always the mean over the labels that are not -100; `num_items_in_batch` it does not take."""

    def forward(self, input_ids, labels=None):
        logits = super().forward(input_ids)
        return {"loss": nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()), "logits": logits}


class KwargsMeanLM(MeanLossLM):
    """Takes **kwargs, so it seems to take num_items_in_batch, but its loss is the mean all the same."""

    def forward(self, input_ids, labels=None, **kwargs):
        return super().forward(input_ids, labels)


class PaddedRecords(Padded):
    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.y[i]}


OWN_LOSS_MODELS = {"num_items": OwnLossLM, "mean": MeanLossLM, "kwargs": KwargsMeanLM}


def padded_own_loss(cfg) -> Task:
    """padded_lm's data and initial weights, as Hugging Face batches for a model that computes its own loss
    (task_args.variant names which of OWN_LOSS_MODELS)."""
    torch.manual_seed(cfg.seed)
    model = OWN_LOSS_MODELS[cfg.task_args.get("variant", "num_items")]()
    MODELS.append(model)
    return Task(model=model, train=PaddedRecords(64, 10, 16, 1), val=PaddedRecords(37, 10, 16, 2),
                test=PaddedRecords(37, 10, 16, 3), loss="model")


class WeightedItems(Items):
    """(x, (y, w)): a per-sample weight travels in the target, for the task's weighted loss."""

    def __getitem__(self, i):
        return self.x[i], (self.y[i], 0.5 + self.x[i, :1].abs())


def weighted(cfg) -> Task:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(48, 8, generator=g)
    y = x[:, :1] - x[:, 1:2]
    torch.manual_seed(cfg.seed)
    model = OneInput()
    MODELS.append(model)

    def weighted_mse(out, target):
        y, w = target
        return (w * (out - y) ** 2).mean()
    val = WeightedItems(x[32:], y[32:], None)
    return Task(model=model, train=WeightedItems(x[:32], y[:32], None), val=val, test=val,
                loss=weighted_mse, metrics={"mse": lambda out, t: squared_error(out, t[0])})
