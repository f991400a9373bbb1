"""torchrun's agent as ddptrain runs it (`ddptrain launch`, launch/*.sh, the sbatch scripts):
`python -m ddptrain.agent <torchrun arguments>`.

It forwards USR1 and USR2 to the workers as well as torchrun's TERM, INT, HUP and QUIT, unless given
`--signals-to-handle` (torchrun forwards only its four by default: pytorch#154849), and starts each attempt
with a fresh rendezvous store unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE is set: the shared one keeps the dead
attempt's peer addresses, so an elastic restart often fails or hangs (pytorch#135712).

torchrun exits 1 whatever its workers' status, after a 40-line ChildFailedError report. Here a worker's
ddptrain status (2 a user mistake, 3 non-finite, 4 a collective failure, 75 preempted) comes through as
the agent's own, and the worker's one-line message is all that is printed; a worker killed by a signal is
one line and status 4 (a rank died), any other failure one line after the worker's own traceback. A signal
sent to the agent (forwarded to its workers, which checkpoint and exit) is status 128 + the signal's number,
without torchrun's SignalException traceback.
"""
from __future__ import annotations

import logging
import os
import sys

STATUSES = (2, 3, 4, 75)
SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"


class _QuietAboutFailures(logging.Filter):
    """Drops the agent's log lines about a failed worker and the others it stops: main() says it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg.startswith("failed (exitcode: %s)") or record.msg.startswith("Sending process %s closing"))


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_QuietAboutFailures())
    if not any(a.split("=")[0] in ("--signals-to-handle", "--signals_to_handle") for a in argv):
        argv = [f"--signals-to-handle={SIGNALS}", *argv]
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    try:
        torchrun(argv)
    except ChildFailedError as e:
        rank, first = e.get_first_failure()
        known = [f.exitcode for _, f in [(rank, first), *sorted(e.failures.items())] if f.exitcode in STATUSES]
        if known:  # the worker has said what went wrong, in one line
            return known[0]
        if first.exitcode < 0:  # killed: OOM, SIGKILL, a node lost
            print(f"ddptrain: error: rank {rank} (pid {first.pid}) was killed by {first.signal_name()}; the run "
                  f"resumes from its newest checkpoint when started again", file=sys.stderr, flush=True)
            return 4
        print(f"ddptrain: error: rank {rank} (pid {first.pid}) exited with status {first.exitcode} (its traceback "
              f"is above)", file=sys.stderr, flush=True)
        return first.exitcode or 1
    except SignalException as e:
        # torchrun has passed the signal on to its workers and waited for them (a preemption checkpoint);
        # `ddptrain launch` reads what they did in the run's summary. Its traceback would say nothing more.
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
