"""The EAGLE training step in plain PyTorch, written for ``bench_train.py`` as the baseline.

It implements the step of ``flatspec_jax.train.step`` the way the EAGLE reference
(SafeAILab/EAGLE ``eagle/model/cnets.py`` + ``eagle/train/main.py``) does, on the same packed rows,
except for the clipping, which follows ``flatspec train``'s default (the reference clips each
gradient element to +-0.5, ``train.grad_clip_mode=value``; either costs one pass over the gradients):

    features f = frozen target's last hidden state (after its final norm), computed under no_grad
                 inside the step ("online") or given ("offline")
    input      fc(concat(embed(x_{t+1}), f_t + noise)) with bias; noise U(-1/2, 1/2) * 0.2 * 512 / len
    layer      one Llama decoder layer without input norm (RoPE, GQA, SDPA), no final norm
    logits     the target's LM head on the prediction (frozen) and on f_{t+1} (no grad)
    loss       SmoothL1(pred, f_{t+1}) averaged over D + 0.1 * soft CE, each a masked mean
               sum / (n + 1e-5) over the trained positions (same mask as ours)
    update     clip_grad_norm_(0.5), AdamW(betas (0.9, 0.95), weight decay 0.01)

Nothing here imports JAX or flatspec_jax: arrays come in as NumPy.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class EagleHead(nn.Module):
    """fc (2D -> D, bias) + one Llama decoder layer without input norm; no final norm, no LM head."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int, eps: float,
                 rope_theta: float):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.fc = nn.Linear(2 * hidden, hidden, bias=True)
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.register_buffer("inv_freq", 1.0 / rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim),
                             persistent=False)

    def forward(self, features: torch.Tensor, embeddings: torch.Tensor, positions: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """features, embeddings [R, L, D]; positions [R, L]; mask [R, 1, L, L] bool -> [R, L, D]."""
        r, length, _ = features.shape
        h = self.fc(torch.cat([embeddings, features], dim=-1))
        angles = positions.float()[..., None] * self.inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # [R, 1, L, H]
        q = self.q_proj(h).view(r, length, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(r, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(r, length, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        x = h + self.o_proj(attn.transpose(1, 2).reshape(r, length, self.heads * self.head_dim))
        n = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(n)) * self.up_proj(n))

    @classmethod
    def for_target(cls, config) -> EagleHead:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # transformers 5 keeps rope_theta in config.rope_parameters (older versions: config.rope_theta).
        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
        if rope.get("rope_type", "default") != "default":
            raise NotImplementedError(f"RoPE scaling {rope} is not implemented in the benchmark's head")
        return cls(config.hidden_size, config.num_attention_heads, config.num_key_value_heads, head_dim,
                   config.intermediate_size, config.rms_norm_eps, float(theta))

    def load_from_ours(self, flat: dict[str, np.ndarray]) -> None:
        """Copies flatspec_jax's head parameters (``checkpoint.manager.flatten_params`` names, our layouts)."""
        d = self.fc.out_features

        def linear(weight: np.ndarray) -> torch.Tensor:  # ours [in..., out...] -> torch [out, in]
            return torch.from_numpy(np.ascontiguousarray(weight.reshape(weight.shape[0], -1).T)).float()

        with torch.no_grad():
            self.fc.weight.copy_(linear(flat["fc"]))
            self.fc.bias.copy_(torch.from_numpy(np.array(flat["fc_bias"], np.float32)))
            for name in ("q_proj", "k_proj", "v_proj"):
                getattr(self, name).weight.copy_(linear(flat[f"first_layer/self_attn/{name}"]))
            self.o_proj.weight.copy_(linear(flat["first_layer/self_attn/o_proj"].reshape(-1, d)))
            self.post_attention_layernorm.weight.copy_(torch.from_numpy(
                np.array(flat["first_layer/post_attention_layernorm/weight"], np.float32)))
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(self, name).weight.copy_(linear(flat[f"first_layer/mlp/{name}"]))


def packed_inputs(batch: dict[str, np.ndarray], noise: float) -> dict[str, torch.Tensor]:
    """Torch tensors of one packed batch ([R, L] NumPy arrays) plus what the step derives from it once:
    the segment-causal mask, next tokens, the trained-position mask (ours: x_{t+1}, x_{t+2} in t's sample,
    x_{t+2} an assistant token) and the per-token noise scale (amplitude * 512 / sample length)."""
    tokens, segments, loss_mask = batch["tokens"], batch["segment_ids"], batch["loss_mask"]
    r, length = tokens.shape
    causal = np.tril(np.ones((length, length), bool))
    mask = causal[None] & (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)
    mask |= np.eye(length, dtype=bool)[None]  # padding queries see themselves: no all-masked (NaN) rows
    shift = lambda x, k: np.concatenate([x[:, k:], np.zeros((r, k), x.dtype)], axis=1)
    same = (segments > 0) & (shift(segments, 1) == segments) & (shift(segments, 2) == segments)
    trained = same & (shift(loss_mask, 2) > 0)
    lengths = np.stack([np.bincount(row, minlength=length + 1)[row] for row in segments]).astype(np.float32)
    out = {"tokens": torch.from_numpy(tokens.astype(np.int64)),
           "positions": torch.from_numpy(batch["positions"].astype(np.int64)),
           "mask": torch.from_numpy(mask[:, None]),
           "next_tokens": torch.from_numpy(shift(tokens, 1).astype(np.int64)),
           "trained": torch.from_numpy(trained.astype(np.float32)),
           "noise_scale": torch.from_numpy(noise * 512.0 / np.maximum(lengths, 1.0))}
    if "features" in batch:
        out["features"] = torch.from_numpy(np.asarray(batch["features"], np.float32))
    return out


def target_features(target, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The frozen target's last hidden states (after its final norm) on the packed rows."""
    with torch.no_grad():
        return target.model(input_ids=inputs["tokens"], attention_mask=inputs["mask"],
                            position_ids=inputs["positions"]).last_hidden_state


def eagle_loss(head: EagleHead, target, inputs: dict[str, torch.Tensor], features: torch.Tensor,
               noisy: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """EAGLE's loss on one packed batch (features [R, L, D], already computed)."""
    lm_head = target.get_output_embeddings().weight
    with torch.no_grad():
        embeddings = target.get_input_embeddings()(inputs["next_tokens"])
        next_features = torch.cat([features[:, 1:], torch.zeros_like(features[:, :1])], dim=1)
        target_p = F.softmax(F.linear(next_features, lm_head), dim=-1)
    inputs_f = features
    if noisy:
        inputs_f = features + (torch.rand_like(features) - 0.5) * inputs["noise_scale"][..., None]
    predicted = head(inputs_f, embeddings, inputs["positions"], inputs["mask"])
    out_logp = F.log_softmax(F.linear(predicted, lm_head), dim=-1)
    m = inputs["trained"]
    n = m.sum()
    ploss = -(m[..., None] * target_p * out_logp).sum() / (n + 1e-5)
    vloss = (m * F.smooth_l1_loss(predicted, next_features, reduction="none").mean(-1)).sum() / (n + 1e-5)
    loss = vloss + 0.1 * ploss
    return loss, {"loss_feature": vloss.detach(), "loss_token": ploss.detach()}


class TorchEagleTrainer:
    """One optimizer step per call; ``online`` runs the target inside the step, else ``features`` are given."""

    def __init__(self, target, head: EagleHead, learning_rate: float = 3e-5, noise: float = 0.2):
        self.target = target.eval()
        for p in self.target.parameters():
            p.requires_grad_(False)
        self.head = head
        self.noise = noise
        self.optimizer = torch.optim.AdamW(head.parameters(), lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.01)

    def step(self, inputs: dict[str, torch.Tensor], online: bool) -> float:
        features = target_features(self.target, inputs) if online else inputs["features"]
        loss, _ = eagle_loss(self.head, self.target, inputs, features, noisy=self.noise > 0)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.head.parameters(), 0.5)
        self.optimizer.step()
        return float(loss.detach())

    def eval_loss(self, inputs: dict[str, torch.Tensor]) -> float:
        """The loss without noise and without an update (the check that both sides compute the same thing)."""
        with torch.no_grad():
            loss, _ = eagle_loss(self.head, self.target, inputs, target_features(self.target, inputs), noisy=False)
        return float(loss)
