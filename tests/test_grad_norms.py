"""Per-layer gradient norms: exact against a hand computation, the same under FSDP2 on 2 real gloo ranks as on
one unsharded process (with one all-reduce), and drawn by `ddptrain plot` as a layers-by-steps heat map."""
import json
import math
import os

import pytest
import torch
from torch import nn

from ddptrain.dist import Dist, detect
from ddptrain.grad_norms import layer_norms, layers

from multirank import run_ranks

NAMES = ["0", "2", "4"]  # the Linear layers of `model()`, in module order


def model() -> nn.Sequential:
    # Linear(8, 3) and Linear(3, 1) do not split evenly over 2 ranks: rank 1 holds no rows of the last weight.
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3), nn.ReLU(), nn.Linear(3, 1))


def backward(net: nn.Module) -> None:
    torch.manual_seed(1)
    x, y = torch.randn(16, 5), torch.randn(16, 1)
    nn.functional.mse_loss(net(x), y).backward()


def test_layer_norms_equal_a_hand_computation():
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    torch.manual_seed(0)
    net(torch.randn(10, 4)).pow(2).sum().backward()
    found = layers(net)
    assert [name for name, _ in found] == ["0", "2"]
    assert [params for _, params in found] == [[net[0].weight, net[0].bias], [net[2].weight, net[2].bias]]
    norms = layer_norms(found)
    assert list(norms) == ["0", "2"] and all(type(v) is float for v in norms.values())
    for name in ("0", "2"):
        w, b = net[int(name)].weight, net[int(name)].bias
        expected = torch.linalg.vector_norm(torch.cat([w.grad.flatten(), b.grad.flatten()])).item()
        assert expected > 0 and norms[name] == pytest.approx(expected, rel=1e-6, abs=1e-6), name
    # the layers split the global norm: their squares add up to what clipping measures
    total = nn.utils.get_total_norm([p.grad for p in net.parameters()]).item()
    assert math.sqrt(sum(v * v for v in norms.values())) == pytest.approx(total, rel=1e-6)


def test_frozen_unused_and_tied_parameters():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(7, 4)
            self.frozen = nn.Linear(4, 4)
            self.frozen.requires_grad_(False)
            self.unused = nn.Linear(4, 4)
            self.head = nn.Linear(4, 7, bias=False)
            self.head.weight = self.embed.weight  # tied: counted once, in the first module that has it
            self.scale = nn.Parameter(torch.ones(()))  # the root's own parameter

        def forward(self, tokens):
            return self.head(self.frozen(self.embed(tokens))) * self.scale

    net = Tied()
    net(torch.tensor([1, 2, 3])).sum().backward()
    found = layers(net)
    assert [name for name, _ in found] == ["(root)", "embed", "unused"]
    norms = layer_norms(found)
    assert norms["unused"] == 0.0  # grads of None count 0
    assert norms["embed"] == pytest.approx(net.embed.weight.grad.norm().item(), rel=1e-6)
    assert norms["(root)"] == pytest.approx(abs(net.scale.grad.item()), rel=1e-6)


def test_fp16_gradients_are_measured_in_float32():
    net = nn.Linear(64, 64).half()
    for p in net.parameters():
        p.grad = torch.full_like(p, 300.0)  # the weight's norm squared, 19200², overflows float16
    (norm,) = layer_norms(layers(net)).values()
    assert norm == pytest.approx(300 * math.sqrt(64 * 64 + 64), rel=1e-6)


class CountingDist(Dist):
    """The real Dist, counting its all-reduces."""
    all_reduces = 0

    def all_reduce_sum(self, tensor):
        self.all_reduces += 1
        return super().all_reduce_sum(tensor)


