"""The semantic cache (SPEC §6 `llm-semantic-cache-lookup` / `-store`): embedders, vector
indexes, cached entries, and the policy that uses them."""
