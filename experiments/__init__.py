"""Experiments that reproduce published findings at small scale."""
