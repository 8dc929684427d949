"""slm-dist: depth-prune LLMs with Sliding Layer Merging, staged on Ray."""

__version__ = "0.1.0"
