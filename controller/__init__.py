"""Shoal controller."""
