"""tokenmill's gateway: API keys, exact limits and budgets across replicas, cache-aware
routing and failover in front of OpenAI-compatible servers (docs/gateway.md)."""
