"""``bipost demo``: an offline end-to-end run (tiny model, synthetic verifiable data)."""

from bipost.demo.run import run_demo

__all__ = ["run_demo"]
