"""``python -m rerouting.conformance.audit``: the same as ``rerouting audit``."""

from .cli import main

raise SystemExit(main())
