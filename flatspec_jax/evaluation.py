"""Speculative-decoding evaluation: acceptance length, per-depth acceptance and speedup.

Each batch of ``eval.batch_size`` prompts is decoded twice in the same process after a warm-up
(so neither side pays for compilation): autoregressively by the target alone, and speculatively
with the draft, each row accepting its own number of drafts per round. Every prompt is padded to
one width and every batch to one size (a short last batch repeats its first prompt, and the
copies are dropped), so each decoder compiles exactly once. Multi-turn prompts feed the
autoregressive reply of turn i back as the assistant's message before turn i + 1, so both
decoders see the same context. A first turn longer than the cache is refused before decoding; a later
turn, whose prompt holds the replies decoded before it, that leaves no cache slot for a new token ends
its question there: it and the question's later turns are listed in ``skipped_turns`` (with a warning)
and the figures cover the turns decoded.

Definitions (over all prompts): tau = tokens emitted per target verification forward (the
bonus token counts; the prefill's first token does not, so autoregressive decoding has tau 1);
per-depth acceptance d = P(draft at depth d accepted | depth d - 1 accepted and a depth-d draft
proposed after it): a round whose chain stopped proposing (``decode.min_confidence``) or whose
accepted tree path reached a leaf does not count at the next depth; drafts per round = drafts
proposed for verification per target forward; tokens/s =
generated tokens / decoding wall time (a batch's time counted once for its rows); speedup =
speculative tokens/s / autoregressive tokens/s. At batch size 1 a question's own speedup is its
decoding times' ratio; in a larger batch it is its tokens over the whole batch's time, both ways.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Sequence

import jax
import numpy as np

from flatspec_jax.data.chat import answered_turns, render_prompt
from flatspec_jax.data.prompts import Prompt
from flatspec_jax.decoding.runner import Decoder, DecodeResult
from flatspec_jax.decoding.speculative import acceptance_by_depth, proposed_by_depth
from flatspec_jax.runtime import Preempted, reached_preemption, stop_cause

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TurnRecord:
    """One decoded turn, both ways."""

    prompt_id: str
    turn: int
    batch: int
    """Which decoding call the turn was a row of (numbered over the whole evaluation)."""
    prompt_tokens: int
    ar_tokens: int
    ar_seconds: float
    """Wall time of the autoregressive call that decoded the batch (shared by its rows)."""
    spec_tokens: int
    spec_seconds: float
    rounds: int
    accept_counts: list[int]
    exhausted_counts: list[int]
    drafts: int
    same_output: bool


def turn_prompt(tokenizer, prompt: Prompt, replies: Sequence[str]) -> np.ndarray:
    """Prompt ids of the next turn: the user turns so far, each answered by its earlier reply."""
    return render_prompt(tokenizer, answered_turns(prompt.turns[:len(replies) + 1], replies))


def _batches(inputs: Sequence[np.ndarray], batch_size: int) -> list[list[np.ndarray]]:
    """``inputs`` in batches of ``batch_size``, the last one filled up with copies of its first prompt."""
    groups = [list(inputs[start:start + batch_size]) for start in range(0, len(inputs), batch_size)]
    groups[-1] += [groups[-1][0]] * (batch_size - len(groups[-1]))
    return groups


def evaluate(prompts: Sequence[Prompt], tokenizer, ar: Decoder, spec: Decoder, *, warmup: int,
             seed: int, batch_size: int = 1) -> dict[str, Any]:
    """Decodes every turn of every prompt with both decoders and summarises (see the module docstring).

    Turns are decoded level by level (all first turns, then all second turns), each level padded
    to one width and its first ``warmup`` batches run once untimed, so with ``warmup >= 1`` nothing
    timed includes compilation. Each timed batch samples with its own key (``seed`` folded with
    its number), the same for both decoders.
    """
    key = jax.random.key(seed)
    replies: dict[str, list[str]] = {p.id: [] for p in prompts}
    records: list[TurnRecord] = []
    skipped: list[dict[str, Any]] = []
    calls = 0  # batches decoded (timed) so far, over all turns
    for turn in range(max(len(p.turns) for p in prompts)):
        level = [p for p in prompts if len(p.turns) > turn and len(replies[p.id]) == turn]
        inputs = [turn_prompt(tokenizer, p, replies[p.id]) for p in level]
        if turn:  # the first turns were checked (prompt_width raises) before anything was decoded
            fits = [len(ids) <= ar.max_prompt_tokens for ids in inputs]
            for prompt, ids, fit in zip(level, inputs, fits):
                if not fit:
                    skipped.append({"prompt_id": prompt.id, "turn": turn + 1, "prompt_tokens": len(ids),
                                    "turns_not_decoded": len(prompt.turns) - turn})
                    log.warning("question %s turn %d: its prompt with the replies so far has %d tokens, more than "
                                "decode.max_cache_length=%d leaves for a new token; it and its later turns are not "
                                "decoded", prompt.id, turn + 1, len(ids), ar.max_prompt_tokens + 1)
            level = [p for p, ok in zip(level, fits) if ok]
            inputs = [ids for ids, ok in zip(inputs, fits) if ok]
            if not level:
                break
        width = ar.prompt_width(max(len(ids) for ids in inputs))
        batches = _batches(inputs, batch_size)
        for batch in batches[:warmup]:
            ar.run(batch, key, width)
            spec.run(batch, key, width)
        for index, batch in enumerate(batches):
            if reached_preemption():
                raise Preempted(f"{stop_cause()} during evaluation after {calls} batches; evaluation keeps nothing "
                                "until it ends, so the same command evaluates again")
            batch_key = jax.random.fold_in(key, calls)  # sampled batches draw independently of each other
            ar_out: DecodeResult = ar.run(batch, batch_key, width)
            spec_out: DecodeResult = spec.run(batch, batch_key, width)
            for row, prompt in enumerate(level[index * batch_size:(index + 1) * batch_size]):
                replies[prompt.id].append(ar.text(tokenizer, ar_out.tokens[row]))
                record = TurnRecord(
                    prompt_id=prompt.id, turn=turn + 1, batch=calls, prompt_tokens=len(batch[row]),
                    ar_tokens=len(ar_out.tokens[row]), ar_seconds=ar_out.seconds,
                    spec_tokens=len(spec_out.tokens[row]), spec_seconds=spec_out.seconds,
                    rounds=int(spec_out.target_calls[row]), accept_counts=spec_out.accept_counts[row].tolist(),
                    exhausted_counts=spec_out.exhausted_counts[row].tolist(), drafts=int(spec_out.drafts[row]),
                    same_output=bool(np.array_equal(ar_out.tokens[row], spec_out.tokens[row])))
                records.append(record)
                log.info("question %s turn %d: %d tokens, tau %.2f, speedup %.2fx", prompt.id, turn + 1,
                         record.spec_tokens, _tau([record]), _speedup([record]))
            calls += 1
    return summarize(records, skipped)


def _per_round(records: Sequence[TurnRecord], count: Callable[[TurnRecord], int]) -> float:
    """sum of ``count`` over the records / their verification rounds (0 with no round)."""
    rounds = sum(r.rounds for r in records)
    return sum(count(r) for r in records) / rounds if rounds else 0.0


def _tau(records: Sequence[TurnRecord]) -> float:
    return _per_round(records, lambda r: r.spec_tokens - 1)  # the prefill's token is no round's


def _rate(records: Sequence[TurnRecord], side: str) -> float:
    """Tokens per second of ``side`` ('ar' or 'spec'): the records' tokens over their batches' times."""
    seconds = sum({r.batch: getattr(r, f"{side}_seconds") for r in records}.values())
    return sum(getattr(r, f"{side}_tokens") for r in records) / seconds if seconds else 0.0


def _speedup(records: Sequence[TurnRecord]) -> float:
    ar = _rate(records, "ar")
    return _rate(records, "spec") / ar if ar else 0.0


def summarize(records: Sequence[TurnRecord], skipped: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """The figures of the module docstring over ``records``; ``turns`` counts decoded turns (a
    2-turn question counts twice), ``prompts`` the questions they came from, ``questions`` lists
    every turn's record with its own tau, per-depth acceptance, tokens/s and speedup, and
    ``skipped_turns`` the turns whose prompt did not fit the cache (``prompt_id``, ``turn``,
    ``prompt_tokens``, ``turns_not_decoded``: that turn and the question's later ones)."""
    counts = np.sum([r.accept_counts for r in records], axis=0)
    exhausted = np.sum([r.exhausted_counts for r in records], axis=0)
    return {
        "tau": _tau(records),
        "speedup": _speedup(records),
        "tokens_per_s_ar": _rate(records, "ar"),
        "tokens_per_s_spec": _rate(records, "spec"),
        "per_depth_acceptance": acceptance_by_depth(counts, exhausted).tolist(),
        "per_depth_proposed": proposed_by_depth(counts, exhausted).tolist(),
        "drafts_per_round": _per_round(records, lambda r: r.drafts),
        "accept_histogram": counts.tolist(),
        "exhausted_histogram": exhausted.tolist(),
        "same_output_fraction": float(np.mean([r.same_output for r in records])),
        "turns": len(records),
        "prompts": len({r.prompt_id for r in records}),
        "tokens_ar": sum(r.ar_tokens for r in records),
        "tokens_spec": sum(r.spec_tokens for r in records),
        "questions": [dataclasses.asdict(r) | _turn_figures(r) for r in records],
        "skipped_turns": list(skipped),
    }


def _turn_figures(record: TurnRecord) -> dict[str, Any]:
    """One turn's own tau, per-depth acceptance, tokens/s both ways and speedup."""
    return {"tau": _tau([record]), "speedup": _speedup([record]),
            "tokens_per_s_ar": _rate([record], "ar"), "tokens_per_s_spec": _rate([record], "spec"),
            "per_depth_acceptance": acceptance_by_depth(np.asarray(record.accept_counts),
                                                        np.asarray(record.exhausted_counts)).tolist()}
