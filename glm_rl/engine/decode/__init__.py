"""Decode loops of the embedded engine."""
