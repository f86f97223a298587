"""How secrets move: the protocol configuration and session hello at the top level, links in
``net``, the MPC engine in ``mpc``, the shared KV cache in ``kv``, the HE evaluator in ``he``,
equivariant obfuscation in ``ee``, and one session protocol per route in ``routes``."""
