"""`lbctl trace`'s engine: the programs' decision mirrored in Python over the pinned maps."""
