"""Equivariant obfuscation (EE): the model owner permutes a model's units with secret permutations
that commute with its operations, ships the transformed weights to an untrusted compute node, and
sends permuted inputs (``keys``, ``transform``); ``attack`` is what that compute node can recover.
See docs/ee.md for what it protects and what it does not."""
