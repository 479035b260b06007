"""The tiny target the CLI-level tests run: a random 2-layer Llama over SmolLM2's 49152-token
vocabulary, saved as an HF directory (config.json, model.safetensors) with SmolLM2's tokenizer
(so its chat template), plus the environment of a one-CPU-device ``flatspec`` subprocess."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from flatspec_jax import assets
from flatspec_jax.data.tokenizer import load_tokenizer
from flatspec_jax.weights.safetensors_reader import write_safetensors

REPO = Path(__file__).resolve().parents[1]
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 32, 64, 2, 4, 2


def save_tiny_llama(path: Path, *, seed: int = 0, std: float = 0.5) -> Path:
    """Writes the tiny target to ``path`` and returns it.

    Weights are drawn with NumPy (no torch import): matrices and embeddings N(0, std^2), norms 1.
    std 0.5 puts the next-token distributions far from uniform (flatness spread over (0, 1)).
    """
    import transformers

    tokenizer = load_tokenizer(assets.smollm2_gguf())
    vocab, d, f = len(tokenizer), HIDDEN, INTERMEDIATE
    kv = KV_HEADS * HIDDEN // HEADS
    transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=d, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, intermediate_size=f, max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id).save_pretrained(path)
    tokenizer.save_pretrained(path)
    shapes = {"model.embed_tokens.weight": (vocab, d), "lm_head.weight": (vocab, d), "model.norm.weight": (d,)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
                       p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f)})
    rng = np.random.default_rng(seed)
    tensors = {name: (np.ones(shape, np.float32) if name.endswith("norm.weight")
                      else (std * rng.standard_normal(shape)).astype(np.float32)) for name, shape in shapes.items()}
    with open(path / "model.safetensors", "wb") as handle:
        write_safetensors(handle, {k: (t.dtype, t.shape) for k, t in tensors.items()}, tensors.items(),
                          {"format": "pt"})
    return path


def cli_env(cache: Path) -> dict[str, str]:
    """A ``flatspec`` subprocess's environment: one CPU device (not the tests' 8), its own cache root,
    this checkout on the path, Hugging Face offline."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", FLATSPEC_CACHE_DIR=str(cache), PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def tiny_run_overrides(tiny_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    """Config overrides of a whole run on the tiny target that takes about a minute: 12 ShareGPT
    conversations of <= 64 tokens, 2 held out, 2 training steps, one MT-bench question."""
    return [f"model.path={tiny_dir}", f"run_dir={run_dir}", "data.limit=12", "data.max_length=64", "data.heldout=2",
            "score.row_length=64", "score.rows_per_batch=2", "mesh.data=1", "select.keep=1.0", "train.steps=2",
            "train.row_length=64", "train.batch_tokens=128", "train.warmup_steps=0", "train.log_every=1",
            "train.eval_every=2", "train.save_every=2", "train.features=online", "train.loss_chunk=16",
            "decode.method=chain", "decode.gamma=2", "decode.max_new_tokens=6", "decode.max_cache_length=512",
            "eval.limit=1", "eval.warmup=0", *extra]
