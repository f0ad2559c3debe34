"""Speculative decoding (docs/speculative_decoding.md).

Each step the scheduler gives a decoding request room for a few proposed tokens
(policy.py decides how many); a proposer fills them (ngram.py: prompt lookup;
draft_model.py: a smaller model on the same KV blocks); the target model scores the
request's last token and every proposal in one forward pass; rejection.py keeps the
longest prefix the target's own sampling agrees with, plus one token of the target's,
so the output distribution is exactly the target's.
"""
