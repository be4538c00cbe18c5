"""The agent: the loop that turns sources into the datapath.

Node discovery (node.py), modes, config, and the HTTP endpoints (http/).
"""
