"""Weights & Biases from rank 0: one run per training run, the same run across restarts, never fatal.

Only rank 0 builds this logger (the others hold a NullLogger), whatever the launcher. The run id is
saved in every checkpoint, so a resumed, requeued or elastically restarted run continues the same
wandb run. Events that the dead attempt had already sent (between its last checkpoint and its end)
are not sent again: resumption is exact, so they are the same events, and wandb's steps only increase.
Any wandb error is reported once; training and the local logs go on without it.
"""
from __future__ import annotations

import netrc
import os
from pathlib import Path
from urllib.parse import urlsplit

from .config import Config, to_dict


def has_credentials() -> bool:
    """An API key in WANDB_API_KEY or in the netrc file (NETRC, else ~/.netrc), where `wandb login` puts it under
    its server's host: WANDB_BASE_URL's, else the installed wandb's default. The key is never read out."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    base = os.environ.get("WANDB_BASE_URL")
    if not base:
        try:
            import wandb
            base = wandb.Settings().base_url  # wandb 0.31 logs in to api.forge.coreweave.com, earlier ones api.wandb.ai
        except Exception:
            base = "https://api.wandb.ai"
    host = urlsplit(base).netloc or base
    hosts = [host] + (["api.wandb.ai"] if host.endswith("forge.coreweave.com") else [])  # Forge serves that API
    try:
        # a path, as wandb gives it: netrc's own default would refuse a file that others may read, which wandb takes
        found = netrc.netrc(os.path.expanduser(os.environ.get("NETRC") or "~/.netrc"))
        return any(found.authenticators(h) is not None for h in hosts)
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    """auto: WANDB_MODE if set, else online with credentials, else offline (sync later with `wandb sync`)."""
    if mode != "auto":
        return mode
    return os.environ.get("WANDB_MODE") or ("online" if has_credentials() else "offline")


class WandbLogger:
    def __init__(self, cfg: Config, run_id: str | None = None, replayed: list | None = None):
        self.cfg, self.run, self._skip = cfg, None, list(replayed or [])
        w = cfg.wandb
        try:
            import wandb
            self.run = wandb.init(
                project=w.project or os.environ.get("WANDB_PROJECT") or "ddptrain", entity=w.entity,
                name=w.name or cfg.name, group=w.group, tags=w.tags or None, notes=w.notes,
                config=to_dict(cfg), id=run_id, resume="allow" if run_id else None,
                mode=resolve_mode(w.mode), dir=os.environ.get("WANDB_DIR") or str(cfg.run_dir))
        except Exception as e:
            self._fail(e)

    @property
    def tracking(self) -> dict:
        return {"wandb_run_id": self.run.id} if self.run is not None else {}

    def _fail(self, error: Exception) -> None:
        from .runlog import warn
        warn(f"wandb disabled for this run after an error ({type(error).__name__}: "
             f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}); the local logs go on")
        self.run = None

    def record(self, event: dict) -> None:
        if self._skip:  # already sent by the attempt that died after the checkpoint we resumed from
            if self._skip[0] == (event["split"], event["step"]):
                self._skip.pop(0)
                return
            self._skip = []  # this run takes another course (a longer run after its test): the rest is not written again
        if self.run is None:
            return
        split = event["split"]
        data = {}
        for k, v in event.items():
            if k not in ("split", "step", "epoch", "time"):  # per-layer values as a chart each: train/grad_norms/<layer>
                data.update({f"{split}/{k}/{name}": x for name, x in v.items()} if isinstance(v, dict) else
                            {f"{split}/{k}": v})
        try:
            self.run.log({**data, "epoch": event["epoch"]}, step=event["step"])
        except Exception as e:
            self._fail(e)

    def progress(self, step: int, total: int) -> None:
        pass

    def summary(self, summary: dict) -> None:
        if self.run is None:
            return
        flat = {k: v for k, v in summary.items() if not isinstance(v, dict)}
        for split in ("val", "test"):
            for k, v in (summary.get(split) or {}).items():
                flat[f"{split}/{k}"] = v
        flat[f"best/{summary['monitor']}"] = summary["best_value"]
        try:
            self.run.summary.update(flat)
            from .checkpoint import best_path
            best = best_path(self.cfg.run_dir, self.cfg.dist.strategy)
            if self.cfg.wandb.log_best_checkpoint and summary.get("status") == "completed" and best.exists():
                self._log_best(best, summary)
        except Exception as e:
            self._fail(e)

    def _log_best(self, best: Path, summary: dict) -> None:
        """The best weights as a model artifact, if whole (not damaged, and marked complete)."""
        from .checkpoint import verify
        unusable = verify(best)
        if unusable:
            from .runlog import warn
            warn(f"wandb: '{best}' is not uploaded as the model artifact: {unusable}")
            return
        import wandb
        artifact = wandb.Artifact(f"{self.cfg.name}-best", type="model",
                                  metadata={"monitor": summary["monitor"], "value": summary["best_value"]})
        if best.is_dir():
            artifact.add_dir(str(best), name="best")
        else:
            artifact.add_file(str(best))
        self.run.log_artifact(artifact)

    def close(self, failed: bool = False) -> None:
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=1 if failed else 0)
        except Exception as e:
            self._fail(e)
        self.run = None


def run_dirs(run_dir: Path) -> list[Path]:
    """The offline run folders wandb wrote for this run directory (one per attempt)."""
    return sorted((run_dir / "wandb").glob("offline-run-*"))
