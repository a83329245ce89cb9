"""Exhaustive model checks of the delivery protocol (pure Python, explicit-state BFS)."""
