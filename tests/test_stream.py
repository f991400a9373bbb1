"""Streams (IterableDataset) on real gloo ranks: every item once per pass, uneven ends without a hang, exact
resume mid-pass, validation that does not depend on the world size, and the length rules."""
import collections
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ddptrain
from ddptrain.configfile import from_dict
from ddptrain.dist import detect
from ddptrain.run import run

from killing import kill_and_resume, records, train_rank
from multirank import RankFailed, run_ranks

TESTS = Path(__file__).resolve().parent
BASE = {"task": "tasks_stream:stream", "data": {"batch_size": 16}, "optim": {"name": "adamw", "lr": 0.01},
        "loss": {"name": "mse"}, "train": {"epochs": 2, "log_every": 2}, "dist": {"timeout_s": 20},
        "checkpoint": {"every_epochs": 0, "save_best": False}}


def config(task_args=None, **sections):
    out = {**BASE, "task_args": task_args or {}}
    for section, values in sections.items():
        out[section] = {**out.get(section, {}), **values} if isinstance(values, dict) else values
    return out


def passes(results, steps_per_pass):
    """The ids that all ranks trained on, per pass: {pass: Counter(id -> times)}."""
    seen = collections.defaultdict(collections.Counter)
    for result in results:
        for step, ids in result["seen"]:
            seen[step // steps_per_pass].update(ids)
    return seen


@pytest.mark.parametrize("world_size,workers,kind", [(2, 0, "items"), (2, 2, "files"), (3, 0, "files"),
                                                     (3, 2, "items")])
def test_every_item_is_trained_once_per_pass(tmp_path, world_size, workers, kind):
    # 192 ids: 12 "files" of 16, or item by item; 2, 3, 4 and 6 parts all get a whole number of micro-batches.
    b = 8
    cfg = config({"kind": kind, "lengths": [16] * 12}, data={"batch_size": world_size * b, "num_workers": workers})
    results = run_ranks(train_rank, world_size, tmp_path, cfg, None, "tasks_stream", True, timeout=120)
    steps_per_pass = 192 // (world_size * b)
    assert results[0]["summary"]["steps"] == 2 * steps_per_pass
    assert results[0]["summary"]["epochs_completed"] == 2
    for counts in passes(results, steps_per_pass).values():
        assert sorted(counts) == list(range(192)) and set(counts.values()) == {1}


def test_shards_of_unequal_length_end_the_pass_on_every_rank_at_the_same_step(tmp_path):
    # rank 0 reads files 0 and 2 (320 ids), rank 1 files 1 and 3 (80): 10 steps of 8 each, then the pass ends.
    cfg = config({"kind": "files", "lengths": [200, 40, 120, 40]}, data={"batch_size": 16})
    results = run_ranks(train_rank, 2, tmp_path, cfg, None, "tasks_stream", True, timeout=60)
    assert [r["summary"]["steps"] for r in results] == [20, 20]
    assert [r["summary"]["epochs_completed"] for r in results] == [2, 2]
    for counts in passes(results, 10).values():
        assert set(counts.values()) == {1} and len(counts) == 160
        assert set(range(200, 240)) | set(range(360, 400)) <= set(counts)  # rank 1's whole part
    assert [e["step"] for e in records(tmp_path / "r") if e["split"] == "train"] == list(range(2, 21, 2))


@pytest.mark.parametrize("kind,workers", [("stateful", 2), ("noisy", 0)])
def test_a_rank_killed_mid_pass_resumes_with_the_next_unread_items_bitwise(tmp_path, kind, workers):
    # 2 ranks, 12 steps per pass: killed at step 8 of the first pass, resumed from step 6's checkpoint. A
    # stream with a state continues where it was (in each of 2 workers); one without is read again up to there,
    # drawing its noise again as it did (step 6 is inside a read-ahead window: StreamSteps).
    cfg = config({"kind": kind, "lengths": [24] * 8}, data={"num_workers": workers}, checkpoint={"every_steps": 3})
    summary = kill_and_resume(tmp_path, cfg, kill_at=8, models="tasks_stream")
    assert summary["steps"] == 24 and summary["resumed_at_step"] == 6 and summary["epochs_completed"] == 2


def test_noise_drawn_in_workers_resumes_bitwise_in_a_later_pass(tmp_path):
    # Killed at step 20, resumed from step 18, in the second pass: its workers draw their noise from the
    # pass's seed, not from where workers kept from the first pass had got to.
    cfg = config({"kind": "noisy", "lengths": [24] * 8}, data={"num_workers": 2}, checkpoint={"every_steps": 3})
    summary = kill_and_resume(tmp_path, cfg, kill_at=20, models="tasks_stream")
    assert summary["resumed_at_step"] == 18 and summary["epochs_completed"] == 2


def evaluate_rank(rank, run_dir, workers):
    return ddptrain.evaluate(run_dir, "last", "val", [f"data.num_workers={workers}"])


def test_validation_on_a_stream_gives_the_same_metrics_on_1_2_and_3_ranks(tmp_path):
    # Batches of one sample: a float32 matmul of another batch size may round an output differently (1 ulp),
    # and the parts of 101 samples over 1 to 6 readers end in batches of other sizes.
    cfg = config({"kind": "items", "lengths": [64], "val_n": 101}, train={"epochs": 1},
                 data={"eval_batch_size": 1}, checkpoint={"every_epochs": 1})
    summary = run_ranks(train_rank, 1, tmp_path, cfg, None, "tasks_stream", timeout=60)[0]["summary"]
    results = {(ws, w): run_ranks(evaluate_rank, ws, str(tmp_path / "r"), w, timeout=60)
               for ws, w in ((1, 0), (2, 0), (2, 2), (3, 1))}
    assert results[1, 0][0]["loss"] == summary["val"]["loss"]  # the same batches as the run's own validation
    for per_rank in results.values():
        for values in per_rank:
            # the same per-sample float64 losses, added in another order across ranks and workers
            assert values["loss"] == pytest.approx(summary["val"]["loss"], rel=1e-12, abs=0)


def train_cli(tmp_path, *overrides):
    return subprocess.run([sys.executable, "-m", "ddptrain", "train", str(TESTS / "stream.yaml"),
                           f"runs_dir={tmp_path}", *overrides], cwd=TESTS, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("overrides,expected", [
    (["sched.name=cosine"], "config key 'sched.name': cosine is laid out over the whole run, whose length is "
                            "unknown (the training set is a stream without __len__); set train.max_steps"),
    (["task=tasks_stream:not_a_stream"], "the train set (NotAStream) must be a map-style dataset (with __getitem__ "
                                         "and __len__) or a stream (a subclass of torch.utils.data.IterableDataset)"),
    (["data.batch_size=512"], "the training stream gave no whole step in pass 0: each rank needs 1 x 512 samples"),
    (["task_args.val_n=20", "val.mode=rank0", "data.stream_sharding=dataset"],
     "config key 'val.mode': rank0 reads the whole set on rank 0 alone, but a stream that splits itself"),
])
def test_bad_stream_setups_are_one_line_errors(tmp_path, overrides, expected):
    proc = train_cli(tmp_path, *overrides)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("ddptrain: error: ") and expected in proc.stderr and proc.stderr.count("\n") == 1


def test_the_run_length_comes_from_max_steps_or_the_streams_length(tmp_path):
    by_max_steps = train_cli(tmp_path, "name=a", "sched.name=cosine", "train.max_steps=30", "train.epochs=100")
    assert by_max_steps.returncode == 0, by_max_steps.stderr
    lrs = [e["lr"] for e in records(tmp_path / "a") if e["split"] == "train"]
    assert len(lrs) == 15 and lrs[-1] == pytest.approx(0.0, abs=1e-12)  # the cosine reached its end at step 30
    sized = train_cli(tmp_path, "name=b", "sched.name=linear", "task_args.kind=sized", "train.epochs=2")
    assert sized.returncode == 0, sized.stderr
    lrs = [e["lr"] for e in records(tmp_path / "b") if e["split"] == "train"]
    assert len(lrs) == 12 and lrs[-1] == pytest.approx(0.0, abs=1e-12)  # 2 x 192 // 16 steps, as __len__ said


def test_shard_splits_over_dataloader_workers_outside_ddptrain():
    loader = torch.utils.data.DataLoader(ddptrain_files(), batch_size=None, num_workers=2)
    assert sorted(int(x[0]) for x, _ in loader) == list(range(48))


def ddptrain_files():
    import tasks_stream
    return tasks_stream.Files([12] * 4)


def test_endless_stream_validates_every_n_steps_and_stops_at_max_steps(tmp_path):
    cfg = from_dict(config({"kind": "items", "lengths": [10 ** 6], "val_n": 20}, runs_dir=str(tmp_path), name="e",
                           train={"max_steps": 9}, val={"every_steps": 4}))
    summary = run(cfg, detect({}))
    assert summary["steps"] == 9 and summary["epochs_completed"] == 0
    assert [e["step"] for e in records(tmp_path / "e") if e["split"] == "val"] == [4, 8, 9]


def test_a_pass_resumed_on_another_world_size_starts_again_from_its_beginning(tmp_path):
    cfg = config({"kind": "items", "lengths": [192]}, checkpoint={"every_steps": 3})
    with pytest.raises(RankFailed):
        run_ranks(train_rank, 2, tmp_path, cfg, 8, "tasks_stream", timeout=60)  # killed at step 8 of pass 0
    resumed = run_ranks(train_rank, 1, tmp_path, cfg, None, "tasks_stream", True, timeout=60)[0]
    assert resumed["summary"]["resumed_at_step"] == 6
    # pass 0 again from its first item (12 steps of 16 on one rank), then pass 1
    assert resumed["summary"]["steps"] == 6 + 12 + 12 and resumed["summary"]["epochs_completed"] == 2
    first = [i for step, ids in resumed["seen"] if step < 18 for i in ids]
    assert sorted(first) == list(range(192))


def test_a_pass_resumed_with_another_number_of_workers_starts_again_from_its_beginning(tmp_path):
    cfg = config({"kind": "items", "lengths": [192]}, data={"num_workers": 2}, checkpoint={"every_epochs": 1})
    run_ranks(train_rank, 2, tmp_path, {**cfg, "train": {**cfg["train"], "max_steps": 5}}, None, "tasks_stream",
              timeout=60)  # ends inside pass 0
    resumed = run_ranks(train_rank, 2, tmp_path, {**cfg, "data": {**cfg["data"], "num_workers": 0}}, None,
                        "tasks_stream", True, timeout=60)
    assert resumed[0]["summary"]["resumed_at_step"] == 5
    # pass 0 again from its first item (12 steps of 8 on each rank), then pass 1
    assert resumed[0]["summary"]["steps"] == 5 + 12 + 12 and resumed[0]["summary"]["epochs_completed"] == 2
    first = [i for r in resumed for step, ids in r["seen"] if step < 17 for i in ids]
    assert sorted(first) == list(range(192))


def test_a_longer_run_continues_the_pass_that_max_steps_ended_with_its_next_items(tmp_path):
    cfg = config({"kind": "items", "lengths": [192]}, checkpoint={"every_epochs": 1})  # 12 steps per pass
    straight = run_ranks(train_rank, 2, tmp_path / "straight", cfg, None, "tasks_stream", True, timeout=60)
    run_ranks(train_rank, 2, tmp_path, {**cfg, "train": {**cfg["train"], "max_steps": 17}}, None, "tasks_stream",
              timeout=60)
    longer = run_ranks(train_rank, 2, tmp_path, cfg, None, "tasks_stream", True, timeout=60)
    assert longer[0]["summary"]["resumed_at_step"] == 17 and longer[0]["summary"]["epochs_completed"] == 2
    for rank in (0, 1):
        assert longer[rank]["seen"] == [(s, ids) for s, ids in straight[rank]["seen"] if s >= 17]
        assert all(torch.equal(longer[rank]["weights"][k], v) for k, v in straight[rank]["weights"].items())
    # logged every 2 steps: the first run's last, 17, made the log of 18 one step's; from 20 on, the same
    assert [e for e in records(tmp_path / "r") if e["split"] == "train" and e["step"] >= 20] == \
        [e for e in records(tmp_path / "straight" / "r") if e["split"] == "train" and e["step"] >= 20]


def train_counting_writes(rank, runs_dir, cfg):
    """train_rank, and the names of the checkpoint files this rank wrote."""
    from ddptrain import checkpoint
    writes, save = [], checkpoint.save
    checkpoint.save = lambda path, state: (writes.append(path.name), save(path, state))
    train_rank(rank, runs_dir, cfg, None, "tasks_stream")
    return writes


def test_a_pass_that_ends_on_a_step_checkpoint_writes_that_step_once(tmp_path):
    # 12 steps per pass, a step checkpoint every 4: a pass's last step is known as such before its checkpoint
    # (the next window's agreement is waited for), so the epoch's own checkpoint is its only write.
    cfg = config({"kind": "items", "lengths": [192]}, checkpoint={"every_steps": 4, "every_epochs": 1})
    writes = run_ranks(train_counting_writes, 2, tmp_path, cfg, timeout=60)
    assert writes == [[f"step-{s:09d}.pt" for s in (4, 8, 12, 16, 20, 24)], []]
