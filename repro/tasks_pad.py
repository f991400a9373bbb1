"""Padded, variable-length sequences for the hunt's repros."""
import torch
from torch import nn
from torch.utils.data import Dataset
from ddptrain import Task

MODELS = []


class TinyLM(nn.Module):
    def __init__(self, vocab=16, width=8, own_loss=False):
        super().__init__()
        self.embed, self.head, self.own_loss = nn.Embedding(vocab, width), nn.Linear(width, vocab), own_loss

    def forward(self, idx, labels=None):
        out = self.head(torch.tanh(self.embed(idx)))
        if self.own_loss:
            return {"loss": nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), labels.reshape(-1)), "logits": out}
        return out


class Padded(Dataset):
    """Sequences of length 1..T, labels padded with -100 (very uneven token counts per sample)."""

    def __init__(self, n, T=10, vocab=16, seed=0, as_dict=False):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(1, vocab, (n, T), generator=g)
        self.y = (self.x * 3 + 1) % vocab
        lengths = torch.randint(1, T + 1, (n,), generator=g)
        mask = torch.arange(T) >= lengths[:, None]
        self.x[mask], self.y[mask] = 0, -100
        self.as_dict = as_dict

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"idx": self.x[i], "labels": self.y[i]} if self.as_dict else (self.x[i], self.y[i])


def padded(cfg):
    a = cfg.task_args
    torch.manual_seed(cfg.seed)
    own = a.get("own_loss", False)
    model = TinyLM(own_loss=own)
    MODELS.append(model)
    d = own or a.get("dict", False)
    return Task(model=model, train=Padded(a.get("n_train", 64), seed=1, as_dict=d),
                val=Padded(a.get("n_val", 37), seed=2, as_dict=d), test=Padded(a.get("n_val", 37), seed=3, as_dict=d),
                loss="model" if own else None,
                metrics={"accuracy": lambda out, y: ((out["logits"] if isinstance(out, dict) else out).argmax(-1) == y).float()})
