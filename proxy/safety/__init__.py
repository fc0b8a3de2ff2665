"""Content safety (SPEC §6 `llm-content-safety`, issue 9): what a request says, flattened by
role class from every body shape (`flatten`), split into overlapping windows for a backend
with a length limit (`flatten.windows`), and a local blocklist/regex screen on normalised
text (`screen`). Pure: no I/O, no asyncio."""
