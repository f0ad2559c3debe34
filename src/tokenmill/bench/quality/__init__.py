"""The quality lab (`tokenmill eval`): perplexity, KL divergence against a saved reference,
and regression verdicts, stored in the bench history. See docs/quality.md."""
