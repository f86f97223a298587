"""The cost ledger: counting (bytes, rounds, time, storage per scope and phase), pricing by
network profile, and reports. A leaf: it imports nothing else of privinf, so every layer may
record into it."""
