"""The plan: what the datapath must hold for the model, pure (planner, scheduling)."""
