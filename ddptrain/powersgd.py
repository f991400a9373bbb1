"""PowerSGD (dist.comm_hook: powersgd) with a state that survives a restart: torch's hook, keyed per parameter.

torch's PowerSGD keeps two things across steps for each DDP gradient bucket, by the bucket's index: the error
feedback (flat over the bucket's gradients) and the warm-start factors Q (one m x r block per compressed
gradient, grouped by shape). DDP lays its buckets out anew in every process, and again after the first
backward, so a bucket index names other gradients after a restart. `PowerSGD.hook`, which DDP calls instead
of torch's hook, notes which parameters each bucket holds; when the layout changes (a restart, DDP's rebuild)
the state is cut into per-parameter pieces by the old layout and put together again by the new one. The
checkpoint holds the pieces, so a resumed run continues bitwise where the killed one was.
"""
from __future__ import annotations

import torch
from torch import nn

from .state import numpy_state, saveable_numpy_state


class PowerSGD:
    def __init__(self, state, module: nn.Module):
        self.state = state
        self.names = {id(p): name for name, p in module.named_parameters()}
        self.layout: dict[int, list[tuple[str, torch.Size]]] = {}  # bucket index -> its gradients, in order
        self.pieces: dict[str, dict[str, torch.Tensor]] = {"error": {}, "q": {}}  # by parameter, to be put back

    def hook(self, state, bucket):
        """DDP's comm hook: torch's powerSGD_hook, on a bucket whose state follows its parameters."""
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook
        layout = [(self.names[id(p)], p.shape) for p in bucket.parameters()]
        index = bucket.index()
        if self.layout.get(index) != layout:
            if index in self.layout:  # another layout: every bucket's state goes back into pieces first
                self._cut_all()
            self._assemble(index, layout)
            self.layout[index] = layout
        return powerSGD_hook.powerSGD_hook(state, bucket)

    def _compressed(self, layout: list[tuple[str, torch.Size]]) -> list[tuple[str, int, int]]:
        """The gradients PowerSGD compresses in a bucket, in the order of their blocks (grouped by shape, as
        torch's hook does), with the sizes of their P (n x r) and Q (m x r) blocks."""
        from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _should_compress
        by_shape: dict[tuple, list[tuple[str, int, int]]] = {}
        for name, shape in layout:
            n = shape[0]
            m = shape.numel() // n
            r = min(n, m, self.state.matrix_approximation_rank)
            if _should_compress(n, m, r, self.state.min_compression_rate)[0]:
                by_shape.setdefault((n, m), []).append((name, n * r, m * r))
        return [block for blocks in by_shape.values() for block in blocks]

    def _cut_all(self) -> None:
        """Every bucket's error feedback and Q, cut into per-parameter pieces by the layout they were made in."""
        s = self.state
        for index, layout in self.layout.items():
            error, q = s.error_dict.pop(index, None), s.q_memory_dict.pop(index, None)
            s.p_memory_dict.pop(index, None)
            sizes = [shape.numel() for _, shape in layout]
            if error is not None and len(error) == sum(sizes):
                for (name, shape), piece in zip(layout, error.split(sizes)):
                    self.pieces["error"][name] = piece.view(shape)
            blocks = self._compressed(layout)
            if q is not None and len(q) == sum(b[2] for b in blocks):
                for (name, _, _), piece in zip(blocks, q.split([b[2] for b in blocks])):
                    self.pieces["q"][name] = piece
        self.layout = {}

    def _assemble(self, index: int, layout: list[tuple[str, torch.Size]]) -> None:
        """Put a bucket's state together from the pieces of its parameters, where there are pieces for all."""
        s, error, q = self.state, self.pieces["error"], self.pieces["q"]
        if layout and all(name in error for name, _ in layout):
            s.error_dict[index] = torch.cat([error.pop(name).reshape(-1) for name, _ in layout])
        blocks = self._compressed(layout)
        if blocks and all(name in q for name, _, _ in blocks):
            s.q_memory_dict[index] = torch.cat([q.pop(name) for name, _, _ in blocks])
            # P is computed afresh from Q at every step; its presence says "warm-started: do not draw a new Q"
            s.p_memory_dict[index] = s.q_memory_dict[index].new_empty(sum(b[1] for b in blocks))

    def skipped(self) -> None:
        """After a step skipped for non-finite gradients (nonfinite=skip, fp16's scaler): the buckets' error feedback
        and warm-start Q that it made non-finite start afresh (zero, a new random Q), as before the first step;
        kept, they would be added to every later step's gradients and skip it too. They are the same on every
        rank (made from all-reduced factors), so every rank drops the same ones."""
        s = self.state
        for index in [i for i, error in s.error_dict.items() if not torch.isfinite(error).all()]:
            del s.error_dict[index]
        for index in [i for i, q in s.q_memory_dict.items() if not torch.isfinite(q).all()]:
            del s.q_memory_dict[index], s.p_memory_dict[index]  # no P: torch draws a new Q

    # ---- a per-rank checkpoint part ----
    def state_dict(self) -> dict:
        self._cut_all()  # the pieces are the state; the buckets are put together again at their next step
        s = self.state
        return {"iter": s.iter, "error": dict(self.pieces["error"]), "q": dict(self.pieces["q"]),
                "rng": saveable_numpy_state(s.rng.get_state())}

    def load_state_dict(self, saved: dict) -> None:
        s = self.state
        s.iter, s.error_dict, s.p_memory_dict, s.q_memory_dict = saved["iter"], {}, {}, {}
        s.rng.set_state(numpy_state(saved["rng"]))
        self.pieces, self.layout = {"error": dict(saved["error"]), "q": dict(saved["q"])}, {}

    def load_other_world_size(self, states: list, rank: int) -> None:
        """Each rank's error feedback is its own; a new rank takes the last saved one's."""
        self.load_state_dict(states[min(rank, len(states) - 1)])
