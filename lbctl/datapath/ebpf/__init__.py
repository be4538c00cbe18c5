"""The eBPF datapath: compile, load and attach the programs, write their maps.

Also reading them back (inspect), the mirror of the programs (trace/) and
upgrading pinned maps in place (upgrade/).
"""
