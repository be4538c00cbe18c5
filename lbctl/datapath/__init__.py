"""Datapaths: what turns the plan into kernel state."""
