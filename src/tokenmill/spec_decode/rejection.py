"""Verification: keep the proposals the target's own sampling agrees with.

For each request with proposals d_1..d_k the target scored k + 1 positions in one pass:
row j is its distribution p_j for the token after d_1..d_j. Going left to right:

- greedy: d_{j+1} is kept while it is the argmax of row j; the first miss is replaced
  by that argmax. The output is token-identical to decoding without proposals.
- sampled: d_{j+1} is kept with probability min(1, p_j(d) / q_j(d)), where q_j is the
  distribution the draft sampled it from (a point mass for ngram, so the chance is
  p_j(d)); the first rejected position draws from the residual max(0, p_j - q_j),
  normalised. Each emitted token is then distributed exactly as p_j (Leviathan et al.
  2023, Chen et al. 2023): the output distribution is the target's.

When every proposal is kept, row k gives one more token, sampled as usual. Either way a
request gets between 1 and k + 1 tokens from the step. p_j is the distribution the plain
sampler would draw from (penalties, min_tokens, structured-output masks, temperature,
min_p, top_k, top_p), and logprobs are the target's raw ones, as without speculation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.model.layers.sampler import (
    SampledLogprobs,
    SamplingState,
    gather_logprobs,
    process_logits,
    race,
)


@dataclass
class SpecGroup:
    """One request's rows of a verification step."""

    first_row: int  # row of p_0; the request owns rows first_row .. first_row + len(draft_token_ids)
    draft_token_ids: list[int]
    # [k, vocab] the distributions the draft sampled each proposal from; None: a point
    # mass on each proposal (ngram, or a greedy draft). One row more than the proposals:
    # the draft's next proposal was cut (the grammar refused it), so that position is a
    # certain rejection and draws from the residual of this row.
    draft_probs: torch.Tensor | None = None


@dataclass
class VerifiedTokens:
    token_ids: list[int]  # the kept proposals, then the target's token
    logprobs: list[SampledLogprobs] | None  # one per token, when the request asked


def verify(logits: torch.Tensor, states: list[SamplingState], groups: list[SpecGroup]) -> list[VerifiedTokens]:
    """Verify every group's proposals.

    Args:
        logits: [rows, vocab] float32 target logits, modified in place.
        states: one per row; row first_row + j has the request's output followed by
            d_1..d_j (penalties and min_tokens see the proposals before the position).
        groups: the requests, each owning consecutive rows.
    """
    raw = _raw_logprobs(logits, states, groups)
    random_rows = set(process_logits(logits, states))
    greedy_ids = logits.argmax(dim=-1).tolist()  # [rows]
    out: list[VerifiedTokens] = []
    for g in groups:
        r0, drafts = g.first_row, g.draft_token_ids
        if r0 in random_rows:
            tokens = _verify_sampled(logits[r0:r0 + len(drafts) + 1], states[r0:r0 + len(drafts) + 1], g)
        else:
            a = 0
            while a < len(drafts) and greedy_ids[r0 + a] == drafts[a]:
                a += 1
            tokens = drafts[:a] + [greedy_ids[r0 + a]]
        logprobs = None
        if r0 in raw:
            rows = raw[r0][: len(tokens)]
            num_top = min(states[r0].params.logprobs, rows.shape[-1])
            logprobs = gather_logprobs(rows, torch.tensor(tokens, device=rows.device), num_top)
        out.append(VerifiedTokens(tokens, logprobs))
    return out


def _raw_logprobs(logits: torch.Tensor, states: list[SamplingState],
                  groups: list[SpecGroup]) -> dict[int, torch.Tensor]:
    """The model's own log-probabilities of the rows of requests that asked for logprobs,
    taken before any processing (as the plain sampler reports them)."""
    raw = {}
    for g in groups:
        if states[g.first_row].params.logprobs is not None:
            rows = logits[g.first_row:g.first_row + len(g.draft_token_ids) + 1]
            raw[g.first_row] = torch.log_softmax(rows, dim=-1)  # [k + 1, vocab]
    return raw


def _verify_sampled(rows: torch.Tensor, states: list[SamplingState], g: SpecGroup) -> list[int]:
    """rows: [k + 1, vocab] processed logits of one sampled request."""
    drafts = g.draft_token_ids
    k = len(drafts)
    device = rows.device
    num_accepted = k
    probs = torch.softmax(rows, dim=-1)  # [k + 1, vocab] p_0 .. p_k
    if k:
        positions = torch.arange(k, device=device)
        draft_ids = torch.tensor(drafts, device=device)
        p = probs[positions, draft_ids]  # [k]
        q = g.draft_probs[positions, draft_ids] if g.draft_probs is not None else torch.ones(k, device=device)
        u = torch.rand(k, generator=states[0].generator).to(device)  # the request's generator is on the host
        # u < p / q, without dividing by a q that may be 0 for a token the draft never picks.
        kept = (u * q < p).tolist()
        num_accepted = kept.index(False) if False in kept else k
    cut = g.draft_probs is not None and len(g.draft_probs) > k  # the next proposal was refused
    if num_accepted == k and not cut:
        return drafts + [int(race(rows[k:k + 1], [states[k]])[0])]
    a = num_accepted
    if g.draft_probs is not None:
        residual = (probs[a] - g.draft_probs[a]).clamp_(min=0.0)
    else:
        residual = probs[a].clone()
        residual[drafts[a]] = 0.0
    if not float(residual.sum()) > 0.0:  # p == q up to rounding: any draw from p is exact
        residual = probs[a]
    return drafts[:a] + [int(race(torch.log(residual)[None], [states[a]])[0])]
