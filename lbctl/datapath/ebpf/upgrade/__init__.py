"""Upgrading pinned maps in place: layouts, records, conversion, copy and swap."""
