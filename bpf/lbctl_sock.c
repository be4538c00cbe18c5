/* cgroup socket hooks for the node's own processes: not written yet. */
