"""Frugality routing rules and the engine that combines them."""
