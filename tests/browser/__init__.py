"""Helpers for the browser test: the mesh and the bot as processes, and headless Chromium."""
