"""Pure units: config loading and errors, environment detection, early stopping, splits, schedules."""
import re

import pytest
import torch

from ddptrain import config as C
from ddptrain import configfile as CF
from ddptrain.config import ConfigError
from ddptrain.data import ShardSampler, split
from ddptrain.dist import DistEnv, detect
from ddptrain.early_stop import EarlyStopping


def test_defaults_file_and_overrides_take_precedence_in_order(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("optim:\n  lr: 1e-3\n  name: sgd\ntrain:\n  epochs: 3\n")
    cfg = CF.load(f, ["optim.lr=0.5", "--train.epochs=7", "model.hidden=[8, 4]"])
    assert cfg.optim.lr == 0.5 and cfg.optim.name == "sgd"  # override > file > default
    assert cfg.train.epochs == 7 and cfg.model.hidden == [8, 4]
    assert cfg.optim.weight_decay == 0.0  # default
    assert cfg.name == "exp"  # run name from the file's stem
    assert CF.load(f).optim.lr == 1e-3  # YAML 1.1 reads 1e-3 as a string; it is still a float


def test_toml_config(tmp_path):
    f = tmp_path / "exp.toml"
    f.write_text('task = "diabetes"\n[optim]\nlr = 0.01\n[train]\nprecision = "bf16"\n')
    cfg = CF.load(f)
    assert (cfg.task, cfg.optim.lr, cfg.train.precision) == ("diabetes", 0.01, "bf16")


def test_a_number_given_for_a_name_is_that_name():
    assert CF.load(None, ["name=2024", "task=7"]).name == "2024"


def test_print_config_round_trips():
    cfg = CF.from_dict({"optim": {"lr": 0.1}})
    import yaml
    assert CF.from_dict(yaml.safe_load(CF.dump_yaml(cfg))) == cfg


@pytest.mark.parametrize("data, message", [
    ({"optim": {"lrr": 0.1}}, "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
    ({"trian": {}}, "unknown config key 'trian'; did you mean 'train'?"),
    ({"optim": {"lr": -1}}, "config key 'optim.lr': expected > 0, got -1.0"),
    ({"optim": {"lr": "fast"}}, "config key 'optim.lr': expected a number, got 'fast'"),
    ({"optim": {"lr": float("inf")}}, "config key 'optim.lr': expected a finite number, got inf"),
    ({"optim": {"eps": "inf"}}, "config key 'optim.eps': expected a finite number, got 'inf'"),
    ({"optim": {"name": "adagrad"}}, "config key 'optim.name': expected sgd, adam, adamw, rmsprop or an import path such as torch.optim.NAdam or my_pkg.opt:Lion, got 'adagrad'"),
    ({"train": {"precision": "fp8"}}, "config key 'train.precision': expected one of 'fp32', 'bf16', 'fp16', got 'fp8'"),
    ({"train": {"epochs": 2.5}}, "config key 'train.epochs': expected an integer, got 2.5"),
    ({"train": {"compile": "yes"}}, "config key 'train.compile': expected true or false, got 'yes'"),
    ({"early_stop": {"patience": -1}}, "config key 'early_stop.patience': expected >= 0 or null, got -1"),
    ({"model": {"hidden": [8, 0]}}, "config key 'model.hidden': expected positive widths, got [8, 0]"),
    ({"optim": 3}, "config section 'optim': expected a mapping, got 3"),
    ({"data": {"val_fraction": 0.6, "test_fraction": 0.5}}, "expected a sum below 1"),
    ({"early_stop": {"monitor": "loss"}}, "expected a validation metric named val_<name>"),
])
def test_bad_values_name_the_key_the_value_and_the_expectation(data, message):
    with pytest.raises(ConfigError) as e:
        CF.from_dict(data)
    assert message in str(e.value)


def test_missing_or_unparsable_file(tmp_path):
    with pytest.raises(ConfigError, match="config file '.*nope.yaml': not found"):
        CF.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="config file '.*bad.yaml': cannot parse") as e:
        CF.load(bad)
    assert str(e.value).endswith("while parsing a flow sequence: expected ',' or ']', but got '<stream end>' "
                                 "(line 2, column 1)"), e.value  # one line, not PyYAML's five
    with pytest.raises(ConfigError, match="expected section.key=value"):
        CF.apply_overrides({}, ["lr"])
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="config file '.*latin1.yaml': cannot read it .*can't decode byte 0xe9"):
        CF.load(latin1)
    twice = tmp_path / "twice.yaml"
    twice.write_text("optim:\n  lr: 0.1\n  lr: 0.01\n")
    with pytest.raises(ConfigError, match=r"config file '.*twice.yaml': cannot parse: key 'lr' appears twice "
                                          r"\(line 3, column 3\)$"):
        CF.load(twice)
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(ConfigError, match="config file '.*dir.yaml': is a directory"):
        CF.load(tmp_path / "dir.yaml")


