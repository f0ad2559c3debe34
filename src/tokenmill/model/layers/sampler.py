"""Batched sampler: one row of logits per request -> one token id per request.

Follows vLLM v1's order: min_tokens mask, penalties, greedy argmax; for the other rows
temperature, min_p, top_k, top_p (on the top-k renormalised distribution), then an
exponential race. Logprobs are reported for the raw model distribution (vLLM v1's
default). Each stage runs only when some row uses it, and every result crosses to the
host in one transfer (top-p may add one small sync to decide whether it needs a full sort).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tokenmill.model import kernels
from tokenmill.model.layers.keyed_race import exponential_race
from tokenmill.model.transfer import to_device
from tokenmill.sampling_params import SamplingParams

# Top-p first looks for its cut among this many most likely tokens (see _apply_top_p).
_TOP_P_CANDIDATES = 1024


@dataclass
class SamplingState:
    """One request's inputs to this step's sampling (built per step from references)."""

    params: SamplingParams
    generator: torch.Generator | None  # set iff params.seed is not None; owned by the request
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # generated so far (penalties, min_tokens)


@dataclass
class SampledLogprobs:
    """Logprobs of one position: the chosen token first, then the top alternatives."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]  # 1 = most likely


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one sampled token per row
    logprobs: list[SampledLogprobs | None]  # per row; None where params.logprobs is None


