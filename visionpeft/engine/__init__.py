"""Placeholder package; see ../shared/design.md."""
