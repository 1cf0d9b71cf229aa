"""A handler module that fails to import with a two-line message."""

raise RuntimeError("first line\nsecond line")
