"""The Optuna study that a sweep's workers share: the sampler and the pruner a search space asks for, and the
study opened (or created) in its storage, whose URL is shown with its password hidden; a storage that cannot
be used is one ConfigError.
"""
from __future__ import annotations

import json
import time
import warnings

from .config import ConfigError
from .space import Space


def sampler(name: str, space: Space, seed: int):
    import optuna
    if name == "grid":
        ranges = [p.key for p in space.params if p.kind in ("float", "int")]
        if ranges:
            raise ConfigError(f"--sampler grid needs choices, not ranges, for: {', '.join(ranges)}")
        grid = {p.key: [json.dumps(c) for c in p.choices] if p.encoded else p.choices
                for p in space.params if p.kind == "choice"}
        return optuna.samplers.GridSampler(grid, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.GPSampler(seed=seed)


def pruner(spec: dict):
    import optuna
    name = spec.get("name", "median")
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    try:
        if name == "median":
            return optuna.pruners.MedianPruner(**kwargs)
        if name == "successive_halving":
            return optuna.pruners.SuccessiveHalvingPruner(**kwargs)
        return optuna.pruners.NopPruner()
    except (TypeError, ValueError) as e:  # an unknown argument, or one out of its range
        raise ConfigError(f"search space: pruner {name}: {e}") from None


def _without_password(url: str) -> str:
    """The storage URL as it may be shown: its password, if any, hidden."""
    from sqlalchemy.engine import make_url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


# Database drivers whose pip package is not named as their module.
DRIVER_PACKAGES = {"MySQLdb": "mysqlclient", "mysql": "mysql-connector-python"}


def open_study(url: str, study_name: str, space: Space):
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from sqlalchemy.exc import ArgumentError, OperationalError
    # A worker that dies leaves its trial RUNNING; the heartbeat marks it failed and a worker retries it.
    # SQLite serialises writers: wait for the lock instead of failing when several workers share the file.
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    for attempt in range(5):  # workers that start together race to create the tables and the study
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                rdb = RDBStorage(url, engine_kwargs=engine, heartbeat_interval=2, grace_period=10,
                                 heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
            study = optuna.create_study(study_name=study_name, storage=rdb, load_if_exists=True,
                                        direction=space.direction, pruner=pruner(space.pruner))
            break
        except ArgumentError as e:  # not a URL, or a database SQLAlchemy does not know: no retry helps
            raise ConfigError(f"--storage '{_without_password(url)}': {e}; expected a database URL such as "
                              f"sqlite:///study.db") from None
        except ImportError as e:  # SQLAlchemy's driver for the database is not installed: no retry helps
            driver = e.__cause__ if isinstance(e.__cause__, ImportError) else e  # Optuna's own says only "install one"
            package = DRIVER_PACKAGES.get(driver.name, driver.name)
            raise ConfigError(f"--storage '{_without_password(url)}': SQLAlchemy's driver for it, the module "
                              f"'{driver.name}', is not installed: pip install {package}, or name an installed "
                              f"driver in the URL (dialect+driver://...)") from None
        except Exception as e:
            if attempt < 4:
                time.sleep(0.5 + attempt)
            elif isinstance(e, OperationalError):  # the database cannot be opened or reached, retried
                raise ConfigError(f"--storage '{_without_password(url)}': cannot open it: {e.orig}") from None
            else:
                raise
    # An existing study keeps its own direction (Optuna ignores the one asked for): its best trial and this
    # search space's must mean the same thing.
    stored = study.direction.name.lower()
    objective = study.user_attrs.get("objective", space.objective)
    if stored != space.direction or objective != space.objective:
        raise ConfigError(f"study '{study_name}' in '{_without_password(url)}' was run to {stored} {objective}; the "
                          f"search space asks to {space.direction} {space.objective}: give another --study, or "
                          f"the same objective and direction")
    if "objective" not in study.user_attrs:
        study.set_user_attr("objective", space.objective)
    return study
