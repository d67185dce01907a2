"""Stop signals: what a training process does on SIGTERM / SIGUSR1 (preemption) and SIGINT (Ctrl-C).

Owns the handlers and the rules (the trainer, :mod:`stitching.train.loop`, looks at :class:`StopSignals`
where it may stop, and says what it did):

- A signal is only remembered by its handler. The step loop looks at it after every optimizer step, the
  evaluation after every batch; under DDP the ranks agree (:meth:`StopSignals.agree`, an all-reduce of the
  strongest request, every ``train.preempt_check_every`` steps or batches:
  :func:`stitching.train.perf.preempt_check_due`), so every rank stops at the same point. Then the trainer
  checkpoints and exits with ``EXIT_PREEMPTED`` (75, SIGTERM/SIGUSR1) or ``EXIT_INTERRUPTED`` (130, Ctrl-C);
  an interruption anywhere in the group makes the whole group interrupted (the user asked for it: no
  requeue).
- SIGTERM / SIGUSR1 after the first stop signal are ignored: SLURM may deliver one twice (to the job step and
  forwarded by the batch script), and Python's default handler would turn the orderly exit into a kill.
- SIGINT: the first one prints one line at once (what will happen, and that a second one aborts); a second
  one raises :class:`Aborted` (a ``KeyboardInterrupt``) at once: the trainer writes nothing new, removes no
  complete file (every write goes through a temporary name, removed when interrupted), and keeps the last
  complete checkpoint (a third one while it winds up ends the process there, by the signal's default action).
  Under ``torchrun`` (``$TORCHELASTIC_RUN_ID`` set) the agent forwards the terminal's
  Ctrl-C to workers that received it already, so a repeat within :data:`REPEAT_S` seconds of the first is
  that copy, not a second Ctrl-C.
- SIGINT ignored when the process started (a background job of a non-interactive shell, e.g. the SLURM
  batch script's command) stays ignored, as Python itself leaves it.
- Python lets only the main thread set handlers: a run in another thread (``stitching.train()`` called from
  one) installs none, and the signals do what the main thread's handlers do.
- Afterwards (:meth:`StopSignals.restore`) the handlers from before come back -- in a process that goes on
  (``stitching.train()`` in a notebook or a script) also after a stop; a process that exits with the run's
  code (the command line) keeps them until it exits, so a late duplicate (SLURM's second SIGTERM, torchrun's
  copy of the Ctrl-C) neither kills it nor prints a traceback.

Before :class:`StopSignals` is installed (while the run starts up: model, data, least-squares fit) there is
nothing to save: Ctrl-C raises Python's ``KeyboardInterrupt`` at once and the trainer ends as interrupted.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import torch

from stitching.train import distributed as D

#: what a process was asked for (ordered: the strongest request over the ranks wins)
NONE, PREEMPT, INTERRUPT = 0, 1, 2
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
#: under torchrun: a SIGINT this soon after the first is the agent's copy of the same Ctrl-C
REPEAT_S = 2.0
TORCHRUN_ENV = "TORCHELASTIC_RUN_ID"

FIRST_CTRL_C = ("\nCtrl-C: stopping at the next step with a checkpoint (Ctrl-C again aborts at once, keeping the "
                "last complete checkpoint)\n")


class Aborted(KeyboardInterrupt):
    """A second Ctrl-C: stop at once, keeping the last complete checkpoint."""


class StopSignals:
    """Remembers SIGTERM/SIGUSR1/SIGINT while installed (:meth:`restore` puts the old handlers back)."""

    def __init__(self, is_main: bool = True, environ=os.environ):
        self.signal: int | None = None      # the first preemption signal this process saw
        self.interrupted_at: float | None = None     # when this process first saw SIGINT
        self.seen_at: int | None = None     # the optimizer step after which this process first looked at it
        self.agreed = NONE                  # what the ranks agreed on (agree)
        self.is_main = is_main
        self.repeat_s = REPEAT_S if environ.get(TORCHRUN_ENV) else 0.0
        self._old = {}
        if threading.current_thread() is not threading.main_thread():
            return                              # (signal.signal works in the main thread only)
        for sig in PREEMPT_SIGNALS:
            self._old[sig] = signal.signal(sig, self._preempt)
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._old[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)

    @property
    def level(self) -> int:
        """What this process was asked for: :data:`INTERRUPT`, :data:`PREEMPT` or :data:`NONE`."""
        return INTERRUPT if self.interrupted_at is not None else PREEMPT if self.signal is not None else NONE

    def _preempt(self, signum, frame):
        if self.signal is None:
            self.signal = signum
        for sig in PREEMPT_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def _interrupt(self, signum, frame):
        now = time.monotonic()
        if self.interrupted_at is None:
            self.interrupted_at = now
            for sig in PREEMPT_SIGNALS:         # (a preemption arriving now changes nothing)
                signal.signal(sig, signal.SIG_IGN)
            if self.is_main:
                os.write(2, FIRST_CTRL_C.encode())      # (print could re-enter a write the signal interrupted)
            return
        if now - self.interrupted_at < self.repeat_s:
            return                              # torchrun's agent forwarding the same Ctrl-C
        signal.signal(signal.SIGINT, signal.SIG_DFL)    # a third one while it winds up: the process ends there
        raise Aborted()

    def agree(self, device: torch.device, info: D.DistInfo) -> int:
        """The strongest request over the ranks (a collective under DDP: every rank calls it at the same
        point); remembered in :attr:`agreed`."""
        self.agreed = int(D.all_max(self.level, device, info))
        return self.agreed

    def restore(self, exiting: bool = False) -> None:
        """The handlers from before; not after a stop when ``exiting`` (the process is on its way out, and a
        late duplicate signal must not kill it)."""
        if exiting and self.level != NONE:
            return
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