def make_generator(seed: int) -> torch.Generator:
    """The private generator a seeded request keeps for its whole life. On the host
    whatever the model's device: it draws one key per row per step (`_row_keys`), and the
    keys cross to the device with the step's other inputs."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


class Sampler:
    """Stateless: everything per request arrives in the SamplingStates each step."""

    def sample(self, logits: torch.Tensor, states: list[SamplingState]) -> SamplerOutput:
        """Pick the next token of every request.

        Args:
            logits: [num_reqs, vocab] float32, one row per state; modified in place.
            states: the requests, in row order.

        Returns:
            Sampled token ids and, for rows that asked, their logprobs.
        """
        num_reqs = logits.shape[0]
        if len(states) != num_reqs:
            raise ValueError(f"{len(states)} sampling states for {num_reqs} rows of logits")
        if logits.dtype != torch.float32:
            logits = logits.float()

        logprob_rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
        raw_logprobs = None
        if logprob_rows:
            # Taken before any processing: users get the model's own distribution.
            rows_logits = logits if len(logprob_rows) == num_reqs else _take_rows(logits, logprob_rows)
            raw_logprobs = torch.log_softmax(rows_logits, dim=-1)  # [num_logprob_rows, vocab]

        random_rows = process_logits(logits, states)
        if not random_rows:
            sampled = logits.argmax(dim=-1)  # [num_reqs]
        elif len(random_rows) == num_reqs:
            sampled = race(logits, states)
        else:
            sampled = logits.argmax(dim=-1)
            index = to_device(random_rows, logits.device)
            sampled.index_copy_(0, index, race(logits.index_select(0, index), [states[i] for i in random_rows]))

        if raw_logprobs is None:
            return SamplerOutput(token_ids=sampled.tolist(), logprobs=[None] * num_reqs)

        num_top = min(max(states[i].params.logprobs for i in logprob_rows), logits.shape[1])  # type: ignore[type-var]
        row_sampled = sampled if len(logprob_rows) == num_reqs else _take_rows(sampled, logprob_rows)
        ids_t, values_t, ranks_t = _logprobs_tensors(raw_logprobs, row_sampled, num_top)
        token_ids, ids, values, ranks = _to_host(sampled, ids_t, values_t, ranks_t)
        width = num_top + 1
        logprobs: list[SampledLogprobs | None] = [None] * num_reqs
        for j, row in enumerate(logprob_rows):
            keep = min(states[row].params.logprobs + 1, width)  # type: ignore[operator]
            logprobs[row] = _row_logprobs(ids, values, ranks, j, width, keep)
        return SamplerOutput(token_ids=[int(t) for t in token_ids], logprobs=logprobs)


def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> list[SampledLogprobs]:
    """Logprob and rank of given tokens plus each row's top alternatives (also for prompts).

    Args:
        logprobs: [N, vocab] log-probabilities.
        token_ids: [N] the token whose logprob each row reports.
        num_top: number of top alternatives per row.

    Returns:
        One SampledLogprobs per row (copied to the host in one transfer).
    """
    ids_t, values_t, ranks_t = _logprobs_tensors(logprobs, token_ids, num_top)
    ids, values, ranks = _to_host(ids_t, values_t, ranks_t)
    width = num_top + 1
    return [_row_logprobs(ids, values, ranks, j, width, width) for j in range(logprobs.shape[0])]


# ---- stages ---------------------------------------------------------------------------------


def _apply_min_tokens(logits: torch.Tensor, states: list[SamplingState]) -> None:
    """Forbid every stop token while a request is shorter than its min_tokens."""
    vocab_size = logits.shape[1]
    rows: list[int] = []
    cols: list[int] = []
    for i, s in enumerate(states):
        if len(s.output_token_ids) < s.params.min_tokens:
            stop_ids = [t for t in s.params.all_stop_token_ids if t < vocab_size]
            rows.extend([i] * len(stop_ids))
            cols.extend(stop_ids)
    if rows:
        device = logits.device
        logits[to_device(rows, device), to_device(cols, device)] = float("-inf")


def _uses_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _padded_ids(id_lists: list[list[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    """[len(id_lists), max_len >= 1] token ids, padded with pad_id (a dummy column)."""
    width = max(1, max(len(ids) for ids in id_lists))
    rows = [ids + [pad_id] * (width - len(ids)) for ids in id_lists]
    return to_device(rows, device, torch.long)


def _apply_penalties(logits: torch.Tensor, states: list[SamplingState]) -> None:
    """Repetition (prompt or output tokens), frequency and presence (output tokens) penalties."""
    rows = [i for i, s in enumerate(states) if _uses_penalties(s.params)]
    if not rows:
        return
    num_reqs, vocab_size = logits.shape
    device = logits.device
    params = [states[i].params for i in rows]
    sub = logits if len(rows) == num_reqs else _take_rows(logits, rows)  # [num_rows, vocab]

    # Counts go into vocab_size + 1 columns: the last one swallows the padding.
    output_ids = _padded_ids([states[i].output_token_ids for i in rows], vocab_size, device)
    counts = torch.zeros(len(rows), vocab_size + 1, device=device)
    counts.scatter_add_(1, output_ids, torch.ones_like(output_ids, dtype=counts.dtype))
    counts = counts[:, :vocab_size]  # [num_rows, vocab]
    in_output = counts > 0

    if any(p.repetition_penalty != 1.0 for p in params):
        prompt_ids = _padded_ids([states[i].prompt_token_ids for i in rows], vocab_size, device)
        seen = torch.zeros(len(rows), vocab_size + 1, dtype=torch.bool, device=device)
        seen.scatter_(1, prompt_ids, True)
        seen = seen[:, :vocab_size] | in_output  # [num_rows, vocab]
        penalty = to_device([p.repetition_penalty for p in params], device)[:, None]
        # Dividing a positive logit and multiplying a negative one both make the token less likely.
        penalised = torch.where(sub > 0, sub / penalty, sub * penalty)
        sub = torch.where(seen, penalised, sub)
    if any(p.frequency_penalty != 0.0 for p in params):
        freq = to_device([p.frequency_penalty for p in params], device)[:, None]
        sub = sub - freq * counts
    if any(p.presence_penalty != 0.0 for p in params):
        presence = to_device([p.presence_penalty for p in params], device)[:, None]
        sub = sub - presence * in_output

    if len(rows) == num_reqs:
        logits.copy_(sub)
    else:
        logits.index_copy_(0, to_device(rows, device), sub)


def process_logits(logits: torch.Tensor, states: list[SamplingState]) -> list[int]:
    """Turn raw logits into the distribution each row samples from, in place: min_tokens,
    penalties, then for the random rows temperature, min_p, top_k and top_p.

    Args:
        logits: [num_rows, vocab] float32, modified in place.
        states: the rows' states.

    Returns:
        The random (not greedy) rows; greedy rows take the argmax of what is left.
    """
    _apply_min_tokens(logits, states)
    _apply_penalties(logits, states)
    random_rows = [i for i, s in enumerate(states) if not s.params.is_greedy]
    if len(random_rows) == len(states):
        _warp(logits, states)
    elif random_rows:
        index = to_device(random_rows, logits.device)
        random_logits = logits.index_select(0, index)  # [num_random, vocab]
        _warp(random_logits, [states[i] for i in random_rows])
        logits.index_copy_(0, index, random_logits)
    return random_rows


def _warp(logits: torch.Tensor, states: list[SamplingState]) -> None:
    """Temperature, min_p, top_k, top_p, in place. logits: [num_rows, vocab], none greedy."""
    vocab_size = logits.shape[1]
    device = logits.device
    params = [s.params for s in states]

    temperatures = [p.temperature for p in params]
    if any(t != 1.0 for t in temperatures):
        logits.div_(to_device(temperatures, device)[:, None])

    if any(p.min_p > 0.0 for p in params):
        probs = logits.softmax(dim=-1)  # [num_rows, vocab]
        min_p = to_device([p.min_p for p in params], device)[:, None]
        logits.masked_fill_(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))

    top_k = [p.top_k if 0 < p.top_k < vocab_size else 0 for p in params]  # 0: off
    if any(top_k):
        _apply_top_k(logits, top_k)
    top_p = [p.top_p for p in params]
    if any(p < 1.0 for p in top_p):
        _apply_top_p(logits, top_p)


def race(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """One draw per row from softmax(logits) (already processed).

    Exponential race: argmax(p_v / E_v) with E_v ~ Exp(1) picks v with probability p_v.
    Each row's noise is keyed by one draw from the request's own generator when it has
    one (seeded: its tokens do not depend on the batch), else from the global one.

    Args:
        logits: [num_rows, vocab] float32.
        states: the rows' states.

    Returns:
        [num_rows] sampled token ids.
    """
    keys = _row_keys(states)
    ops = kernels.for_tensor(logits)
    if ops is not None:
        # One pass instead of a dozen ops over [rows, vocab]: 64 x 49,152 15.2 -> 4.6 ms
        # on CPU (`microbench.py sampler`); on a GPU the Triton twin.
        sampled = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        ops.sample_exponential_race(sampled, logits.contiguous(), keys)
        return sampled
    return exponential_race(logits, keys.to(logits.device))


def _row_keys(states: list[SamplingState]) -> torch.Tensor:
    """[num_rows] int64: one draw per row per step, from the request's own generator when
    it has one, else the global one."""
    keys = torch.randint(0, 2**62, (len(states),), dtype=torch.long)
    for i, s in enumerate(states):
        if s.generator is not None:
            keys[i] = torch.randint(0, 2**62, (1,), dtype=torch.long, generator=s.generator)
    return keys


def _apply_top_k(logits: torch.Tensor, top_k: list[int]) -> None:
    """Keep each row's k largest logits (ties with the k-th kept too); k=0 keeps all."""
    k = to_device(top_k, logits.device)
    top_values = logits.topk(max(top_k), dim=-1).values  # [num_rows, max_k], descending
    kth = top_values.gather(1, (k.clamp(min=1) - 1)[:, None])  # [num_rows, 1]
    kth = torch.where(k[:, None] > 0, kth, torch.full_like(kth, float("-inf")))
    logits.masked_fill_(logits < kth, float("-inf"))


