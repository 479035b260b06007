"""Chat templating: a conversation's token ids and the mask of the tokens the assistant wrote.

The ids are exactly ``tokenizer.apply_chat_template(messages)["input_ids"]``, the
template's own defaults included (SmolLM2's inserts a default system prompt when the
conversation has none). The loss mask is 1 on each assistant turn's content tokens and on
its end-of-turn token (``<|im_end|>`` for ChatML), 0 everywhere else: system and user
turns, every role header (``<|im_start|>assistant\\n`` too) and whatever the template
writes after the end-of-turn token (ChatML's newline).

The mask is found without knowing the template:
  1. render the whole conversation once (``tokenize=False``);
  2. for assistant message i, render ``messages[:i]`` with the generation prompt and
     ``messages[:i + 1]`` without it: message i's rendering lies between their ends, and
     its content is the first verbatim occurrence inside it. Its end-of-turn marker is the
     text after the content in that rendering up to and including the first special token
     (nothing, if there is none);
  3. tokenize the rendered string once with offsets and mask every token whose
     characters overlap a content span or the marker.
A token that straddles a span boundary (say, a newline merged with the content's first
newline) is masked, since the model must produce it to produce the content. Empty (or
whitespace-only) assistant messages get no mask at all, end marker included: training an
immediate end-of-turn would teach empty replies. Content the template trims (Llama 3's
``| trim``) is found without its surrounding whitespace. A template that otherwise rewrites
content, whose renderings of prefixes are not prefixes of the full rendering, or that refuses
a conversation (say, roles that do not alternate) raises ``ChatTemplateError`` naming the
conversation.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import weakref
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping, Sequence

import numpy as np
from jinja2 import TemplateError

from flatspec_jax.data.conversations import Conversation, Message

if TYPE_CHECKING:  # importing transformers costs seconds; this module only calls methods on a tokenizer
    from transformers import PreTrainedTokenizerBase


# tokenizer -> the chat template its chat tokenization was last checked with (see ``verify``).
_verified: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, str | None] = weakref.WeakKeyDictionary()


class ChatTemplateError(ValueError):
    """The chat template does something the loss mask cannot follow; the message names the conversation."""


@dataclasses.dataclass(frozen=True)
class TokenizedSample:
    """One conversation as the model sees it.

    Attributes:
      id: the conversation id.
      input_ids: [S] int32 token ids, S = min(n_tokens_untruncated, max_length).
      loss_mask: [S] int8, 1 on tokens the assistant wrote.
      n_tokens_untruncated: tokens of the whole rendered conversation.
      truncated: True when tokens were cut off the end.
    """

    id: str
    input_ids: np.ndarray
    loss_mask: np.ndarray
    n_tokens_untruncated: int
    truncated: bool

    @property
    def n_trained(self) -> int:
        """Assistant tokens kept; 0 when truncation cut every assistant token (the caller reports and drops those)."""
        return int(self.loss_mask.sum())


def tokenize_conversation(tokenizer: PreTrainedTokenizerBase, conv: Conversation, max_length: int,
                          verify: bool = False) -> TokenizedSample:
    """Token ids and assistant loss mask of ``conv``, truncated to its first ``max_length`` tokens.

    Truncation keeps the start (system prompt and first turns), so a kept assistant token
    always has the context it was written in. A sample whose kept part has no assistant
    token is still returned, with ``n_trained == 0``.

    Args:
      tokenizer: a fast (offset-capable) tokenizer with a chat template.
      conv: the conversation.
      max_length: the most tokens to keep (>= 1).
      verify: check every conversation's ids against ``apply_chat_template(tokenize=True)``
        (raising ``ChatTemplateError`` on a difference), at twice the cost. Without it only
        the first conversation per tokenizer and chat template is checked: transformers 5
        tokenizes the rendered string exactly as we do (``add_special_tokens=False``), so a
        difference can only come from a tokenizer class that tokenizes chats its own way
        (say, adds a BOS), and that shows on the first conversation.
    """
    return next(tokenize_conversations(tokenizer, [conv], max_length, verify=verify))


def tokenize_conversations(tokenizer: PreTrainedTokenizerBase, convs: Iterable[Conversation], max_length: int,
                           verify: bool = False, batch_size: int = 256) -> Iterator[TokenizedSample]:
    """``tokenize_conversation`` over many conversations, in order; ``batch_size`` rendered conversations are
    tokenized per call, which the Rust tokenizer spreads over the CPU cores."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if not tokenizer.is_fast:
        raise ChatTemplateError(f"{type(tokenizer).__name__} has no character offsets; a fast tokenizer is required")
    special = _special_ids(tokenizer)
    convs = iter(convs)
    while batch := list(itertools.islice(convs, batch_size)):  # itertools.batched needs Python 3.12
        texts = [_render(tokenizer, conv.as_dicts(), False, conv.id) for conv in batch]
        encodings = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        for conv, text, ids, offsets in zip(batch, texts, encodings["input_ids"], encodings["offset_mapping"]):
            if verify or _verified.get(tokenizer) != tokenizer.chat_template:
                _verify(tokenizer, conv, ids)
                _verified[tokenizer] = tokenizer.chat_template
            yield _sample(tokenizer, conv, text, ids, offsets, max_length, special)


