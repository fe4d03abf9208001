"""Mesh bridge: validation, identity, dead letters, de-duplication and partitioning (issue 4)."""
