"""Offline evaluation of the shipped models: metrics, per-network and whole-pipeline evaluators.

Nothing at run time imports this package; ``dermnode evaluate`` reaches it from the CLI.
"""
