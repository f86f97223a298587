"""Code generated from protocols/wire/privinf.proto; do not edit (see regenerate.py)."""
