"""`python -m courierd` is the same as the `courierd` command."""

from courierd.cli import main

# Guarded: the core process is started with "spawn", which imports this module again.
if __name__ == "__main__":
    raise SystemExit(main())
