"""Character-level language model: a small GPT-style decoder trained on Python source, reporting bpc.

The text is the source of a fixed, sorted list of standard-library modules (found with importlib, read
from this interpreter's own installation: no download), about 480 KB; the vocabulary is its sorted set of
characters. The exact text, and so the numbers, may differ a little between Python versions.

Split, by contiguous regions against leakage: within each file, the last `data.val_fraction` of its
characters goes to validation, the `data.test_fraction` before that to test, the rest to training (so
`data.split_seed` plays no part). Each split is cut into windows of `block` characters: item i is
x = text[i*stride : i*stride+block] and y = the same window shifted by one character. Training windows
overlap (stride `task_args.stride`, default block // 2); validation and test windows do not.

task_args: block (64), n_layer (2), n_embd (96), n_head (4), dropout (0.0), stride (block // 2),
batch ("tuple": items are (x, y); "dict": items are {"idx": x, "labels": y}).
Metric: bpc, bits per character (mean cross entropy over the window / ln 2).
"""
from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

import ddptrain
from ddptrain.data import check_fractions

MODULES = sorted(["argparse", "dataclasses", "difflib", "fractions", "functools", "heapq", "json.decoder",
                  "json.encoder", "shutil", "statistics", "textwrap"])


def read_sources() -> list[str]:
    """The text of each module in MODULES, in order."""
    texts = []
    for name in MODULES:
        with open(importlib.util.find_spec(name).origin, encoding="utf-8") as f:
            texts.append(f.read())
    return texts


class Windows(Dataset):
    """Windows of `block` characters every `stride` characters; the target is the input shifted by one."""

    def __init__(self, ids: torch.Tensor, block: int, stride: int, as_dict: bool = False):
        self.ids, self.block, self.stride, self.as_dict = ids, block, stride, as_dict

    def __len__(self):
        return (len(self.ids) - self.block - 1) // self.stride + 1

    def __getitem__(self, i):
        chunk = self.ids[i * self.stride: i * self.stride + self.block + 1]
        x, y = chunk[:-1], chunk[1:]
        return {"idx": x, "labels": y} if self.as_dict else (x, y)


class Block(nn.Module):
    """Pre-norm transformer block: causal multi-head self-attention, then an MLP, each residual."""

    def __init__(self, n_embd: int, n_head: int, block: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.qkv, self.proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd),
                                 nn.Dropout(dropout))
        # 0 on and below the diagonal, -inf above: position t attends to positions <= t only.
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(block))

    def attention(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask[:T, :T],
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(B, T, C))

    def forward(self, x):
        x = x + self.attention(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    def __init__(self, vocab: int, block: int = 64, n_layer: int = 2, n_embd: int = 96, n_head: int = 4,
                 dropout: float = 0.0):
        super().__init__()
        assert n_embd % n_head == 0, "n_embd must be divisible by n_head"
        self.block = block
        self.tok, self.pos = nn.Embedding(vocab, n_embd), nn.Embedding(block, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, block, dropout) for _ in range(n_layer))
        self.ln, self.head = nn.LayerNorm(n_embd), nn.Linear(n_embd, vocab)

    def forward(self, idx):  # idx: (B, T) character ids, T <= block -> logits (B, T, vocab)
        T = idx.shape[1]
        x = self.drop(self.tok(idx) + self.pos(torch.arange(T, device=idx.device)))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def bpc(out, y):
    return F.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(1) / math.log(2)


def build(cfg) -> ddptrain.Task:
    args = cfg.task_args
    block = args.get("block", 64)
    stride = args.get("stride", max(1, block // 2))
    as_dict = args.get("batch", "tuple") == "dict"
    texts = read_sources()
    chars = sorted(set("".join(texts)))
    stoi = {c: i for i, c in enumerate(chars)}
    parts = {"train": [], "val": [], "test": []}
    for text in texts:
        n = len(text)
        n_val, n_test = int(n * cfg.data.val_fraction), int(n * cfg.data.test_fraction)
        cut_test, cut_val = n - n_val - n_test, n - n_val
        parts["train"].append(text[:cut_test])
        parts["test"].append(text[cut_test:cut_val])
        parts["val"].append(text[cut_val:])
    data = {}
    for split, pieces in parts.items():
        ids = torch.tensor([stoi[c] for c in "".join(pieces)], dtype=torch.long)
        data[split] = Windows(ids, block, stride if split == "train" else block, as_dict) if len(ids) > block else None
    # Samples are windows: a share of the text shorter than one window holds none of them.
    check_fractions(cfg.data, (sum(map(len, texts)) - 1) // block, [len(data[k] or []) for k in ("val", "test")])
    model = CharGPT(len(chars), block, args.get("n_layer", 2), args.get("n_embd", 96), args.get("n_head", 4),
                    args.get("dropout", 0.0))
    return ddptrain.Task(model=model, train=data["train"], val=data["val"], test=data["test"], loss=None,
                         metrics={"bpc": bpc})
