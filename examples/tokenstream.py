"""A token stream: the language-model example's text files read as a stream, tokenized and packed into
fixed-length sequences on the fly, never held in memory as a whole.

The files are the source of the standard-library modules that `charlm.py` uses (no download). Tokens are
UTF-8 bytes (a vocabulary of 256: no pass over the data to build one). Each rank's each DataLoader worker
reads its own files (`ddptrain.shard`), appends their bytes to a buffer and cuts it into windows of
`block + 1` tokens (x = window[:-1], y = window[1:]), the next window starting where this one's input
ended, across file boundaries in training. Validation and test windows are cut within each file (its
last incomplete window is left out), so they are the same windows for any number of ranks and workers:
packed across the files of a part, they would depend on which files share a part. The pass ends on
every rank when the first rank's files are used up.

The stream's state is how many of its part's tokens it has consumed: resumed, it skips whole files by
their size without reading them and starts in the middle of the next, so a resume costs no re-reading.

Split, by regions against leakage: the first 80% of each file trains, the next `data.test_fraction` tests,
the last `data.val_fraction` validates (streams too). task_args: block (64), n_layer (2), n_embd (96),
n_head (4), dropout (0.0). Metric: bits per byte.
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset

import ddptrain

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from charlm import MODULES, CharGPT  # noqa: E402  the model of the character-level example


class TokenStream(IterableDataset):
    """Windows of `block` + 1 byte tokens from the region [start, end) (fractions) of each file; across files
    (training) or within each (validation and test)."""

    def __init__(self, paths: list[str], block: int, start: float, end: float, across_files: bool = True):
        self.paths, self.block, self.start, self.end = paths, block, start, end
        self.across_files = across_files
        self.consumed = 0   # tokens of this part's stream that windows have moved past, in this pass
        self.resume_at = 0  # set by load_state_dict: where the next pass starts

    def region(self, size: int) -> slice:
        return slice(int(self.start * size), int(self.end * size))

    def __iter__(self):
        start, self.resume_at = self.resume_at, 0
        self.consumed, before = start, 0  # `before`: tokens of this part in the files passed so far
        buffer = torch.empty(0, dtype=torch.long)
        for path in ddptrain.shard(self.paths):
            cut = self.region(os.path.getsize(path))
            n = cut.stop - cut.start
            if before + n <= start:  # wholly before the resume point: not even opened
                before += n
                continue
            with open(path, "rb") as f:
                tokens = torch.frombuffer(bytearray(f.read()[cut]), dtype=torch.uint8).long()
            tokens, before = tokens[max(start - before, 0):], before + n
            buffer = torch.cat([buffer, tokens]) if self.across_files else tokens
            while len(buffer) > self.block:
                window, buffer = buffer[:self.block + 1], buffer[self.block:]
                self.consumed += self.block
                yield window[:-1].clone(), window[1:].clone()

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.resume_at = state["consumed"]


def bits_per_byte(out, y):
    return F.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(1) / math.log(2)


def build(cfg) -> ddptrain.Task:
    args = cfg.task_args
    block = args.get("block", 64)
    paths = [importlib.util.find_spec(name).origin for name in MODULES]
    test_at = 1 - cfg.data.val_fraction - cfg.data.test_fraction
    val_at = 1 - cfg.data.val_fraction
    model = CharGPT(256, block, args.get("n_layer", 2), args.get("n_embd", 96), args.get("n_head", 4),
                    args.get("dropout", 0.0))
    return ddptrain.Task(model=model, train=TokenStream(paths, block, 0.0, test_at),
                         val=TokenStream(paths, block, val_at, 1.0, across_files=False),
                         test=TokenStream(paths, block, test_at, val_at, across_files=False),
                         metrics={"bpb": bits_per_byte})
