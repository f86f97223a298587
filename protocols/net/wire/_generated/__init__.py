"""Code generated from protocols/net/wire/privinf.proto; do not edit (see regenerate.py)."""
