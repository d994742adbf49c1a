"""Sluice workers: consume the entry topics, shape events into rows, store them."""