@pytest.mark.parametrize("name, text, message", [
    ("exp.yaml", "task: digits\noptim:\n  name: sgd\n  lr: fast\n", "exp.yaml:4: config key 'optim.lr': expected a number, got 'fast'"),
    ("exp.yaml", "train:\n  epochs: 2\n  epochz: 3\n", "exp.yaml:3: unknown config key 'train.epochz'; did you mean 'train.epochs'?"),
    ("exp.yaml", "train: 3\n", "exp.yaml:1: config section 'train': expected a mapping, got 3"),
    ("exp.yaml", "data:\n  test_fraction: 0.5\n  val_fraction: 0.6\n", "exp.yaml:2: config keys 'data.val_fraction' + 'data.test_fraction'"),
    ("exp.toml", '[data]\nsplit_seed = 1\n[train]\n\nepochs = "x"\n', "exp.toml:5: config key 'train.epochs': expected an integer, got 'x'"),
    ("exp.toml", 'model.hidden = ["a"]\n', "exp.toml:1: config key 'model.hidden': expected a list of integers, got ['a']"),
])
def test_a_bad_key_in_a_file_is_named_with_its_file_and_line(tmp_path, monkeypatch, name, text, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError) as e:
        CF.load(name)
    assert str(e.value).startswith(message), str(e.value)


def test_a_bad_key_from_an_override_names_the_override_not_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exp.yaml").write_text("optim:\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        CF.load("exp.yaml", ["optim.lr=0.2", "optim.lr=fast"])
    assert str(e.value) == "override 'optim.lr=fast': config key 'optim.lr': expected a number, got 'fast'"
    with pytest.raises(ConfigError) as e:  # a default, set by neither: no place to name
        CF.load("exp.yaml", ["early_stop.mode=max"], base={"early_stop": {"monitor": "loss"}})
    assert str(e.value).startswith("config key 'early_stop.monitor'")


def test_every_key_is_described():
    rows = C.describe()
    assert len(rows) > 50 and all(help for _, _, help in rows)
    assert ("optim.lr", "0.001", "peak learning rate") in rows


def test_environment_detection():
    assert detect({}) == DistEnv()
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                "TORCHELASTIC_RESTART_COUNT": "1"}
    assert detect(torchrun) == DistEnv(rank=3, local_rank=1, world_size=8, local_world_size=2,
                                       launcher="torchrun", restart_count=1)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
             "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}
    assert detect(slurm) == DistEnv(rank=5, local_rank=1, world_size=8, local_world_size=4, launcher="slurm")
    # under `srun torchrun`, torchrun's variables win over SLURM's
    assert detect({**slurm, **torchrun}).launcher == "torchrun"
    # the batch shell of a multi-task job is not a rank of it
    assert detect({k: v for k, v in slurm.items() if k != "SLURM_STEP_ID"}) == DistEnv()
    with pytest.raises(ConfigError, match="RANK: expected an integer"):
        detect({"RANK": "x", "WORLD_SIZE": "2"})