def fsdp_layer_norms(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    dist = CountingDist(detect(os.environ), torch.device("cpu"), "gloo", 60, 60)
    try:
        mesh = init_device_mesh("cpu", (2,))
        net = model()
        for layer in net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(net, mesh=mesh)
        found = layers(net)
        sharded = [type(p).__name__ for _, params in found for p in params]
        local_rows = [p.to_local().shape[0] for _, params in found for p in params]
        backward(net)
        norms = layer_norms(found, dist)
        return {"norms": norms, "all_reduces": dist.all_reduces, "sharded": sharded, "local_rows": local_rows}
    finally:
        dist.close()


def test_fsdp_norms_are_global_and_equal_on_every_rank():
    ranks = run_ranks(fsdp_layer_norms, 2, timeout=90)
    reference = model()
    backward(reference)
    expected = layer_norms(layers(reference))
    for r in ranks:
        assert set(r["sharded"]) == {"DTensor"}, "the parameters must be FSDP's sharded DTensors"
        assert r["all_reduces"] == 1
    # the shards really are partial: each rank alone would see only part of every gradient
    assert [a + b for a, b in zip(ranks[0]["local_rows"], ranks[1]["local_rows"])] == [8, 8, 3, 3, 1, 1]
    assert ranks[1]["local_rows"][4] == 0
    assert ranks[0]["norms"] == ranks[1]["norms"]
    assert list(ranks[0]["norms"]) == NAMES
    for name in NAMES:
        assert ranks[0]["norms"][name] == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name


def test_plot_draws_a_heat_map_of_grad_norms(tmp_path):
    import matplotlib.image
    from ddptrain.plot import plot
    events = []
    for step in (2, 4, 6, 8):
        norms = {"blocks.0.attn.qkv": 10.0 ** -step, "blocks.0.mlp": 0.0 if step == 4 else 1.5, "head": 3.0}
        events.append({"split": "train", "step": step, "epoch": 0, "loss": 1 / step, "lr": 0.1, "grad_norms": norms})
    events.append({"split": "val", "step": 8, "epoch": 0, "loss": 0.2})
    run = tmp_path / "with_norms"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "metrics.jsonl").write_text(
        "".join(json.dumps({k: v for k, v in e.items() if k != "grad_norms"}) + "\n" for e in events))

    fig = plot([plain], tmp_path / "plain.png")
    assert [ax.get_title() for ax in fig.axes] == ["loss", "monitored validation metric", "learning rate"]
    assert matplotlib.image.imread(tmp_path / "plain.png").shape[:2] == (450, 1600)

    out = tmp_path / "norms.png"
    fig = plot([plain, run], out)
    assert out.stat().st_size > 20_000
    image = matplotlib.image.imread(out)
    assert image.shape[0] > 450 and image[450:].std() > 0.05  # something drawn below the curves
    (heat,) = [ax for ax in fig.axes if "gradient norms" in ax.get_title()]
    assert heat.get_title().startswith("with_norms")
    assert [t.get_text() for t in heat.get_yticklabels()] == ["blocks.0.attn.qkv", "blocks.0.mlp", "head"]
    assert heat.get_ylim()[0] > heat.get_ylim()[1]  # the first layer on top
    (mesh,) = heat.collections
    cells = mesh.get_array()  # layers x steps of log10(norm); the zero is masked, not -inf
    assert cells.shape == (3, 4) and cells.mask.sum() == 1 and bool(cells.mask[1, 1])
    assert cells[0].tolist() == pytest.approx([-2, -4, -6, -8])
    assert any(ax.get_ylabel() == "log10 gradient norm" for ax in fig.axes)  # the colorbar


