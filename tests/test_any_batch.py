"""Any model, any batch: tuple, dict, nested, record and HF-style batches, a model's own loss, a custom
step, sequence models with a causal mask, optimizers by import path; all on real gloo ranks."""
import json
import os

import pytest
import torch
from torch import nn

from ddptrain import checkpoint
from ddptrain.batch import on_cpu, to_device
from ddptrain.config import DataConfig
from ddptrain.configfile import from_dict
from ddptrain.data import pinned
from ddptrain.dist import detect
from ddptrain.task import TaskError
from ddptrain.run import run

from killing import kill_and_resume, train_rank
from multirank import run_ranks

BASE = {"task": "tasks_any_batch:shapes", "data": {"batch_size": 16}, "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "train": {"epochs": 3, "log_every": 2}, "checkpoint": {"every_epochs": 0, "save_best": False}}


def with_(base, **sections):
    out = dict(base)
    for section, values in sections.items():
        out[section] = {**out.get(section, {}), **values} if isinstance(values, dict) else values
    return out


def every_shape(rank, runs_dir, shapes):
    """One run per shape in the same processes, each on a port of its own: a rank that finishes first would
    otherwise meet the previous run's store, still open on the other rank, when it starts the next run."""
    results, port = {}, int(os.environ.get("MASTER_PORT", 0))
    for i, s in enumerate(shapes):
        if port:
            os.environ["MASTER_PORT"] = str(port + i)
        results[s] = train_rank(rank, runs_dir, with_(BASE, task_args={"shape": s}, name=s))
    return results


def assert_close_runs(a, b, atol=1e-6):
    for k in a["weights"]:
        torch.testing.assert_close(a["weights"][k], b["weights"][k], rtol=0, atol=atol, msg=lambda m: f"{k}: {m}")
    for split in ("val", "test"):
        assert a["summary"][split] == pytest.approx(b["summary"][split], rel=1e-5), split


def test_every_batch_shape_trains_like_a_pair_of_tensors_on_one_and_two_ranks(tmp_path):
    shapes = ["tuple", "dict", "nested", "hf", "own_loss", "dataclass", "namedtuple"]
    one = run_ranks(every_shape, 1, tmp_path / "one", ["pair", *shapes], timeout=120)[0]
    reference = one["pair"]
    assert reference["summary"]["val"]["mse"] < 0.5 * one["pair"]["summary"]["val"]["loss"] + 1  # it trained
    for shape in shapes:
        assert_close_runs(one[shape], reference)
    two = run_ranks(every_shape, 2, tmp_path / "two", ["nested", "hf", "own_loss"], timeout=120)
    for shape in ("nested", "hf", "own_loss"):
        assert_close_runs(two[0][shape], reference)
        assert all(torch.equal(two[0][shape]["weights"][k], two[1][shape]["weights"][k]) for k in reference["weights"])


def test_a_target_with_per_sample_weights_is_validated_on_one_and_two_ranks(tmp_path):
    """(x, (y, w)): the validation's float64 loss casts the target's tensors, not the tuple."""
    cfg = with_(BASE, task="tasks_any_batch:weighted", data={"batch_size": 8, "eval_batch_size": 4}, train={"epochs": 1})
    one = run_ranks(train_rank, 1, tmp_path / "one", cfg)[0]
    two = run_ranks(train_rank, 2, tmp_path / "two", cfg)[0]
    assert_close_runs(two, one)


def test_an_item_of_another_shape_asks_for_a_step_function(tmp_path):
    cfg = from_dict(with_(BASE, task_args={"shape": "triple"}, runs_dir=str(tmp_path)))
    with pytest.raises(TaskError, match=r"a batch must be an \(input, target\) pair or a dict/dataclass/named tuple "
                                        r"with 'labels', got list\(Tensor\(2, 5\), Tensor\(2, 3\), Tensor\(2, 1\)\); "
                                        r"for other shapes give the task a `step\(model, batch\)` function"):
        run(cfg, detect({}))


def test_a_custom_step_with_a_frozen_teacher_accumulates_like_one_big_batch(tmp_path):
    cfg = with_(BASE, task_args={"shape": "tuple", "custom_step": True})
    big = run_ranks(train_rank, 1, tmp_path / "big", cfg)[0]
    accum = run_ranks(train_rank, 1, tmp_path / "accum", with_(cfg, train={**cfg["train"], "grad_accum_steps": 4}))[0]
    both = run_ranks(train_rank, 2, tmp_path / "both", with_(cfg, train={**cfg["train"], "grad_accum_steps": 2}))
    assert_close_runs(accum, big)
    assert_close_runs(both[0], big)
    plain = run_ranks(train_rank, 1, tmp_path / "plain", with_(BASE, task_args={"shape": "tuple"}))[0]
    assert (big["weights"]["head.weight"] - plain["weights"]["head.weight"]).abs().max() > 1e-4  # the step mattered


LM = {"task": "tasks_any_batch:causal_lm", "data": {"batch_size": 16}, "loss": {"name": "cross_entropy"},
      "optim": {"name": "adamw", "lr": 0.01}, "train": {"epochs": 3, "log_every": 2},
      "checkpoint": {"every_steps": 5}, "early_stop": {"monitor": "val_accuracy", "mode": "max"}, "dist": {"timeout_s": 20}}


def test_a_causal_mask_lm_checkpoints_resumes_bitwise_after_sigkill_and_is_tested(tmp_path):
    summary = kill_and_resume(tmp_path, with_(LM, task_args={"dict": True}), kill_at=13)
    assert summary["status"] == "completed" and summary["tested_weights"] == "best"
    assert summary["test"]["accuracy"] > 0.3 and summary["tokens_per_s"] > 0  # chance is 1/16
    assert (tmp_path / "killed" / "r" / "checkpoints" / "best.pt").exists()
    train = [json.loads(line) for line in open(tmp_path / "killed" / "r" / "metrics.jsonl")
             if '"train"' in line]
    assert all(e["tokens_per_s"] > 0 for e in train)


def test_a_token_mean_loss_on_padded_sequences_trains_alike_on_any_world_size_and_accumulation(tmp_path):
    """The gradient is the mean over all the step's counted tokens, not a mean of each rank's micro-batch means."""
    cfg = {"task": "tasks_any_batch:padded_lm", "data": {"batch_size": 16}, "loss": {"name": "cross_entropy"},
           "optim": {"name": "sgd", "lr": 0.5}, "train": {"epochs": 2, "log_every": 2},
           "checkpoint": {"every_epochs": 0, "save_best": False}}
    one = run_ranks(train_rank, 1, tmp_path / "one", cfg)[0]
    two = run_ranks(train_rank, 2, tmp_path / "two", with_(cfg, train={**cfg["train"], "grad_accum_steps": 2}))[0]
    assert_close_runs(two, one)


OWN = {"task": "tasks_any_batch:padded_own_loss", "data": {"batch_size": 16}, "optim": {"name": "sgd", "lr": 0.5},
       "train": {"epochs": 2, "log_every": 2}, "checkpoint": {"every_epochs": 0, "save_best": False}}
VARIANTS = ("num_items", "mean", "kwargs")  # takes num_items_in_batch; does not; takes **kwargs but ignores it


def in_turn(rank, runs_dir, cfgs: dict):
    """One run per named config in the same processes, each on a port of its own (see every_shape)."""
    results, port = {}, int(os.environ.get("MASTER_PORT", 0))
    for i, (name, cfg) in enumerate(cfgs.items()):
        if port:
            os.environ["MASTER_PORT"] = str(port + i)
        results[name] = train_rank(rank, runs_dir, {**cfg, "name": name})
    return results


def own_loss_runs(**sections) -> dict:
    return {v: with_(OWN, task_args={"variant": v}, **sections) for v in VARIANTS}


def test_a_models_own_loss_on_padded_sequences_trains_alike_on_any_world_size_and_accumulation(tmp_path):
    """A Hugging Face-style loss, a mean over the labels that are not -100 (or their sum over num_items_in_batch),
    trains like the built-in token-mean cross entropy: the gradient is the mean over all the step's counted tokens
    for 1 rank x 16, 2 ranks x 8 and 2 micro-batches of 8; validation is a token mean for any eval batch size."""
    builtin = run_ranks(train_rank, 1, tmp_path / "ce", {**OWN, "task": "tasks_any_batch:padded_lm",
                                                         "loss": {"name": "cross_entropy"}})[0]
    one = run_ranks(in_turn, 1, tmp_path / "one", own_loss_runs(), timeout=120)[0]
    accum = run_ranks(in_turn, 1, tmp_path / "accum", own_loss_runs(train={"grad_accum_steps": 2}), timeout=120)[0]
    two = run_ranks(in_turn, 2, tmp_path / "two", own_loss_runs(data={"eval_batch_size": 5}), timeout=120)
    for v in VARIANTS:
        assert_close_runs(one[v], builtin)  # the same TinyLM, data and initial weights
        assert_close_runs(accum[v], one[v])
        assert_close_runs(two[0][v], one[v])
        assert all(torch.equal(two[0][v]["weights"][k], two[1][v]["weights"][k]) for k in one[v]["weights"])


def test_the_logged_loss_of_a_models_own_loss_is_the_token_mean(tmp_path):
    """Over a log interval (here an epoch of 4 steps at a negligible lr), train loss = the sum of all token losses /
    the tokens, on 2 ranks x 2 micro-batches; val and test losses too, with an eval batch that cuts the set unevenly."""
    from tasks_any_batch import OWN_LOSS_MODELS, PaddedRecords

    cfgs = own_loss_runs(optim={"lr": 1e-12}, train={"epochs": 1, "log_every": 4, "grad_accum_steps": 2},
                         data={"eval_batch_size": 5})
    two = run_ranks(in_turn, 2, tmp_path, cfgs, timeout=120)[0]
    for v in VARIANTS:
        model = OWN_LOSS_MODELS[v]()
        model.load_state_dict(two[v]["weights"])

        def token_mean(data):
            with torch.no_grad():
                return float(model(data.x, data.y)["loss"])  # the mean over all the set's counted tokens
        logged = [json.loads(line) for line in open(tmp_path / v / "metrics.jsonl") if '"train"' in line]
        assert len(logged) == 1
        assert logged[0]["loss"] == pytest.approx(token_mean(PaddedRecords(64, 10, 16, 1)), rel=1e-5)
        assert two[v]["summary"]["val"]["loss"] == pytest.approx(token_mean(PaddedRecords(37, 10, 16, 2)), rel=1e-5)
        assert two[v]["summary"]["test"]["loss"] == pytest.approx(token_mean(PaddedRecords(37, 10, 16, 3)), rel=1e-5)


def test_whether_a_model_takes_num_items_in_batch_is_read_from_its_forward_once(tmp_path, diagnostics):
    """A named parameter or **kwargs (Hugging Face's contract), unless the model's accepts_loss_kwargs says no; a
    forward whose loss ignores it is found by the pre-flight check, and its mean is weighted instead."""
    from ddptrain.batch import takes_num_items
    from ddptrain.task import build, prepare, resolve
    from tasks_any_batch import KwargsMeanLM, MeanLossLM, OwnLossLM

    refused = KwargsMeanLM()
    refused.accepts_loss_kwargs = False
    assert takes_num_items(OwnLossLM()) and takes_num_items(KwargsMeanLM())
    assert not takes_num_items(MeanLossLM()) and not takes_num_items(refused)
    for variant, takes in {"num_items": True, "mean": False, "kwargs": False}.items():
        cfg = from_dict(with_(OWN, task_args={"variant": variant}, runs_dir=str(tmp_path)))
        assert prepare(cfg, build(cfg, resolve(cfg.task)))[0].num_items is takes
    assert len(diagnostics) == 1 and "its loss does not divide by it; ddptrain weights its loss, a mean, by its " \
        "tokens instead (set accepts_loss_kwargs = False on the model to say so)" in diagnostics[0]


def test_a_causal_lm_counts_the_labels_it_predicts_as_hugging_faces_trainer_does():
    """GPT-2's loss shifts its labels: position 0 is never a target, so it is not counted; given that count as
    num_items_in_batch, its loss is its own mean."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ddptrain.batch import Forward
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=16, n_embd=32, n_layer=2, n_head=2)).eval()
    ids = torch.randint(0, 16, (3, 6))
    labels = torch.where(torch.arange(6) < torch.tensor([[6], [4], [1]]), ids, -100)
    batch = {"input_ids": ids, "labels": labels}
    forward = Forward("model", model=model)
    assert forward.num_items and forward.shifts and forward.counted(batch) == 5 + 3 + 0
    with torch.no_grad():
        own = forward(model, batch)
        given = forward(model, batch, num_items=forward.counted(batch))
    assert int(own.weight) == 8 and given.num_items == 8
    torch.testing.assert_close(given.loss, own.loss)
    assert forward.counted({**batch, "shift_labels": labels}) == 6 + 4 + 1  # shifted by the collator: as they are
    assert Forward("model", model=nn.Linear(2, 2)).counted(batch) == 6 + 4 + 1  # other models: every label kept


def test_a_hugging_face_model_trains_on_its_own_loss_and_resumes_bitwise(tmp_path):
    import transformers  # noqa: F401  a dev dependency; imported here once, not in each forked rank
    cfg = {"task": "tasks_any_batch:gpt2", "data": {"batch_size": 16}, "optim": {"name": "adamw", "lr": 0.003},
           "train": {"epochs": 3, "log_every": 2}, "checkpoint": {"every_steps": 4}, "dist": {"timeout_s": 20}}
    summary = kill_and_resume(tmp_path, cfg, kill_at=10)
    assert summary["val"]["loss"] < 2.6  # below the uniform guess over 16 tokens, ln 16 = 2.77


def test_an_optimizer_and_a_schedule_by_import_path_train_and_resume_bitwise(tmp_path):
    cfg = with_(BASE, task_args={"shape": "dict"}, optim={"name": "torch.optim.NAdam", "lr": 0.01, "args": {"momentum_decay": 0.003}},
                sched={"name": "torch.optim.lr_scheduler:ExponentialLR", "args": {"gamma": 0.95}},
                train={"epochs": 3, "log_every": 1}, checkpoint={"every_steps": 4}, dist={"timeout_s": 20})
    summary = kill_and_resume(tmp_path, cfg, kill_at=10)
    state = checkpoint.load(checkpoint.step_files(tmp_path / "killed" / "r" / "checkpoints")[-1])
    assert "mu_product" in state["optimizer"]["state"][0]  # NAdam's own state was checkpointed
    lrs = [json.loads(line)["lr"] for line in open(tmp_path / "killed" / "r" / "metrics.jsonl") if '"train"' in line]
    assert lrs[:3] == pytest.approx([0.01 * 0.95, 0.01 * 0.95 ** 2, 0.01 * 0.95 ** 3])
    assert summary["steps"] == 18


def test_an_optimizer_path_that_does_not_import_is_a_config_error(tmp_path):
    from ddptrain.config import ConfigError
    cfg = from_dict(with_(BASE, optim={"name": "no_such_pkg.Opt"}, runs_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="config key 'optim.name': cannot import 'no_such_pkg'"):
        run(cfg, detect({}))


def test_mapping_batches_of_other_types_reach_the_device_as_default_collate_rebuilds_them():
    """A defaultdict (whose constructor takes a factory first) or a UserDict with attributes of its own, as a
    Hugging Face BatchEncoding is, keeps its type; a read-only mapping that cannot be made from a dict is a dict."""
    import collections

    class Encoding(collections.UserDict):
        n_sequences = None

    class Frozen(collections.abc.Mapping):
        def __init__(self, values, tag):
            self.values, self.tag = values, tag

        def __getitem__(self, k):
            return self.values[k]

        def __iter__(self):
            return iter(self.values)

        def __len__(self):
            return len(self.values)

    meta = torch.device("meta")
    moved = to_device(collections.defaultdict(list, {"labels": torch.ones(2)}), meta)
    assert type(moved) is collections.defaultdict and moved["labels"].is_meta and moved["other"] == []
    encoding = Encoding({"input_ids": torch.ones(2, 3)})
    encoding.n_sequences = 1
    moved = to_device(encoding, meta)
    assert type(moved) is Encoding and moved.n_sequences == 1 and moved["input_ids"].is_meta
    assert not encoding["input_ids"].is_meta  # the item itself is left as it was
    moved = to_device(Frozen({"x": torch.ones(1)}, "t"), meta)
    assert type(moved) is dict and moved["x"].is_meta


def test_only_batches_of_cpu_tensors_are_pinned():
    """A dataset that makes CUDA tensors itself has nothing to pin (the loader's pin_memory would fail on
    them); a meta tensor stands in for a non-CPU one here."""
    cfg, cuda = DataConfig(batch_size=4), torch.device("cuda")
    cpu_batch = {"x": torch.ones(2, 3), "pair": (torch.ones(2), [torch.zeros(2, dtype=torch.long)]), "n": 3}
    assert on_cpu(cpu_batch) and pinned(cfg, cuda, on_cpu(cpu_batch))
    assert not on_cpu({**cpu_batch, "pair": (torch.ones(2, device="meta"),)})
    assert not pinned(cfg, cuda, False) and not pinned(cfg, torch.device("cpu"), True)
    assert not pinned(DataConfig(batch_size=4, pin_memory=False), cuda, True)


def test_the_loader_collates_plain_items_with_torchs_own_function_and_records_field_by_field():
    import dataclasses
    from torch.utils.data import default_collate
    from ddptrain.batch import collate, collate_for

    @dataclasses.dataclass
    class Item:
        x: torch.Tensor

    t = torch.zeros(2)
    for plain in (t, (t, t), [t, 1], {"x": t}, {"x": (t, t)}):
        assert collate_for(plain) is default_collate, plain
    for record in (Item(t), (Item(t), t), [t, Item(t)], {"x": Item(t)}):
        assert collate_for(record) is collate, record
    assert collate_for(Item(t))([Item(t), Item(t + 1)]).x.tolist() == [[0, 0], [1, 1]]
