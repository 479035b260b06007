"""The real target: SmolLM2-135M-Instruct (embedded Q4_1 GGUF) in our model vs HF transformers.

Both sides dequantize the same GGUF file to float32 (HF: ``from_pretrained(gguf_file=...)``; ours:
``load_target_model`` through the GGUF reader and its cache), so the logits must agree to float32
rounding and greedy continuations must be identical token for token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from flatspec_jax import assets
from flatspec_jax.config import MeshConfig
from flatspec_jax.data.chat import render_prompt
from flatspec_jax.data.tokenizer import load_tokenizer
from flatspec_jax.decoding.autoregressive import GenerationSettings, generate
from flatspec_jax.models.masks import causal_mask
from flatspec_jax.sharding import ShardingRules, make_mesh
from flatspec_jax.weights.to_nnx import load_target_model


# Measured ~170 s on 2 busy CPU cores (HF load ~28 s, HF greedy ~29 s per prompt, ours ~25 s with
# compilation): over the default suite's budget, so it runs with the real-model tests (-m slow).
pytestmark = pytest.mark.slow

LOGIT_TOL = 1e-3
NEW_TOKENS = 64
MIN_PROMPT = 100

QUESTIONS = [
    ("I am preparing a talk for high-school students about how the water cycle shapes the weather we see "
     "every day. Please explain, step by step and in plain language, how water evaporates from oceans and "
     "lakes, how clouds form, why some clouds produce rain or snow while others do not, and how the water "
     "finally returns to the sea through rivers and groundwater. Add two simple experiments the students "
     "could try at home, and finish with a short summary they can remember."),
    ("Write a detailed, friendly guide for someone who has never cooked before and wants to make a simple "
     "vegetable soup for four people. Describe which vegetables to buy, how to wash and cut them safely, "
     "which pot to use, how long each ingredient should cook, how to season the soup with salt, pepper "
     "and herbs, and how to store the leftovers in the fridge. Please also mention the most common "
     "mistakes beginners make and how to avoid them."),
    ("Our small team of five software developers keeps missing deadlines because tasks are unclear and "
     "everyone works on different things at the same time. Describe in detail a weekly planning routine "
     "we could adopt: how to write clear tasks, how to estimate them, how to decide priorities together, "
     "how to run a short daily meeting, and how to review what went well at the end of the week. Give "
     "concrete examples for each step and explain why it helps."),
]


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, tokens, positions, mask):
    return nnx.merge(graphdef, state)(tokens, positions, mask).logits


@pytest.fixture(scope="module")
def gguf_path():
    return assets.smollm2_gguf()


@pytest.fixture(scope="module")
def prompts(gguf_path) -> list[np.ndarray]:
    tokenizer = load_tokenizer(gguf_path)
    ids = [render_prompt(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    assert all(len(p) >= MIN_PROMPT for p in ids), [len(p) for p in ids]
    return ids


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True)
    return model.eval()


@pytest.fixture(scope="module")
def our_model(gguf_path):
    model = load_target_model(str(gguf_path), make_mesh(MeshConfig(), devices=jax.devices()[:1]), ShardingRules())
    return nnx.split(model)


def padded(prompts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded [B, P] ids (pad 0) and [B] lengths."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    out = np.zeros((len(prompts), lengths.max()), np.int32)
    for row, p in enumerate(prompts):
        out[row, :len(p)] = p
    return out, lengths


def test_logits_match_hf(hf_model, our_model, prompts):
    graphdef, state = our_model
    assert nnx.merge(graphdef, state).arch.tie_word_embeddings
    ids, lengths = padded(prompts)
    b, t = ids.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    ours = np.asarray(_logits(graphdef, state, jnp.asarray(ids), positions, causal_mask(b, t)))
    diffs = []
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            want = hf_model(torch.tensor(prompt[None], dtype=torch.long)).logits[0].float().numpy()
        diffs.append(float(np.max(np.abs(ours[row, :lengths[row]] - want))))
        assert np.abs(want).max() > 10  # real logits, not a degenerate model
    print(f"\nSmolLM2 max |logit diff| per prompt (lengths {lengths.tolist()}): {diffs}")
    assert max(diffs) <= LOGIT_TOL, diffs


def test_greedy_continuations_match_hf(hf_model, our_model, prompts):
    graphdef, state = our_model
    arch = nnx.merge(graphdef, state).arch
    hf_eos = hf_model.generation_config.eos_token_id
    hf_eos = {hf_eos} if isinstance(hf_eos, int) else set(hf_eos)
    assert set(arch.eos_token_ids) == hf_eos  # both stop on the same tokens

    ids, lengths = padded(prompts)
    cache_length = -(-(ids.shape[1] + NEW_TOKENS) // 64) * 64
    settings = GenerationSettings(max_new_tokens=NEW_TOKENS, cache_length=int(cache_length),
                                  eos_ids=arch.eos_token_ids, pad_id=0)
    result = generate(graphdef, state, jnp.asarray(ids), jnp.asarray(lengths), jax.random.key(0), settings)
    ours = [np.asarray(result.tokens[row, :int(result.lengths[row])]).tolist() for row in range(len(prompts))]

    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            out = hf_model.generate(torch.tensor(prompt[None], dtype=torch.long),
                                    attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
                                    do_sample=False, max_new_tokens=NEW_TOKENS,
                                    pad_token_id=min(hf_eos))
        want = out[0, len(prompt):].tolist()
        assert ours[row] == want, (row, ours[row], want)
        assert len(want) == NEW_TOKENS  # the prompts ask for long answers: all 64 tokens compared
