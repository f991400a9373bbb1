"""Nothing lost: resumed == uninterrupted, bad checkpoints skipped or refused, signals checkpoint cleanly."""
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddptrain import checkpoint
from ddptrain.configfile import from_dict
from ddptrain.dist import detect
from ddptrain.preempt import Preempted
from ddptrain.run import run

import rundirs
import tasks_for_tests
from multirank import RankFailed, run_ranks

ROOT = Path(__file__).resolve().parent.parent

# 96 samples, global batch 16 -> 6 steps per epoch, 24 in all; dropout makes every rank's RNG matter.
BASE = {"task": "tasks_for_tests:regression", "task_args": {"dropout": 0.2}, "data": {"batch_size": 16},
        "optim": {"name": "adamw", "lr": 0.01}, "sched": {"name": "cosine", "warmup_steps": 3},
        "train": {"epochs": 4, "log_every": 1, "grad_accum_steps": 2},
        "checkpoint": {"every_steps": 4, "keep_last": 3}, "dist": {"timeout_s": 10}}


def with_(section, **values):
    return {**BASE, section: {**BASE[section], **values}}


def train_rank(rank, runs_dir, cfg_dict, kill_at=None):
    """Train; with kill_at, rank 1 kills itself with SIGKILL when it reaches that step."""
    def hook(step, micro_step, batch):
        if kill_at is not None and rank == 1 and step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return batch
    cfg = from_dict({**cfg_dict, "runs_dir": str(runs_dir), "name": "r"})
    summary = run(cfg, detect(os.environ), hooks={"before_micro_step": hook})
    return {"summary": summary, "weights": {k: v.clone() for k, v in tasks_for_tests.MODELS[-1].state_dict().items()}}


def records(runs_dir):
    return rundirs.records(Path(runs_dir) / "r")


