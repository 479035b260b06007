"""``flatspec generate``: one chat reply, printed alone on stdout (diagnostics go to stderr).

Decodes autoregressively, or speculatively with ``--draft CHECKPOINT_DIR`` (``decode.method``
chain or tree; ``ar`` when it is set to ar).
"""

from __future__ import annotations

import argparse
import logging

import jax

from flatspec_jax.config import Config, ConfigError
from flatspec_jax.data.chat import render_prompt
from flatspec_jax.data.conversations import is_unicode_text
from flatspec_jax.decoding.runner import Decoder
from flatspec_jax.stages.common import RunContext

log = logging.getLogger(__name__)


def run(cfg: Config, args: argparse.Namespace, ctx: RunContext | None = None) -> str:
    if not args.prompt.strip():
        raise ConfigError("--prompt is empty: give the user message to answer")
    if not is_unicode_text(args.prompt):  # bytes the shell's locale could not decode arrive as lone surrogates
        raise ConfigError("--prompt is not UTF-8 text (is the terminal's encoding another, e.g. Latin-1?)")
    if args.draft and cfg.decode.method == "ar":
        log.warning("--draft %s is not used: decode.method=ar decodes autoregressively (set decode.method to chain "
                    "or tree to decode with it)", args.draft)
    ctx = ctx or RunContext(cfg)
    method = cfg.decode.method if args.draft else "ar"
    head = ctx.draft_head(args.draft) if method != "ar" else None  # decode.method=ar needs no draft's work
    decoder = Decoder(ctx.decoding_target, cfg.decode, ctx.eos_ids(), ctx.pad_id(), head=head, method=method,
                      draft_ids=ctx.decoding_draft_ids(args.draft, read_only=True) if head is not None else None)
    prompt = render_prompt(ctx.tokenizer, [{"role": "user", "content": args.prompt}])
    result = decoder.run([prompt], jax.random.key(cfg.seed))
    calls = int(result.target_calls[0])
    log.info("%s decoding: %d tokens in %.2f s (compilation included), %d target forwards after the prompt",
             method, len(result.tokens[0]), result.seconds, calls)
    reply = decoder.text(ctx.tokenizer, result.tokens[0])
    if jax.process_index() == 0:  # every process decodes the same reply
        print(reply)
    return reply
