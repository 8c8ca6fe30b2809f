"""malloc-ray: a Ray-distributed benchmark of KV-memory compression for HSTU recommenders."""

__version__ = "0.1.0"
