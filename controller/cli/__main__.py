"""``python -m controller.cli``: shoalctl from a source tree."""

from controller.cli.main import main

raise SystemExit(main())
