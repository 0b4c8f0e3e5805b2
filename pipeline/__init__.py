"""Orchestration and I/O for the data engine: Hydra stages run on Ray."""
