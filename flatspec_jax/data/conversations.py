"""Conversations: the normalised record type, its validation, and the report of what was skipped.

Every source (ShareGPT JSON, JSONL, parquet) yields raw records; ``normalize_record``
turns one into a ``Conversation`` or counts why it could not, so a bad record never
stops a run and the run's log says exactly what was dropped.

Normalisation rules:
  * Roles: ShareGPT's ``from`` (human/user -> user; gpt/chatgpt/bard/bing/assistant/model
    -> assistant; system -> system) and HF ``role`` use the same alias table; any other
    role (tool, function, ...) skips the record, because the chat template would render
    it in a way we cannot attribute to the assistant or the user.
  * Content is kept verbatim (no stripping): the tokens we train on are the tokens the
    chat template renders. Content that is not Unicode text (a lone surrogate, from an
    unpaired ``\\ud800``-style escape or from bytes that are not UTF-8) skips the record:
    no tokenizer can encode it.
  * Assistant turns before the first user turn are dropped (note ``leading_assistant``):
    ShareGPT has many conversations that start mid-dialogue with a model reply that
    answers nothing we can see. System turns before the first user turn are kept.
  * User/system turns after the last assistant turn are dropped (note ``trailing_turns``):
    they carry no trained token and would only lengthen the sample.
  * Prompts (``replies=False``, for ``flatspec regenerate``, which answers the user turns
    itself): a record needs a user turn with non-empty text instead of an assistant one, and
    keeps its turns after the last assistant turn (they are prompts to answer). A prompt-only
    source (user turns, no replies) is then usable.
  * Consecutive turns of the same role are kept as they are; whether that is acceptable
    is the chat template's business (SmolLM2's ChatML renders it fine).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import Any, Literal

log = logging.getLogger(__name__)

Role = Literal["system", "user", "assistant"]

ROLE_ALIASES: dict[str, Role] = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
    "assistant": "assistant", "model": "assistant",
}

# Skip reasons, in the order a record is checked.
NOT_AN_OBJECT = "not_an_object"
INVALID_JSON = "invalid_json"  # a JSONL line that does not parse (counted by the source)
MISSING_TURNS = "missing_turns"
TURNS_NOT_A_LIST = "turns_not_a_list"
EMPTY = "empty"
MALFORMED_TURN = "malformed_turn"
UNKNOWN_ROLE = "unknown_role"
NON_STRING_CONTENT = "non_string_content"
NOT_UNICODE_TEXT = "not_unicode_text"
NO_ASSISTANT_TEXT = "no_assistant_text"
NO_USER_TEXT = "no_user_text"

SKIP_EXPLANATIONS: dict[str, str] = {
    NOT_AN_OBJECT: "record is not a JSON object",
    INVALID_JSON: "line is not valid JSON",
    MISSING_TURNS: "record has neither a 'conversations' nor a 'messages' key",
    TURNS_NOT_A_LIST: "'conversations'/'messages' is not a list",
    EMPTY: "conversation has no turns",
    MALFORMED_TURN: "a turn is not an object with a role and a content",
    UNKNOWN_ROLE: "a turn has a role we do not map to system/user/assistant",
    NON_STRING_CONTENT: "a turn's content is not a string",
    NOT_UNICODE_TEXT: "a turn's content holds a lone surrogate (an unpaired \\ud800-\\udfff escape or non-UTF-8 bytes)",
    NO_ASSISTANT_TEXT: "no assistant turn with non-empty text (after dropping leading assistant turns)",
    NO_USER_TEXT: "no user turn with non-empty text (a prompt to answer)",
}

# Notes: kept records that were changed.
LEADING_ASSISTANT = "leading_assistant"
TRAILING_TURNS = "trailing_turns"

NOTE_EXPLANATIONS: dict[str, str] = {
    LEADING_ASSISTANT: "assistant turns before the first user turn dropped",
    TRAILING_TURNS: "user/system turns after the last assistant turn dropped",
}


@dataclasses.dataclass(frozen=True)
class Message:
    role: Role
    content: str

    def as_dict(self) -> dict[str, str]:
        """The ``{"role", "content"}`` form chat templates take."""
        return {"role": self.role, "content": self.content}


@dataclasses.dataclass(frozen=True)
class Conversation:
    """A validated conversation: at least one assistant turn with non-empty text (a user turn with
    non-empty text, read as prompts), no assistant turn before the first user turn."""

    id: str
    messages: tuple[Message, ...]

    def as_dicts(self) -> list[dict[str, str]]:
        return [m.as_dict() for m in self.messages]


@dataclasses.dataclass
class SkipReport:
    """What happened to the records of one or more sources.

    Attributes:
      records: records read, before validation (a bad JSONL line counts as one).
      kept: records that became a Conversation.
      skipped: skip reason -> count.
      notes: note -> count (kept records that were trimmed).
      examples: reason or note -> the first ``max_examples`` "record id: detail" strings.
    """

    records: int = 0
    kept: int = 0
    skipped: Counter[str] = dataclasses.field(default_factory=Counter)
    notes: Counter[str] = dataclasses.field(default_factory=Counter)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    max_examples: int = 5

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, reason: str, record_id: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        self._example(reason, record_id, detail)

    def note(self, kind: str, record_id: str, detail: str = "") -> None:
        self.notes[kind] += 1
        self._example(kind, record_id, detail)

    def _example(self, key: str, record_id: str, detail: str) -> None:
        examples = self.examples.setdefault(key, [])
        if len(examples) < self.max_examples:
            examples.append(f"{record_id}: {detail}" if detail else record_id)

    def merge(self, other: SkipReport) -> SkipReport:
        """A new report counting both; examples are concatenated, ``self``'s first."""
        merged = SkipReport(records=self.records + other.records, kept=self.kept + other.kept,
                            skipped=self.skipped + other.skipped, notes=self.notes + other.notes,
                            max_examples=self.max_examples)
        for key in {**self.examples, **other.examples}:
            merged.examples[key] = (self.examples.get(key, []) + other.examples.get(key, []))[:self.max_examples]
        return merged

    def summary(self) -> str:
        """One paragraph: counts, then every skip reason and note with its meaning and examples."""
        text = f"{self.records} records read, {self.kept} conversations kept, {self.num_skipped} skipped"
        parts = [self._describe(reason, count, SKIP_EXPLANATIONS)
                 for reason, count in sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0]))]
        if parts:
            text += " (" + "; ".join(parts) + ")"
        notes = [self._describe(kind, count, NOTE_EXPLANATIONS)
                 for kind, count in sorted(self.notes.items(), key=lambda kv: (-kv[1], kv[0]))]
        if notes:
            text += ". Trimmed but kept: " + "; ".join(notes)
        return text

    def log_summary(self, source: str) -> None:
        """Logs :meth:`summary`: a warning when lines of a file did not parse (a damaged file), else
        information (records without a usable conversation are routine in chat dumps)."""
        level = logging.WARNING if self.skipped[INVALID_JSON] else logging.INFO
        log.log(level, "%s: %s", source, self.summary())

    def _describe(self, key: str, count: int, explanations: dict[str, str]) -> str:
        examples = ", ".join(self.examples.get(key, []))
        return f"{count} {key} [{explanations.get(key, key)}; e.g. {examples}]"


