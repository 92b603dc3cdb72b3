"""Metrics of the workloads, as pure functions over models and data."""
