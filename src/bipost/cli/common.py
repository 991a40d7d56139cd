"""Process-level setup shared by every entry point."""

from __future__ import annotations

import logging
import os
import sys


def setup_process() -> None:
    """Quiet library chatter, log bipost's own INFO lines."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(format="%(message)s", level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("bipost").setLevel(logging.INFO)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def finish_distributed(code: int = 0) -> None:
    """End a distributed run without gloo's abort at interpreter exit (see README, Scaling out)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
