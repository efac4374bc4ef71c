"""The bench's phases, one module each (or a closely related group)."""
