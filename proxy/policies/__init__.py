"""The SPEC §6 policies, one module each, and the request facts their templates read."""
