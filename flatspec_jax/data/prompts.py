"""Evaluation prompts: MT-bench's 80 two-turn questions, or any JSONL of prompts."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from flatspec_jax import assets
from flatspec_jax.data.conversations import is_unicode_text
from flatspec_jax.data.sources import DataFormatError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One evaluation item: an id, its category and its user turns (answered one after another)."""

    id: str
    category: str
    turns: tuple[str, ...]


def load_prompts(source: str, limit: int | None = None, turns: int = 1) -> list[Prompt]:
    """Reads ``source`` ('mtbench' or a JSONL path) in file order, keeping the first ``turns`` turns.

    A JSONL line is ``{"prompt": "..."}`` or ``{"turns": ["...", ...]}``, optionally with
    ``question_id``/``id`` and ``category``.

    Raises:
      DataFormatError: naming the file (and line) when it cannot be read, a record has no usable
        prompt or repeats an earlier record's id, or it holds none.
    """
    path = assets.mtbench_questions() if source == "mtbench" else Path(source)
    try:
        text = path.read_text(encoding="utf-8-sig")  # small: read whole, decoded once; a byte-order mark is dropped
    except OSError as err:
        raise DataFormatError(f"{path}: cannot read the prompts ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from None
    prompts = []
    lines: dict[str, int] = {}  # prompt id -> its line
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        texts = _turns(record)
        if texts is None:
            raise DataFormatError(f"{path}:{number}: expected an object with a non-empty 'prompt' string or "
                                  f"'turns' list of non-empty strings")
        if not all(is_unicode_text(text) for text in texts):
            raise DataFormatError(f"{path}:{number}: a prompt holds a lone surrogate (an unpaired \\ud800-\\udfff "
                                  "escape), which no tokenizer can encode")
        prompt_id = str(record.get("question_id", record.get("id", number)))
        if prompt_id in lines:  # evaluation keys each question's replies by its id
            raise DataFormatError(f"{path}:{number}: prompt id {prompt_id!r} repeats line {lines[prompt_id]}'s")
        lines[prompt_id] = number
        prompts.append(Prompt(prompt_id, str(record.get("category", "")), tuple(texts[:turns])))
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise DataFormatError(f"{path}: no prompts")
    short = sum(len(p.turns) < turns for p in prompts)
    if short:
        log.warning("%s: %d of %d prompts have fewer than the %d turns asked for (eval.turns); they are evaluated "
                    "on the turns they have", path, short, len(prompts), turns)
    return prompts


def _turns(record: object) -> list[str] | None:
    """The record's user turns, or None when it has no usable ``turns`` list or ``prompt`` string."""
    if not isinstance(record, dict):
        return None
    texts = record["turns"] if "turns" in record else [record.get("prompt")]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        return None
    return texts