def test_rank_without_world_size_is_refused():
    for env, message in (({"RANK": "0"}, "environment variable RANK is set ('0') but WORLD_SIZE is not"),
                         ({"WORLD_SIZE": "2"}, "environment variable WORLD_SIZE is set ('2') but RANK is not"),
                         ({"RANK": "0", "WORLD_SIZE": "two"}, "environment variable WORLD_SIZE: expected an integer")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            detect(env)


def test_early_stopping_logic():
    es = EarlyStopping("min", patience=2, min_delta=0.1)
    assert es.update(1.0, 0, 10) and es.best == 1.0
    assert not es.update(0.95, 1, 20)  # not better by min_delta
    assert not es.should_stop
    assert not es.update(float("nan"), 2, 30)  # NaN never improves
    assert es.should_stop and es.best_epoch == 0  # patience 2: two validations without improvement, as in Keras
    es2 = EarlyStopping("min", patience=2, min_delta=0.1)
    es2.load_state_dict(es.state_dict())
    assert es2.should_stop and es2.best_step == 10
    es3 = EarlyStopping("max")
    assert es3.update(0.5, 0, 1) and es3.update(0.6, 1, 2) and not es3.update(0.55, 2, 3)
    assert not es3.should_stop  # patience None never stops
    es4 = EarlyStopping("min", patience=1)
    assert es4.update(1.0, 0, 1) and not es4.should_stop and not es4.update(1.0, 1, 2) and es4.should_stop


def test_split_is_seeded_disjoint_and_complete():
    ds = torch.utils.data.TensorDataset(torch.arange(100))
    a = split(ds, [0.15, 0.15], seed=3)
    b = split(ds, [0.15, 0.15], seed=3)
    assert [p.indices for p in a] == [p.indices for p in b]
    assert [len(p) for p in a] == [70, 15, 15]
    assert sorted(sum((p.indices for p in a), [])) == list(range(100))
    assert split(ds, [0.15, 0.15], seed=4)[1].indices != a[1].indices


def test_shard_sampler_is_disjoint_and_unpadded():
    shards = [list(ShardSampler(10, r, 3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(10)) and [len(s) for s in shards] == [4, 3, 3]


@pytest.mark.parametrize("name", ["constant", "step", "cosine", "linear", "onecycle"])
def test_schedules_warm_up_and_end_where_configured(name):
    from ddptrain.optim import build_scheduler
    cfg = CF.from_dict({"sched": {"name": name, "warmup_steps": 5, "min_lr": 0.001, "step_size": 10}})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = build_scheduler(opt, cfg.sched, total_steps=30, lr=0.1)
    lrs = []
    for _ in range(30):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    if name != "onecycle":
        assert lrs[0] == pytest.approx(0.001) and lrs[5] == pytest.approx(0.1)  # linear warmup from lr/100
    expected_end = {"constant": 0.1, "step": 0.001, "cosine": 0.001, "linear": 0.001, "onecycle": 0.0}[name]
    assert opt.param_groups[0]["lr"] == pytest.approx(expected_end, abs=1e-3)


def test_requeue_targets_only_this_job_or_array_task():
    from ddptrain.slurm import job_to_requeue
    assert job_to_requeue({}) is None
    assert job_to_requeue({"SLURM_JOB_ID": "42"}) == "42"
    # an array task is requeued alone, not the whole array
    assert job_to_requeue({"SLURM_JOB_ID": "57", "SLURM_ARRAY_JOB_ID": "50", "SLURM_ARRAY_TASK_ID": "7"}) == "50_7"


def test_more_ranks_on_a_node_than_it_has_gpus_is_a_one_line_config_error(monkeypatch):
    # CUDA is faked (this machine has none): only its device count is read before the error
    from ddptrain.dist import pick_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"config key 'dist.device': this node's rank 1 \(LOCAL_RANK\) needs CUDA "
                                          r"device 1, but the node has 1: one GPU per rank, so start at most 1 per "
                                          r"node \(--nproc-per-node=1\), or set dist.device=cpu"):
        pick_device(DistEnv(rank=1, local_rank=1, world_size=2, local_world_size=2), "auto", "auto")
