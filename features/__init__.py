"""Behaviour events, catalogue and users: contracts, readers, validation, vocabularies, splits, profiles.

Imports nothing from ``towerline.training`` or ``towerline.serving`` (checked by tests/test_layers.py).
"""
