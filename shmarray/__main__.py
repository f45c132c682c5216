"""``python -m shmarray``: the same as the ``shmarray`` command."""

from ._cli import main

raise SystemExit(main())