def _apply_top_p(logits: torch.Tensor, top_p: list[float]) -> None:
    """Keep the smallest set of most likely tokens whose probability reaches top_p.

    The cut is made by value (tokens tied with the last kept one stay), so it does not
    depend on how a sort orders ties, and a seeded row samples the same in any batch.
    A full sort of the vocab is slow on CPU (~0.3 s for 32 x 152k), and the top-p set of
    a trained model is nearly always small, so the first _TOP_P_CANDIDATES tokens are tried
    first and the full sort is only the fallback; both give the same answer.
    """
    vocab_size = logits.shape[1]
    p = to_device(top_p, logits.device)[:, None]  # [num_rows, 1]
    # Normalise over the whole row (after top-k), not over the candidates only.
    log_total = logits.logsumexp(dim=-1, keepdim=True)  # [num_rows, 1]

    num_candidates = min(vocab_size, _TOP_P_CANDIDATES)
    sorted_values = logits.topk(num_candidates, dim=-1).values  # [num_rows, num_candidates]
    probs = (sorted_values - log_total).exp()
    cumulative = probs.cumsum(dim=-1)
    # A row is settled once its candidates reach top_p; one host sync decides (cheap on CPU;
    # on a GPU the full sort costs less than waiting for the answer).
    settled = (cumulative[:, -1:] >= p) | (p >= 1.0)
    if num_candidates < vocab_size and (not logits.is_cpu or not bool(settled.all())):
        sorted_values = _sort_descending(logits)  # [num_rows, vocab]
        probs = (sorted_values - log_total).exp()
        cumulative = probs.cumsum(dim=-1)
    # Keep a token while the more likely ones have not reached top_p yet; the first one
    # always stays (nothing before it).
    num_kept = ((cumulative - probs) < p).sum(dim=-1, keepdim=True).clamp(min=1)  # [num_rows, 1]
    threshold = sorted_values.gather(1, num_kept - 1)
    # Rows with top_p == 1 are exempt, so rounding in the cumsum cannot clip their tail.
    threshold = torch.where(p < 1.0, threshold, torch.full_like(threshold, float("-inf")))
    logits.masked_fill_(logits < threshold, float("-inf"))


