"""Per-layer gradient norms at log steps, to make vanishing and exploding gradients visible.

`layers()` lists the model's layers once at start; `layer_norms()` measures each layer's gradient norm
with one host sync (and, under FSDP, one all-reduce), cheap enough to run at every log step.
"""
from __future__ import annotations

import torch
from torch import nn

from .dist import Dist
from .optim import local


def layers(module: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """The layers of `module` in module order: each submodule with trainable parameters of its own, named by its
    qualified name (`blocks.0.attn.qkv`; the root itself is `(root)`), with those parameters.

    Call it once, on the module as it trains (after `fully_shard`, whose sharded parameters replace the
    originals) but without the DDP or `torch.compile` wrapper, whose `module.` / `_orig_mod.` prefixes would
    otherwise start every name. A parameter shared by several modules (tied embeddings) belongs to the
    first only, as in `module.parameters()`, so the layers' squared norms add up to the global norm's.
    """
    seen: set[int] = set()
    out = []
    for name, m in module.named_modules():
        own = [p for p in m.parameters(recurse=False) if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in own)
        if own:
            out.append((name or "(root)", own))
    return out


def layer_norms(layers: list[tuple[str, list[nn.Parameter]]], dist: Dist | None = None) -> dict[str, float]:
    """The L2 norm of each layer's gradients (all its parameters' together; a gradient of None counts 0),
    computed in float32, as {layer name: norm}, with one host sync for all layers.

    The norms are of the gradients as they are: call it after the gradient scaler's `unscale_` (under fp16,
    before it they are multiplied by the scale) and before the optimizer step zeroes them. Between unscaling
    and clipping they split the logged pre-clip `grad_norm` (the root of their squares' sum); after clipping
    they are the clipped gradients' norms.
    `dist`: under FSDP, where each rank holds a shard of every gradient, the run's Dist, whose one
    all-reduce of the squared norms makes them global and the same on every rank: then call on all ranks.
    Under DDP (gradients already all-reduced, identical on every rank) and on one process, pass None:
    no collective.
    """
    if not layers:
        return {}
    grads, owner = [], []  # this rank's part of every gradient, and the index of its layer
    for i, (_, params) in enumerate(layers):
        for p in params:
            if p.grad is not None:
                grads.append(local(p.grad))
                owner.append(i)
    device = grads[0].device if grads else local(layers[0][1][0]).device
    squares = torch.zeros(len(layers), dtype=torch.float32, device=device)
    if grads:
        # One fused kernel for all the per-tensor norms instead of one per parameter; float32 even for fp16 or
        # bf16 gradients, whose squares would overflow (fp16) or round away.
        norms = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))
        squares.index_add_(0, torch.tensor(owner, device=device), norms.square())
    if dist is not None:
        # Squared norms of disjoint shards add up to the squared norm of the whole gradient.
        squares = dist.all_reduce_sum(squares.to(dist.device))
    return dict(zip((name for name, _ in layers), squares.sqrt().tolist()))
