"""shoalctl, the admin CLI: one module per noun (node, pool, volume, snapshot, status), tables for people,
``-o json|yaml`` for scripts.  ``main`` is the ``shoalctl`` entry point (pyproject: ``controller.cli:main``)."""

from controller.cli.main import main

__all__ = ["main"]
