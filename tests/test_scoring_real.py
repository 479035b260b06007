"""Real scores: the first 32 ShareGPT samples on SmolLM2-135M-Instruct vs transformers/PyTorch.

Our side is the scoring stage as ``flatspec score`` runs it (tokenize with the chat template and
loss mask, pack into 4 x 512 rows, fused LM head + statistics), on one device. The reference
runs HF transformers on the same GGUF (both sides dequantize it to float32), each sample alone,
and computes the statistics from the definitions in float64: p = softmax(logits), flatness =
cosine(p, uniform), entropy, max p, -log p[next token]; position t counts in ``flatness`` (and
entropy, top1_prob, nll) iff token t + 1 exists and has loss_mask 1, in ``flatness_all`` iff
token t + 1 exists.
"""

from __future__ import annotations

import time

import jax
import numpy as np
import pytest
import torch
import transformers

from flatspec_jax import assets
from flatspec_jax.config import MeshConfig, load_config
from flatspec_jax.data.prepare import prepare_samples
from flatspec_jax.data.tokenizer import load_tokenizer
from flatspec_jax.scoring import STAT_COLUMNS, score_dataset
from flatspec_jax.sharding import ShardingRules, make_mesh
from flatspec_jax.stages.score import score_fingerprint
from flatspec_jax.weights.to_nnx import load_target_model

pytestmark = pytest.mark.slow


# Relative: measured at most 4.8e-6 on every statistic (float32 forward vs float64 reference).
RTOL = 5e-5
NUM_SAMPLES = 32
MAX_LENGTH = 512


def reference_scores(model, input_ids: np.ndarray, loss_mask: np.ndarray) -> dict[str, float]:
    with torch.no_grad():
        logits = model(torch.as_tensor(input_ids[None].astype(np.int64))).logits[0]
    z = logits.double()[:-1]  # position t predicts token t + 1
    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp()
    uniform = torch.full((z.shape[-1],), 1.0 / z.shape[-1], dtype=torch.float64)
    flat = torch.nn.functional.cosine_similarity(p, uniform[None], dim=-1)
    per_token = {
        "flatness": flat,
        "entropy": -(p * log_p).sum(-1),
        "top1_prob": p.max(-1).values,
        "nll": -log_p.gather(-1, torch.as_tensor(input_ids[1:].astype(np.int64))[:, None])[:, 0],
    }
    trained = torch.as_tensor(loss_mask[1:] > 0)
    out = {name: (v[trained].mean().item() if trained.any() else np.nan) for name, v in per_token.items()}
    out["flatness_all"] = flat.mean().item() if len(flat) else np.nan
    out["n_trained_tokens"] = int(trained.sum())
    return out


def test_sharegpt_scores_match_transformers(tmp_path, capsys):
    gguf = assets.smollm2_gguf()
    cfg = load_config(None, [f"data.limit={NUM_SAMPLES}", f"data.max_length={MAX_LENGTH}", f"run_dir={tmp_path}"])
    start = time.perf_counter()
    dataset = prepare_samples(cfg.data, str(gguf), load_tokenizer(gguf), tmp_path)
    mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])
    rules = ShardingRules()
    model = load_target_model(str(gguf), mesh, rules)
    table = score_dataset(model, dataset, cfg.score, mesh, rules, tmp_path / "scores.parquet",
                          score_fingerprint(cfg, dataset.fingerprint))
    ours_s = time.perf_counter() - start
    # Conversations whose first 512 tokens hold no assistant token are dropped (5 of the first 32).
    assert table.num_rows == len(dataset) and len(dataset) >= NUM_SAMPLES // 2
    assert table["n_tokens"].to_numpy().max() <= MAX_LENGTH

    start = time.perf_counter()
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                           local_files_only=True).eval()
    rows = [reference_scores(hf, *dataset[i]) for i in range(len(dataset))]
    hf_s = time.perf_counter() - start
    want = {k: np.asarray([r[k] for r in rows]) for k in rows[0]}

    np.testing.assert_array_equal(table["n_trained_tokens"].to_numpy(), want["n_trained_tokens"])
    report = []
    for name in STAT_COLUMNS:
        got = table[name].to_numpy()
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want[name]), err_msg=name)
        ok = ~np.isnan(got)
        abs_err = np.abs(got[ok] - want[name][ok])
        report.append(f"{name}: max abs {abs_err.max():.2e}, max rel {(abs_err / np.abs(want[name][ok])).max():.2e}")
    with capsys.disabled():
        print(f"\n[scoring vs transformers, {len(dataset)} samples, {int(dataset.lengths.sum())} tokens] "
              + "; ".join(report) + f"; ours (tokenize+load+score) {ours_s:.1f} s, HF (load+forward) {hf_s:.1f} s")
    for name in STAT_COLUMNS:
        np.testing.assert_allclose(table[name].to_numpy(), want[name], rtol=RTOL, atol=0, equal_nan=True,
                                   err_msg=name)
