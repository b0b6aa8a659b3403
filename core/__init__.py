"""Towerline: behaviour sequences -> two-tower retrieval + ranking -> FAISS -> Ray Serve."""

__version__ = "0.1.0"
