"""Preemption: a signal makes every rank finish its step, write a checkpoint and exit with code 75.

Schedulers warn a job before they stop it: SLURM sends SIGTERM (preemption, ``scancel``) or the
signal of ``--signal`` (e.g. SIGUSR1 before the time limit), cloud schedulers SIGTERM; Ctrl-C is
SIGINT. For the signals in ``train.save_on_signals`` the handler only sets a flag, so the step
in progress completes normally. The flag travels in the step's one all-reduce (the loop adds one
number to it), so a signal that reached a single rank stops every rank after the same step. Then
the loop writes a complete checkpoint of that step and raises :class:`Preempted`, which exits the
process with :data:`EXIT_PREEMPTED` (75, ``EX_TEMPFAIL``: "try again"). Rerunning the same
command with ``train.resume=auto`` (the seed CLIs' ``--load_checkpoint``) continues exactly where
the run stopped. A second signal while the first is pending gets the signal's previous handler
(for SIGINT: ``KeyboardInterrupt``), so an impatient Ctrl-C still stops at once.

Handlers are installed only while :meth:`Trainer.train` runs, in the main thread (Python delivers
signals there only); the previous handlers are restored afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Iterator, Sequence

log = logging.getLogger("bipost")

EXIT_PREEMPTED = 75
"""Exit code of a run stopped by a signal after writing its checkpoint (sysexits' EX_TEMPFAIL)."""


class Preempted(SystemExit):
    """The run stopped on a signal after writing a complete checkpoint; a ``SystemExit`` with code
    :data:`EXIT_PREEMPTED`, so a script that calls ``train()`` exits with it unless it catches it."""

    def __init__(self, signal_name: str, step: int, checkpoint) -> None:
        super().__init__(EXIT_PREEMPTED)
        self.signal_name = signal_name
        self.step = step
        self.checkpoint = checkpoint

    def __str__(self) -> str:
        return (f"stopped by {self.signal_name} after step {self.step}; checkpoint {self.checkpoint} written. "
                f"Run the same command with train.resume=auto (seed CLIs: --load_checkpoint) to continue")


class SignalFlag:
    """The signals of ``train.save_on_signals`` set this rank's flag instead of stopping the process."""

    def __init__(self, names: Sequence[str]):
        self.signals = [signal.Signals[n] for n in names]
        self.received: str | None = None
        """Name of the first signal this rank received (None: none)."""
        self.stop = False
        """Some rank received one: set by :meth:`agree` from the step's all-reduce, the same on every rank."""
        self._previous: dict[signal.Signals, object] = {}

    # ------------------------------------------------------------------ handlers
    def install(self) -> None:
        if not self.signals or threading.current_thread() is not threading.main_thread():
            return  # Python runs handlers in the main thread only; a run in another thread keeps the defaults
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        sig = signal.Signals(signum)
        if self.received is None:
            self.received = sig.name
            # stderr, on every rank: which rank got it matters when only one did
            log.warning("[signal] %s received: finishing the current step, then saving a checkpoint and exiting "
                        "(send it again to stop at once)", sig.name)
            return
        previous = self._previous.get(sig, signal.SIG_DFL)
        self.uninstall()
        if callable(previous):
            previous(signum, frame)  # e.g. SIGINT's KeyboardInterrupt
        else:
            signal.raise_signal(sig)  # the default action

    # ------------------------------------------------------------------ the step's all-reduce
    def local_flag(self) -> float:
        """This rank's contribution to the step's all-reduce (1.0 once a signal arrived)."""
        return 1.0 if self.received is not None else 0.0

    def agree(self, total: float) -> None:
        """``total``: the all-reduced flags of a step; > 0 means some rank got a signal."""
        self.stop = self.stop or total > 0


@contextlib.contextmanager
def handling(flag: SignalFlag) -> Iterator[SignalFlag]:
    """Signal handlers installed inside (the training loop), the previous ones restored after."""
    flag.install()
    try:
        yield flag
    finally:
        flag.uninstall()


def save_and_stop(trainer, signal_name: str | None) -> None:
    """Write ``trainer``'s checkpoint of the step just finished (every rank) and raise :class:`Preempted`."""
    path = trainer.save()
    trainer.metrics.close()
    err = Preempted(signal_name or "a signal on another rank", trainer.step, path)
    trainer.engine.print(f"[preempted] {err}")
    raise err