def _sample(tokenizer: PreTrainedTokenizerBase, conv: Conversation, text: str, ids: list[int],
            offsets: list[tuple[int, int]], max_length: int, special: set[int]) -> TokenizedSample:
    """Builds the truncated sample from the rendered ``text`` and its full tokenization."""
    keep = min(len(ids), max_length)
    input_ids = np.asarray(ids[:keep], np.int32)
    kept_offsets = np.asarray(offsets[:keep], np.int64).reshape(-1, 2)  # only the kept ones: conversion is costly
    starts, ends = kept_offsets[:, 0], kept_offsets[:, 1]  # both non-decreasing
    kept_chars = int(ends[-1]) if keep else 0
    mask = np.zeros(keep, np.int8)
    for content_start, content_end, turn_end in _assistant_spans(tokenizer, conv, text, kept_chars):
        mask[np.searchsorted(ends, content_start, "right"):np.searchsorted(starts, content_end, "left")] = 1
        first, stop = np.searchsorted(starts, [content_end, turn_end], "left")
        for k in range(first, stop):
            if int(input_ids[k]) in special:
                mask[first:k + 1] = 1
                break
    return TokenizedSample(id=conv.id, input_ids=input_ids, loss_mask=mask, n_tokens_untruncated=len(ids),
                           truncated=keep < len(ids))


def _verify(tokenizer: PreTrainedTokenizerBase, conv: Conversation, ids: list[int]) -> None:
    reference = tokenizer.apply_chat_template(conv.as_dicts(), tokenize=True)["input_ids"]
    if list(ids) != list(reference):
        raise ChatTemplateError(f"conversation {conv.id}: tokenizing the rendered chat gives different ids than "
                                f"apply_chat_template(tokenize=True)")


def answered_turns(user_turns: Sequence[str], replies: Sequence[str]) -> list[dict[str, str]]:
    """``[user 1, assistant 1, user 2, ...]`` messages: each user turn followed by its reply while
    replies last (so one more user turn than replies makes the prompt of that turn's reply)."""
    messages = []
    for number, text in enumerate(user_turns):
        messages.append({"role": "user", "content": text})
        if number < len(replies):
            messages.append({"role": "assistant", "content": replies[number]})
    return messages


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message | Mapping[str, str]],
                  add_generation_prompt: bool = True) -> np.ndarray:
    """[P] int32 prompt ids for generation: ``messages`` through the chat template, by default ending in the
    assistant header (``<|im_start|>assistant\\n``) so the model's next token starts its reply."""
    dicts = [m.as_dict() if isinstance(m, Message) else {"role": m["role"], "content": m["content"]}
             for m in messages]
    ids = tokenizer.apply_chat_template(dicts, tokenize=True, add_generation_prompt=add_generation_prompt)
    return np.asarray(ids["input_ids"], np.int32)


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool,
            conv_id: str) -> str:
    if not messages:  # apply_chat_template cannot take an empty conversation
        return ""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as err:  # the template's raise_exception, e.g. roles that do not alternate
        raise ChatTemplateError(f"conversation {conv_id}: the chat template refuses it ({err})") from None


def _assistant_spans(tokenizer: PreTrainedTokenizerBase, conv: Conversation, text: str,
                     kept_chars: int) -> Iterator[tuple[int, int, int]]:
    """(content start, content end, end of the message's rendering) in characters of ``text`` (the full
    rendering), per non-empty assistant message that starts before ``kept_chars``."""
    messages = conv.as_dicts()
    for i, message in enumerate(messages):
        content = message["content"]
        if message["role"] != "assistant" or not content.strip():
            continue
        before = _render(tokenizer, messages[:i], True, conv.id)
        if len(before) >= kept_chars:
            return  # this turn and all later ones were truncated away
        through = _render(tokenizer, messages[:i + 1], False, conv.id)
        if not text.startswith(through):
            raise ChatTemplateError(f"conversation {conv.id}: rendering messages[:{i + 1}] does not give a prefix of "
                                    f"the full rendering, so the template's assistant spans cannot be located")
        # The header of message i ends where the two renderings part (``before`` ends in the generation prompt).
        turn_start = len(before) if through.startswith(before) else len(os.path.commonprefix([before, through]))
        content_start = through.find(content, turn_start)
        if content_start < 0:  # a template that trims content (Llama 3's ``| trim``)
            content = content.strip()
            content_start = through.find(content, turn_start)
        if content_start < 0:
            raise ChatTemplateError(f"conversation {conv.id}: assistant message {i} does not appear verbatim in "
                                    f"its rendering (the chat template rewrites it)")
        yield content_start, content_start + len(content), len(through)


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids of the special tokens (end-of-turn candidates): the declared ones and added tokens flagged special."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return ids
