"""Cluster shape and set-up: topology, placement (pure), process groups, local Ray clusters.

Knows nothing about requests.
"""
