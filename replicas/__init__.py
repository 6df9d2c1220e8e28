"""Serving processes: trunk and expert ranks, the dispatch/combine seam, the engine, the ingress and the app."""