def test_plot_takes_nan_losses_as_numbers_the_monitor_from_the_config_and_checks_its_output_first(tmp_path, capsys):
    """metrics.jsonl writes a NaN loss as "nan"; a run without a summary yet has its config's monitor; -o makes
    its directory, and a directory or an unknown format is one line before anything is drawn."""
    from ddptrain.cli import main
    run = tmp_path / "diverging"
    run.mkdir()
    events = [{"split": "train", "step": s, "epoch": 0, "loss": loss, "lr": 0.1} for s, loss in
              ((1, 2.0), (2, "nan"), (3, 1.5))] + [{"split": "val", "step": 3, "epoch": 0, "loss": 1.2, "r2": 0.3}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (run / "config.yaml").write_text("early_stop: {monitor: val_r2}\n")
    out = tmp_path / "new" / "dir" / "curves.svg"
    assert main(["plot", str(run), "-o", str(out)]) == 0 and out.stat().st_size > 0
    assert capsys.readouterr().out == f"wrote {out}\n"

    from ddptrain.plot import plot
    ax_loss, ax_metric, _ = plot([run], tmp_path / "again.png").axes
    train = ax_loss.lines[0].get_ydata()
    assert train.dtype.kind == "f" and math.isnan(train[1]) and train[2] == 1.5
    assert ax_metric.lines[0].get_label() == "diverging val_r2" and list(ax_metric.lines[0].get_ydata()) == [0.3]

    for bad, expected in ((tmp_path, f"-o '{tmp_path}': is a directory; expected a file name"),
                          (tmp_path / "curves.txt", f"-o '{tmp_path / 'curves.txt'}': expected a file name ending in "
                                                    f"one of ")):
        assert main(["plot", str(run), "-o", str(bad)]) == 2
        assert capsys.readouterr().err.startswith(f"ddptrain: error: {expected}")


def test_plot_skips_a_last_line_cut_short_and_a_damaged_line_before_it_is_one_line(tmp_path, capsys):
    """A run killed mid-write (or still writing) leaves its last line of metrics.jsonl cut short."""
    from ddptrain.cli import main
    run = tmp_path / "killed"
    run.mkdir()
    lines = [json.dumps({"split": "train", "step": s, "epoch": 0, "loss": 1 / s, "lr": 0.1}) for s in (1, 2)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"split": "train", "st')
    from ddptrain.plot import plot
    ax_loss, _, _ = plot([run], tmp_path / "curves.png").axes
    assert list(ax_loss.lines[0].get_xdata()) == [1, 2]
    (run / "metrics.jsonl").write_text(lines[0] + '\n{"split": "tr\n' + lines[1] + "\n")
    assert main(["plot", str(run), "-o", str(tmp_path / "curves.png")]) == 2
    assert capsys.readouterr().err == f"ddptrain: error: '{run / 'metrics.jsonl'}' line 2: not a JSON object " \
                                      f"(damaged?)\n"


@pytest.mark.parametrize("name, text, expected", [
    ("summary.json", '{"status": "compl', "'{}': not a JSON object (damaged?)"),
    ("summary.json", "[1, 2]", "'{}': not a JSON object (damaged?)"),
    ("config.yaml", "early_stop: [", "config file '{}': cannot parse: ")])
def test_plot_of_a_damaged_summary_or_config_is_one_line(tmp_path, capsys, name, text, expected):
    from ddptrain.cli import main
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"split": "train", "step": 1, "epoch": 0, "loss": 1.0}) + "\n")
    (run / name).write_text(text)
    assert main(["plot", str(run), "-o", str(tmp_path / "curves.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ddptrain: error: " + expected.format(run / name)) and err.count("\n") == 1, err


def test_plot_of_a_run_of_one_train_event_draws_its_point_and_no_empty_legend(tmp_path, recwarn):
    from ddptrain.plot import plot
    run = tmp_path / "no_val"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"split": "train", "step": 1, "epoch": 0, "loss": 1.0, "lr": 0.1}))
    ax_loss, ax_metric, ax_lr = plot([run], tmp_path / "curves.png").axes
    assert ax_loss.get_legend() is not None and ax_metric.get_legend() is None
    assert ax_loss.lines[0].get_marker() == ax_lr.lines[0].get_marker() == "o"  # one point: a line showed nothing
    assert [str(w.message) for w in recwarn] == []
