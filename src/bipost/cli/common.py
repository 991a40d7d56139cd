"""Process-level setup shared by every entry point."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable


def setup_process() -> None:
    """Quiet library chatter, log bipost's own INFO lines."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(format="%(message)s", level=logging.WARNING, stream=sys.stderr)
    # Data summaries and progress notes once per run, not once per rank (every launcher sets RANK).
    main_rank = int(os.environ.get("RANK", "0")) == 0
    logging.getLogger("bipost").setLevel(logging.INFO if main_rank else logging.WARNING)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def print_main(*args, **kwargs) -> None:
    """Print once per run, not once per rank (every launcher sets RANK)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


EXIT_OK = 0
EXIT_USAGE = 2
"""A bad config, bad data, an occupied output_dir, a resume that cannot proceed: a one-line message."""
EXIT_DIVERGED = 3
"""train.max_skipped_steps non-finite steps in a row, or weights with inf / NaN that were to be saved."""
EXIT_CHECKPOINT = 4
"""A checkpoint (or the final model) could not be written, e.g. a full disk (earlier checkpoints are
intact), or none of the run's checkpoints could be loaded."""
EXIT_COLLECTIVE = 5
"""A collective failed or timed out (dist.timeout): another rank died or hung; the message names the stage."""
# EXIT_PREEMPTED (75, sysexits' EX_TEMPFAIL): stopped by a signal in train.save_on_signals after writing
# a checkpoint; rerun the same command (train.resume=auto, or the seed CLIs' --load_checkpoint) to continue.
from bipost.train.preempt import EXIT_PREEMPTED  # noqa: E402


def exit_code_for(err: BaseException) -> int | None:
    """The documented exit code of an error a run can end with (None: an unexpected error)."""
    from bipost.configio import ConfigError
    from bipost.data import DataError
    from bipost.train.checkpoint import CheckpointWriteError
    from bipost.train.resume import CheckpointLoadError
    from bipost.engine import CollectiveError
    from bipost.train.guard import NonFiniteError
    from bipost.train.preempt import Preempted

    for kinds, code in (((ConfigError, DataError, FileExistsError), EXIT_USAGE), ((NonFiniteError,), EXIT_DIVERGED),
                        ((CheckpointWriteError, CheckpointLoadError), EXIT_CHECKPOINT),
                        ((CollectiveError,), EXIT_COLLECTIVE), ((Preempted,), EXIT_PREEMPTED)):
        if isinstance(err, kinds):
            return code
    return None


def run_guarded(prog: str, fn: Callable[[], int]) -> int:
    """Run a command; the errors a run is expected to meet (a bad config or data, an occupied output
    dir, a diverged run, a failed checkpoint write, a dead or hung rank, a preemption signal) become
    a one-line message and their exit code (``EXIT_*`` above) instead of a traceback. Distributed
    runs end via finish_distributed."""
    try:
        code = fn()
    except BaseException as e:  # noqa: BLE001 - only the documented kinds are handled, the rest re-raised
        code = exit_code_for(e)  # type: ignore[assignment]
        if code is None:
            raise
        if code != EXIT_PREEMPTED:  # the trainer has printed the preemption message
            rank = os.environ.get("RANK")
            where = f" (rank {rank})" if rank is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
            print(f"{prog}: error{where}: {e}", file=sys.stderr, flush=True)
        finish_distributed(code, clean=code != EXIT_COLLECTIVE)
        return code
    finish_distributed(code)
    return code


def finish_distributed(code: int = 0, clean: bool = True) -> None:
    """End a distributed run without gloo's abort at interpreter exit (see README, Scaling out).
    ``clean=False`` (a collective failed): skip tearing the process group down, which may wait on
    the ranks that are gone."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if clean:
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
