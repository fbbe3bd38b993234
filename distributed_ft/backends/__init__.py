"""Orchestration backends (Ray Train); the only place that imports ray."""
