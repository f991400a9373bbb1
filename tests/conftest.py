import logging
import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


class Captured(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def diagnostics():
    """What ddptrain says through its `ddptrain` logger in this process, captured instead of printed."""
    import ddptrain.runlog  # noqa: F401  installs the default handler
    logger = logging.getLogger("ddptrain")
    captured, saved = Captured(), logger.handlers[:]
    logger.handlers[:] = [captured]
    yield captured.messages
    logger.handlers[:] = saved