def assert_bitwise(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("straight")
    return run_ranks(train_rank, 2, d, BASE), records(d)


def test_resume_after_a_kill_mid_epoch_is_bitwise_identical(tmp_path, uninterrupted):
    (straight, _), straight_records = uninterrupted
    kill_at = random.choice([s for s in range(5, 23) if s % 6 and s % 4])  # mid-epoch, between checkpoints
    with pytest.raises(RankFailed):
        run_ranks(train_rank, 2, tmp_path, BASE, kill_at)
    last = checkpoint.step_files(tmp_path / "r" / "checkpoints")[-1]
    assert 0 < int(last.stem.split("-")[1]) < kill_at

    resumed = run_ranks(train_rank, 2, tmp_path, BASE)
    assert resumed[0]["summary"]["resumed_from"] == str(last), kill_at
    assert_bitwise(resumed[0]["weights"], straight["weights"])
    assert_bitwise(resumed[1]["weights"], straight["weights"])
    # metrics.jsonl: no step twice, none missing, and the same numbers as the uninterrupted run
    got = records(tmp_path)
    assert [e["step"] for e in got if e["split"] == "train"] == list(range(1, 25))
    assert got == straight_records


def test_a_truncated_newest_checkpoint_is_skipped(tmp_path, uninterrupted):
    (straight, _), _ = uninterrupted
    with pytest.raises(RankFailed):
        run_ranks(train_rank, 2, tmp_path, BASE, 19)
    files = checkpoint.step_files(tmp_path / "r" / "checkpoints")
    newest = files[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # as if the disk filled up
    resumed = run_ranks(train_rank, 2, tmp_path, BASE)
    assert resumed[0]["summary"]["resumed_from"] == str(files[-2])
    assert_bitwise(resumed[0]["weights"], straight["weights"])


def test_a_checkpoint_without_its_completeness_marker_is_skipped(tmp_path, diagnostics):
    ckpts = tmp_path / "checkpoints"
    checkpoint.save(ckpts / "step-000000004.pt", {"step": 4})
    checkpoint.save(ckpts / "step-000000008.pt", {"step": 8})
    checkpoint.marker(ckpts / "step-000000008.pt").unlink()  # the writer died before the marker
    assert checkpoint.latest_valid(ckpts) == ckpts / "step-000000004.pt"
    assert diagnostics.pop() == f"skipping checkpoint '{ckpts / 'step-000000008.pt'}': no completeness marker (the " \
                                f"write did not finish)"
    checkpoint.save(ckpts / "step-000000012.pt", {"step": 12})
    data = bytearray((ckpts / "step-000000012.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (ckpts / "step-000000012.pt").write_bytes(bytes(data))
    assert checkpoint.latest_valid(ckpts) == ckpts / "step-000000004.pt"
    assert "step-000000012.pt': content differs from what was written (corrupt)" in diagnostics[0]


def test_a_checkpoint_that_is_a_directory_where_a_file_was_written_or_lacks_state_pt_is_skipped(tmp_path, diagnostics):
    ckpts = tmp_path / "checkpoints"
    checkpoint.save(ckpts / "step-000000004.pt", {"step": 4})
    checkpoint.save(ckpts / "step-000000008.pt", {"step": 8})
    (ckpts / "step-000000008.pt").unlink()
    (ckpts / "step-000000008.pt").mkdir()  # a directory where its marker describes a file
    (ckpts / "step-000000012").mkdir()  # a directory of shards whose state.pt never came
    (ckpts / "step-000000012" / "__0_0.distcp").write_bytes(b"x")
    checkpoint.marker(ckpts / "step-000000012").write_text(json.dumps({"files": {"__0_0.distcp": 1}, "step": 12}))
    assert checkpoint.latest_valid(ckpts) == ckpts / "step-000000004.pt"
    assert diagnostics == [f"skipping checkpoint '{ckpts / 'step-000000012'}': its state.pt is missing",
                           f"skipping checkpoint '{ckpts / 'step-000000008.pt'}': a directory, where its marker "
                           f"describes a file"]
    checkpoint.marker(ckpts / "step-000000004.pt").write_text("null")  # a damaged marker
    assert checkpoint.verify(ckpts / "step-000000004.pt") == "no completeness marker (the write did not finish)"


def test_resume_on_another_world_size_continues_the_same_data_order(tmp_path):
    cfg = {**BASE, "task_args": {}}  # no dropout: the random streams are the part that cannot carry over
    straight = run_ranks(train_rank, 2, tmp_path / "straight", cfg)[0]
    with pytest.raises(RankFailed):
        run_ranks(train_rank, 2, tmp_path / "r2", cfg, 14)
    resumed = run_ranks(train_rank, 1, tmp_path / "r2", cfg)[0]
    assert resumed["summary"]["resumed_at_step"] == 12 and resumed["summary"]["steps"] == 24
    for k in straight["weights"]:
        torch.testing.assert_close(resumed["weights"][k], straight["weights"][k], rtol=0, atol=1e-5)


def test_resume_under_a_different_training_config_is_refused(tmp_path):
    constant = {**with_("train", epochs=1), "sched": {"name": "constant"}}
    run_ranks(train_rank, 1, tmp_path, constant)
    changed = {**constant, "optim": {"name": "adamw", "lr": 0.5}}
    with pytest.raises(RankFailed, match=r"was made with a different config \(optim.lr: 0.01 -> 0.5\)"):
        run_ranks(train_rank, 1, tmp_path, changed)
    # a cosine schedule is laid out over the run: its length is pinned
    with pytest.raises(RankFailed, match=r"different config \(sched.name: 'constant' -> 'cosine'; "
                       r"train.epochs: 1 -> 2 \(sched.name=cosine is laid out over the run's length\)\)"):
        run_ranks(train_rank, 1, tmp_path, {**with_("train", epochs=2), "sched": {"name": "cosine"}})
    # the best value saved is of val_loss, the lower the better: another metric or direction cannot continue it
    with pytest.raises(RankFailed, match=r"different config \(early_stop.mode: 'min' -> 'max'\)"):
        run_ranks(train_rank, 1, tmp_path, {**constant, "early_stop": {"mode": "max"}})
    # with a constant schedule more epochs is fine: that is how a run is extended
    longer = run_ranks(train_rank, 1, tmp_path, {**constant, "train": {**constant["train"], "epochs": 2}})[0]
    assert longer["summary"]["resumed_at_step"] == 6 and longer["summary"]["steps"] == 12


def test_resume_none_archives_the_previous_run(tmp_path):
    run_ranks(train_rank, 1, tmp_path, with_("train", epochs=1))
    again = run_ranks(train_rank, 1, tmp_path, {**with_("train", epochs=1), "checkpoint": {"resume": "none"}})[0]
    assert again["summary"]["resumed_from"] is None and again["summary"]["steps"] == 6
    (archived,) = (tmp_path / "r" / "archive").iterdir()
    assert (archived / "metrics.jsonl").exists() and (archived / "checkpoints").is_dir()


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EVIL_MARKER']}",))


def test_a_checkpoint_with_a_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    evil = tmp_path / "evil.pt"
    marker = tmp_path / "pwned"
    os.environ["EVIL_MARKER"] = str(marker)
    torch.save({"format_version": 1, "model": Evil()}, evil)
    f = tmp_path / "exp.yaml"
    f.write_text(f"task: tasks_for_tests:regression\nruns_dir: {tmp_path / 'runs'}\ncheckpoint:\n  resume: {evil}\n")
    proc = subprocess.run([sys.executable, "-m", "ddptrain", "train", str(f)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "tests")}, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"ddptrain: error: checkpoint '{evil}': refused, it holds objects that safe")
    assert "Traceback" not in proc.stderr and not marker.exists()
    assert not (tmp_path / "runs" / "exp" / "metrics.jsonl").exists()


def test_a_checkpoint_of_another_model_shape_is_a_clear_error(tmp_path):
    run_ranks(train_rank, 1, tmp_path, with_("train", epochs=1))
    ckpt = checkpoint.step_files(tmp_path / "r" / "checkpoints")[-1]
    wide = {**with_("train", epochs=1), "task_args": {"width": 32, "dropout": 0.2}, "checkpoint": {"resume": str(ckpt)}}
    with pytest.raises(RankFailed, match=r"does not fit|different config"):
        run_ranks(train_rank, 1, tmp_path / "other", wide)
    state = checkpoint.load(ckpt)
    model = tasks_for_tests.regression(from_dict({"task_args": {"width": 32, "dropout": 0.2}})).model
    with pytest.raises(checkpoint.CheckpointError, match=r"its weights do not fit the configured model \(size mismatch"):
        checkpoint.load_model_state(model, state, ckpt)


def test_nonfinite_weights_never_replace_a_good_checkpoint(tmp_path):
    model = torch.nn.Linear(2, 2)
    assert checkpoint.finite(checkpoint.watched(model))
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    assert not checkpoint.finite(checkpoint.watched(model))


def test_a_damaged_best_checkpoint_is_not_used_and_the_run_still_ends_with_test_metrics(tmp_path, diagnostics):
    """best.pt is written once (val_loss only falls, and the monitor wants it high); one byte of it is then
    flipped. The run must not test silently wrong weights, nor fail: it tests the last weights and says so."""
    def flip_a_byte_of_best(step, micro_step, batch):
        best = tmp_path / "r" / "checkpoints" / "best.pt"
        if step == 10 and micro_step % 2 == 0 and best.exists():
            data = bytearray(best.read_bytes())
            data[len(data) // 2] ^= 0xFF
            best.write_bytes(bytes(data))
        return batch
    cfg = from_dict({**BASE, "task_args": {"n_test": 20}, "runs_dir": str(tmp_path), "name": "r",
                     "early_stop": {"monitor": "val_loss", "mode": "max"}, "train": {**BASE["train"], "epochs": 2}})
    summary = run(cfg, detect({}), hooks={"before_micro_step": flip_a_byte_of_best})
    assert summary["status"] == "completed" and summary["best_epoch"] == 0
    assert summary["tested_weights"] == "last" and not summary["restored_best"]
    assert "content differs from what was written (corrupt)" in summary["best_unusable"]
    final = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl")]
    assert final[-1]["split"] == "test" and final[-1]["loss"] == summary["test"]["loss"]
    assert any("best.pt' cannot be used (content differs" in m for m in diagnostics)


def test_a_failure_on_some_ranks_reaches_every_rank_as_the_first_ones_message():
    """How a checkpoint write that failed on one rank (a full disk) stops all of them with one message."""
    def first(rank, failing):
        from ddptrain.dist import Dist
        dist = Dist(detect(os.environ), torch.device("cpu"), "gloo", 10, 10)
        try:
            return dist.first_error(f"rank {rank} failed" if rank in failing else None)
        finally:
            dist.close()

    assert run_ranks(first, 3, {1, 2}, timeout=60) == ["rank 1 failed"] * 3
    assert run_ranks(first, 3, set(), timeout=60) == [None] * 3


def test_a_longer_run_continues_the_epoch_that_max_steps_ended_as_if_never_stopped(tmp_path, monkeypatch):
    """max_steps ends the first run within its last epoch (6 steps each); run again with more steps, it continues
    that epoch from its next batch. The step that ends both the epoch and the run is written once."""
    cfg = {**BASE, "sched": {"name": "constant"}, "train": {**BASE["train"], "epochs": 2}}
    straight = train_rank(0, tmp_path / "straight", cfg)
    writes = []
    monkeypatch.setattr(checkpoint, "save", lambda path, state, save=checkpoint.save: (writes.append(path.name),
                                                                                       save(path, state)))
    first = train_rank(0, tmp_path, {**cfg, "train": {**cfg["train"], "max_steps": 8}})
    assert first["summary"]["steps"] == 8 and writes.count("step-000000008.pt") == 1, writes
    longer = train_rank(0, tmp_path, cfg)
    assert longer["summary"]["resumed_at_step"] == 8 and longer["summary"]["steps"] == 12
    assert_bitwise(longer["weights"], straight["weights"])
    train = [e for e in records(tmp_path) if e["split"] == "train"]
    assert train == [e for e in records(tmp_path / "straight") if e["split"] == "train"]


def preempted_at(tmp_path, cfg, at):
    """Train in this process until the preemption signal, sent during step `at`'s last micro-batch."""
    seen = []

    def hook(step, micro_step, batch):
        if step == at - 1:
            seen.append(micro_step)
            if len(seen) == cfg["train"]["grad_accum_steps"]:
                os.kill(os.getpid(), signal.SIGUSR1)
        return batch
    with pytest.raises(Preempted):
        run(from_dict({**cfg, "runs_dir": str(tmp_path), "name": "r"}), detect(os.environ),
            hooks={"before_micro_step": hook})


def test_a_preemption_right_after_a_validation_does_not_repeat_it_on_resume(tmp_path):
    """val.every_steps validates on an epoch's last step (6), then the preemption signal comes: the resumed run
    goes on to step 7 without validating step 6 again (a repeat would count as no improvement)."""
    cfg = {**BASE, "sched": {"name": "constant"}, "val": {"every_steps": 6}, "early_stop": {"patience": 1}}

    preempted_at(tmp_path, cfg, 6)
    straight = train_rank(0, tmp_path / "straight", cfg)
    resumed = train_rank(0, tmp_path, cfg)
    assert resumed["summary"]["resumed_at_step"] == 6
    assert [e["step"] for e in records(tmp_path) if e["split"] == "val"] == \
        [e["step"] for e in records(tmp_path / "straight") if e["split"] == "val"]
    assert resumed["summary"]["steps"] == straight["summary"]["steps"]


def test_resuming_from_best_weights_or_a_marker_is_a_one_line_error(tmp_path):
    cfg = {**BASE, "train": {**BASE["train"], "epochs": 1}, "runs_dir": str(tmp_path), "name": "r"}
    run(from_dict(cfg), detect(os.environ))
    ckpts = tmp_path / "r" / "checkpoints"
    with pytest.raises(checkpoint.CheckpointError, match=r"holds the best validation's weights alone, not a run's "
                                                         r"state to continue; resume from a step checkpoint"):
        run(from_dict({**cfg, "checkpoint": {"resume": str(ckpts / "best.pt")}}), detect(os.environ))
    marker = ckpts / "step-000000006.pt.done"
    with pytest.raises(checkpoint.CheckpointError, match=f"a completeness marker, not a checkpoint; name the "
                                                         f"checkpoint beside it, '{ckpts / 'step-000000006.pt'}'"):
        run(from_dict({**cfg, "checkpoint": {"resume": str(marker)}}), detect(os.environ))


def test_a_newer_unmarked_checkpoint_never_makes_keep_last_delete_the_one_just_written(tmp_path):
    """keep_last 1; step 12 was renamed into place but never marked (its writer died), the run resumed from 8 and
    saves at 10: the prune keeps step 10, which a later resume takes."""
    cfg = {**BASE, "sched": {"name": "constant"}, "task_args": {},
           "train": {**BASE["train"], "epochs": 4, "max_steps": 8},
           "checkpoint": {"every_steps": 4, "every_epochs": 0, "keep_last": 1}}
    train_rank(0, tmp_path, cfg)
    ckpts = tmp_path / "r" / "checkpoints"
    (ckpts / "step-000000012.pt").write_bytes((ckpts / "step-000000008.pt").read_bytes())
    train_rank(0, tmp_path, {**cfg, "train": {**cfg["train"], "max_steps": 10},
                             "checkpoint": {**cfg["checkpoint"], "every_epochs": 1}})
    assert checkpoint.latest_valid(ckpts) == ckpts / "step-000000010.pt"


def test_a_preemption_at_the_last_step_still_ends_its_epoch_on_resume(tmp_path):
    """Preempted on the run's last step (12), before that epoch's validation, best.pt and checkpoint: the resumed
    run does them, as the uninterrupted one did. A completed run whose last checkpoint came before its end
    (every_epochs 0), run again, only reports that it is done."""
    cfg = {**BASE, "sched": {"name": "constant"}, "train": {**BASE["train"], "epochs": 2}}

    preempted_at(tmp_path, cfg, 12)
    straight = train_rank(0, tmp_path / "straight", cfg)
    resumed = train_rank(0, tmp_path, cfg)
    assert resumed["summary"]["resumed_at_step"] == 12
    assert records(tmp_path) == records(tmp_path / "straight")
    for key in rundirs.SUMMARY:
        assert resumed["summary"][key] == straight["summary"][key], key
    assert_bitwise(checkpoint.load(tmp_path / "r" / "checkpoints" / "best.pt")["model"],
                   checkpoint.load(tmp_path / "straight" / "r" / "checkpoints" / "best.pt")["model"])

    steps_only = {**cfg, "checkpoint": {"every_steps": 6, "every_epochs": 0}}
    train_rank(0, tmp_path / "again", steps_only)
    before = (tmp_path / "again" / "r" / "metrics.jsonl").read_text()
    assert train_rank(0, tmp_path / "again", steps_only)["summary"].get("already_trained")
    assert (tmp_path / "again" / "r" / "metrics.jsonl").read_text() == before


def test_augmentation_in_persistent_loader_workers_resumes_mid_epoch_bitwise(tmp_path):
    """Random noise drawn in 2 persistent DataLoader workers: preempted mid-epoch 1 (step 8), the resumed run's
    batches (new workers) are those of the uninterrupted run."""
    cfg = {**BASE, "task_args": {"augment": True}, "sched": {"name": "constant"},
           "data": {"batch_size": 16, "num_workers": 2}, "train": {**BASE["train"], "epochs": 2}}

    def preempt_at_8(step, micro_step, batch):
        if step == 7 and micro_step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        return batch
    with pytest.raises(Preempted):
        run(from_dict({**cfg, "runs_dir": str(tmp_path), "name": "r"}), detect(os.environ),
            hooks={"before_micro_step": preempt_at_8})
    straight = train_rank(0, tmp_path / "straight", cfg)
    resumed = train_rank(0, tmp_path, cfg)
    assert resumed["summary"]["resumed_at_step"] == 8
    assert_bitwise(resumed["weights"], straight["weights"])
    assert records(tmp_path) == records(tmp_path / "straight")


def test_resuming_from_an_earlier_checkpoint_sets_the_later_ones_aside_and_never_tests_their_best(tmp_path):
    """Resumed from step 6 of a run that went on to step 18: the later checkpoints, best.pt among them, are of
    an abandoned course. They are moved aside, so neither a later resume nor the test takes them."""
    cfg = {**BASE, "task_args": {}, "sched": {"name": "constant"}, "train": {**BASE["train"], "epochs": 3},
           "checkpoint": {"every_epochs": 1, "keep_last": 5}}
    first = train_rank(0, tmp_path, cfg)
    ckpts = tmp_path / "r" / "checkpoints"
    assert first["summary"]["best_step"] > 6 and checkpoint.marked_step(ckpts / "best.pt") > 6

    def wrong_targets(step, micro_step, batch):  # the resumed course learns the opposite: it never improves
        x, y = batch
        return x, -10 * y
    resumed = run(from_dict({**cfg, "runs_dir": str(tmp_path), "name": "r",
                             "checkpoint": {**cfg["checkpoint"], "resume": str(ckpts / "step-000000006.pt")}}),
                  detect(os.environ), hooks={"before_micro_step": wrong_targets})
    assert resumed["best_step"] == 6 and resumed["tested_weights"] == "last"
    aside = ckpts / "abandoned-after-step-000000006"
    assert sorted(p.name for p in aside.iterdir()) == ["best.pt", "best.pt.done", "step-000000012.pt",
                                                      "step-000000012.pt.done", "step-000000018.pt",
                                                      "step-000000018.pt.done"]
    assert checkpoint.latest_valid(ckpts).name == "step-000000018.pt"  # the resumed course's own
    assert checkpoint.load(ckpts / "step-000000018.pt")["progress"]["stopped_early"] is False
