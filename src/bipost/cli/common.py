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


def run_guarded(prog: str, fn: Callable[[], int]) -> int:
    """Run a command; a user error (bad config, bad data, occupied output dir) becomes a one-line
    message and exit code 2 instead of a traceback. Distributed runs end via finish_distributed."""
    from bipost.configio import ConfigError
    from bipost.data import DataError

    try:
        code = fn()
    except (ConfigError, DataError, FileExistsError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        code = 2
    finish_distributed(code)
    return code


def finish_distributed(code: int = 0) -> None:
    """End a distributed run without gloo's abort at interpreter exit (see README, Scaling out)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
