"""Allow ``python -m scachefs`` as a synonym of the ``scachefs`` command."""

from scachefs.cli import main

raise SystemExit(main())
