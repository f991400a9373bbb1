"""Tabular regression with a two-input model: numeric features plus embedded categorical columns.

Data: scikit-learn's bundled diabetes dataset (442 patients, no download), in its raw units. `sex` (two
values) becomes category 0/1 and `age` is bucketed into `task_args.age_buckets` (4) quantile categories;
the other eight columns (bmi, bp, s1-s6) are numeric features. Target: disease progression one year on.
Numeric features and the target are standardised with the training split's mean and std; the age buckets
use its quantiles. Split: ddptrain.split over patients (data.val_fraction, data.test_fraction, data.split_seed).

Items are ((num, cat), y): num float (8,), cat long (2,) = (sex, age bucket), y float (1,); the model is
called as model(num, cat). task_args: hidden (64), emb_dim (3), dropout (0.1), age_buckets (4).
Metrics: mse (in standardised units) and r2.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

import ddptrain
from ddptrain.data import check_fractions
from ddptrain.losses import R2, squared_error


class Patients(Dataset):
    def __init__(self, num: torch.Tensor, cat: torch.Tensor, y: torch.Tensor):
        self.num, self.cat, self.y = num, cat, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return (self.num[i], self.cat[i]), self.y[i]


class TabularNet(nn.Module):
    """One embedding per categorical column, concatenated with the numeric features, then an MLP."""

    def __init__(self, n_num: int, cardinalities: list[int], emb_dim: int = 3, hidden: int = 64,
                 dropout: float = 0.1):
        super().__init__()
        self.embs = nn.ModuleList(nn.Embedding(c, emb_dim) for c in cardinalities)
        self.mlp = nn.Sequential(nn.Linear(n_num + emb_dim * len(cardinalities), hidden), nn.ReLU(),
                                 nn.Dropout(dropout), nn.Linear(hidden, 1))

    def forward(self, num, cat):  # num (B, n_num) float, cat (B, n_cat) long -> (B, 1)
        embedded = [emb(cat[:, j]) for j, emb in enumerate(self.embs)]
        return self.mlp(torch.cat([num, *embedded], dim=1))


def build(cfg) -> ddptrain.Task:
    from sklearn.datasets import load_diabetes

    args = cfg.task_args
    n_buckets = args.get("age_buckets", 4)
    data = load_diabetes(scaled=False)
    x = torch.tensor(data.data, dtype=torch.float32)
    age, sex, num = x[:, 0].contiguous(), x[:, 1], x[:, 2:]  # columns: age, sex, bmi, bp, s1..s6
    y = torch.tensor(data.target, dtype=torch.float32).unsqueeze(1)
    check_fractions(cfg.data, len(y))
    train, val, test = ddptrain.split(range(len(y)), [cfg.data.val_fraction, cfg.data.test_fraction],
                                      seed=cfg.data.split_seed)
    tr = torch.tensor(train.indices)
    # Statistics from the training patients only, so nothing leaks from val and test.
    num = (num - num[tr].mean(0)) / num[tr].std(0)
    y = (y - y[tr].mean()) / y[tr].std()
    edges = torch.quantile(age[tr], torch.linspace(0, 1, n_buckets + 1)[1:-1])
    cat = torch.stack([(sex > sex.min()).long(), torch.bucketize(age, edges)], dim=1)
    ds = Patients(num, cat, y)
    parts = [torch.utils.data.Subset(ds, p.indices) if len(p) else None for p in (train, val, test)]
    model = TabularNet(num.shape[1], [2, n_buckets], args.get("emb_dim", 3), args.get("hidden", 64),
                       args.get("dropout", 0.1))
    return ddptrain.Task(model=model, train=parts[0], val=parts[1], test=parts[2], loss=None,
                         metrics={"mse": squared_error, "r2": R2()})
