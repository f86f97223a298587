"""One session protocol per route, each with its client and server (and dealer) sides: ``mpc``,
``he`` and the plaintext reference ``plain``; ``local_run`` runs a whole MPC session in one
process over in-memory channels (tests, benches)."""
