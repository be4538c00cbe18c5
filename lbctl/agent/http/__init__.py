"""The agent's HTTP endpoints: server, metrics, statusz, tracez, NodePort health checks."""
