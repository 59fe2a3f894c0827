"""Shipped configuration presets (TOML)."""
