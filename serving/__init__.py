"""FAISS indexes, business rules and the Ray Serve application.

Imports only model definitions from ``towerline.training`` and contracts/vocabularies from
``towerline.features`` (checked by tests/test_layers.py).
"""