def _sort_descending(x: torch.Tensor) -> torch.Tensor:
    """Each row's values, largest first (values only)."""
    if x.device.type == "cpu":
        # numpy's sort is 2.5x faster than torch's on CPU (32 x 152k: 0.27 s vs 0.69 s).
        return torch.from_numpy(-np.sort(-x.numpy(), axis=-1))
    return x.sort(dim=-1, descending=True).values


# ---- logprobs -------------------------------------------------------------------------------


def _logprobs_tensors(
    logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ids [N, 1 + num_top], logprobs [N, 1 + num_top], ranks [N] of token_ids."""
    token_ids = token_ids.to(device=logprobs.device, dtype=torch.long)[:, None]  # [N, 1]
    token_logprobs = logprobs.gather(1, token_ids)  # [N, 1]
    # Rank 1 is the most likely; tokens tied with the chosen one do not push it down.
    ranks = (logprobs > token_logprobs).sum(dim=-1) + 1  # [N]
    if num_top > 0:
        top_values, top_ids = logprobs.topk(num_top, dim=-1)  # [N, num_top]
        token_ids = torch.cat([token_ids, top_ids], dim=1)
        token_logprobs = torch.cat([token_logprobs, top_values], dim=1)
    return token_ids, token_logprobs, ranks


def _row_logprobs(
    ids: list[float], values: list[float], ranks: list[float], row: int, width: int, keep: int
) -> SampledLogprobs:
    """Row `row` of the flattened [N, width] host lists, first `keep` entries."""
    start = row * width
    return SampledLogprobs(
        token_ids=[int(t) for t in ids[start:start + keep]],
        logprobs=values[start:start + keep],
        ranks=[int(ranks[row])] + list(range(1, keep)),
    )


def _take_rows(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """t[rows] without the host sync a list index costs on a GPU (its blocking copy)."""
    return t.index_select(0, to_device(rows, t.device))


def _to_host(*tensors: torch.Tensor) -> list[list[float]]:
    """Copy tensors to host lists in ONE transfer (on a GPU every .tolist() is a sync).

    float64 holds every token id and float32 logprob exactly, so one packed tensor serves.
    """
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors]).tolist()
    out: list[list[float]] = []
    start = 0
    for t in tensors:
        out.append(flat[start:start + t.numel()])
        start += t.numel()
    return out
