"""A handler module that raises KeyboardInterrupt as it is imported."""

raise KeyboardInterrupt
