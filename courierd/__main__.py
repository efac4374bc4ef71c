"""`python -m courierd` is the same as the `courierd` command."""

from courierd.cli import main

raise SystemExit(main())
