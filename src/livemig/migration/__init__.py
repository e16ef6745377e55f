"""Precopy migration over multifd channels: the source, the destination and their statistics."""