def is_unicode_text(text: str) -> bool:
    """False when ``text`` holds a lone surrogate (U+D800-U+DFFF), which UTF-8, and so a tokenizer, cannot encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def record_id(raw: Any, index: int, source_name: str) -> str:
    """The record's own ``id`` when it has a non-empty one, else ``"{source_name}:{index}"``."""
    if isinstance(raw, dict):
        value = raw.get("id")
        if value is not None and str(value) != "":
            return str(value)
    return f"{source_name}:{index}"


def normalize_record(raw: Any, index: int, source_name: str, report: SkipReport, *,
                     replies: bool = True) -> Conversation | None:
    """Validates and normalises one raw record (module docstring: the rules).

    Args:
      raw: the decoded record (anything JSON can hold).
      index: its 0-based position in its source, for the fallback id.
      source_name: names the source in fallback ids ("sharegpt", a file name).
      report: counts the record, and its skip reason or trimming notes.
      replies: the record must hold a reply to train on (False: prompts, answered by the target).

    Returns:
      The Conversation, or None when the record was skipped (the reason is in ``report``).
    """
    report.records += 1
    rid = record_id(raw, index, source_name)
    if not isinstance(raw, dict):
        report.skip(NOT_AN_OBJECT, rid, type(raw).__name__)
        return None
    key = "conversations" if raw.get("conversations") is not None else "messages"
    turns = raw.get(key)
    if turns is None:
        report.skip(MISSING_TURNS, rid, f"keys {sorted(raw)}")
        return None
    if not isinstance(turns, list):
        report.skip(TURNS_NOT_A_LIST, rid, type(turns).__name__)
        return None
    if not turns:
        report.skip(EMPTY, rid)
        return None
    messages = []
    for position, turn in enumerate(turns):
        if not isinstance(turn, dict):
            report.skip(MALFORMED_TURN, rid, f"turn {position} is a {type(turn).__name__}")
            return None
        # ShareGPT turns are {from, value}; HF turns are {role, content}. A parquet struct column holds
        # every key its schema names, the other pair as nulls.
        sharegpt = turn.get("from") is not None or turn.get("value") is not None
        role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
        if role_key not in turn or content_key not in turn:
            report.skip(MALFORMED_TURN, rid, f"turn {position} has keys {sorted(turn)}")
            return None
        role = ROLE_ALIASES.get(str(turn[role_key]).strip().lower())
        if role is None:
            report.skip(UNKNOWN_ROLE, rid, f"turn {position} role {turn[role_key]!r}")
            return None
        content = turn[content_key]
        if not isinstance(content, str):
            report.skip(NON_STRING_CONTENT, rid, f"turn {position} content is {type(content).__name__}")
            return None
        if not is_unicode_text(content):
            report.skip(NOT_UNICODE_TEXT, rid, f"turn {position}")
            return None
        messages.append(Message(role, content))
    return _trim(Conversation(rid, tuple(messages)), report, replies)


def _trim(conv: Conversation, report: SkipReport, replies: bool) -> Conversation | None:
    """Drops leading assistant turns and (with ``replies``) trailing non-assistant turns; skips what has no
    assistant text left (no user text, as prompts)."""
    messages = list(conv.messages)
    first_user = next((i for i, m in enumerate(messages) if m.role == "user"), len(messages))
    leading = {i for i in range(first_user) if messages[i].role == "assistant"}
    messages = [m for i, m in enumerate(messages) if i not in leading]
    needed = "assistant" if replies else "user"  # the text the record is read for
    if not any(m.role == needed and m.content.strip() for m in messages):
        report.skip(NO_ASSISTANT_TEXT if replies else NO_USER_TEXT, conv.id,
                    f"roles {[m.role for m in conv.messages]}"[:120])
        return None
    end = (1 + max(i for i, m in enumerate(messages) if m.role == "assistant")) if replies else len(messages)
    if leading:
        report.note(LEADING_ASSISTANT, conv.id, f"{len(leading)} turn(s)")
    if end < len(messages):
        report.note(TRAILING_TURNS, conv.id, f"{len(messages) - end} turn(s)")
    report.kept += 1
    return Conversation(conv.id, tuple(messages[:end]))
