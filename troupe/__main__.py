"""``python -m troupe``: the same as the ``troupe`` command."""

from troupe.cli import main

raise SystemExit(main())
