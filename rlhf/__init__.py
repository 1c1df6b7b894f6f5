"""Shared pieces of the online RLHF service: CLI, wire contracts, starter model."""
