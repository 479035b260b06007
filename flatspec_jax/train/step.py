"""One jitted EAGLE training step: frozen target features -> draft head -> loss -> AdamW update.

Alignment (EAGLE): draft position t reads (f_t + noise, embed(x_{t+1})) and predicts f_{t+1};
the target's LM head on the prediction gives the draft distribution of x_{t+2}, trained
against the target's own distribution softmax(lm_head(f_{t+1})). Position t is trained
when x_{t+1} and x_{t+2} belong to the same packed sample and x_{t+2} is an assistant
token. (The reference masks by x_t instead, an artefact of its data layout that trains the
two positions after an assistant turn ends and skips the first two of each turn; masking by
the predicted token trains exactly the tokens a draft must propose.)

With ``train.unroll`` = K > 1 (training-time test, EAGLE-3/HASS) each position also trains the
head's drafts 2..K, each fed the head's own previous features as in a decoding round
(`EagleHead.unrolled`); draft k is trained where x_{t+1} ... x_{t+k+1} share t's sample and
x_{t+k+1} is an assistant token.

Shape legend: A micro-batches, R rows, L row length, D model dim, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flatspec_jax.config import TrainConfig
from flatspec_jax.models.eagle import EagleHead
from flatspec_jax.models.llama import Llama
from flatspec_jax.models.masks import segment_causal_mask
from flatspec_jax.sharding import ShardingRules
from flatspec_jax.train.head_loss import draft_loss_through_head
from flatspec_jax.train.losses import MASK_EPS, LossTerms

Array = jax.Array
NOISE_REFERENCE_LENGTH = 512
"""EAGLE scales its feature noise by 512 / sample length."""


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (the data iterator's position is saved beside it)."""

    step: Array  # [] int32
    params: nnx.State  # draft head parameters, float32 master copy
    opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Static settings of the compiled step (hashable)."""

    token_loss: str
    feature_weight: float
    token_weight: float
    noise: float
    seed: int
    loss_chunk: int
    unroll: int = 1
    unroll_decay: float = 0.8

    @classmethod
    def from_config(cls, cfg: TrainConfig, seed: int) -> "StepSettings":
        return cls(cfg.loss, cfg.feature_weight, cfg.token_weight, cfg.noise, seed, cfg.loss_chunk, cfg.unroll,
                   cfg.unroll_decay)


def _shift_left(x: Array, k: int) -> Array:
    """x[:, t + k] at position t along axis 1, zero-filled past the end."""
    pad = jnp.zeros((x.shape[0], k) + x.shape[2:], x.dtype)
    return jnp.concatenate([x[:, k:], pad], axis=1)


def trained_positions(segment_ids: Array, loss_mask: Array, ahead: int = 1) -> Array:
    """[R, L] bool: where draft ``ahead`` is trained (x_t ... x_{t+ahead+1} in one sample, x_{t+ahead+1}
    an assistant token)."""
    trained = segment_ids > 0
    for step in range(1, ahead + 2):
        trained = trained & (_shift_left(segment_ids, step) == segment_ids)
    return trained & (_shift_left(loss_mask, ahead + 1) > 0)


def draft_targets(features: Array, tokens: Array, segment_ids: Array, loss_mask: Array, ahead: int = 1
                  ) -> tuple[Array, Array, Array]:
    """Draft ``ahead``'s inputs and targets: tokens x_{t+ahead} [R, L], features f_{t+ahead} [R, L, D] and
    the trained-position mask [R, L] (:func:`trained_positions`)."""
    return (_shift_left(tokens, ahead), _shift_left(features, ahead),
            trained_positions(segment_ids, loss_mask, ahead))


def trained_counts(batches: dict[str, Array], unroll: int) -> Array:
    """[unroll] float32: positions each draft trains over all of ``batches`` ([..., R, L] arrays)."""
    length = batches["segment_ids"].shape[-1]
    segment_ids, loss_mask = (batches[name].reshape(-1, length) for name in ("segment_ids", "loss_mask"))
    return jnp.stack([trained_positions(segment_ids, loss_mask, ahead).sum(dtype=jnp.float32)
                      for ahead in range(1, unroll + 1)])


def feature_noise(key: Array, shape: tuple[int, ...], segment_ids: Array, amplitude: float) -> Array:
    """EAGLE's uniform input noise: (U[0,1) - 1/2) * amplitude * 512 / (length of the token's sample)."""
    num_slots = segment_ids.shape[1] + 1
    counts = jax.nn.one_hot(segment_ids, num_slots, dtype=jnp.float32).sum(axis=1)  # [R, slots]
    lengths = jnp.maximum(jnp.take_along_axis(counts, segment_ids, axis=1), 1.0)
    scale = amplitude * NOISE_REFERENCE_LENGTH / lengths
    return (jax.random.uniform(key, shape) - 0.5) * scale[..., None]


def draft_loss_on_rows(head: EagleHead, target: Llama, batch: dict[str, Array], key: Array | None,
                       settings: StepSettings, agreement: bool | Array = True, draft_ids: Array | None = None,
                       totals: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """Loss of the head on packed rows ([R, L] arrays; ``features`` [R, L, D] when cached offline).

    With ``settings.unroll`` = K > 1 the head drafts K tokens from every position
    (:meth:`EagleHead.unrolled`, training-time test) and the loss is sum_k decay^(k-1) loss_k,
    loss_k comparing draft k at position t with f_{t+k} and the target's distribution of x_{t+k+1}.

    ``key`` None means no input noise (evaluation); the noise perturbs the target features only
    (draft 1's input). ``agreement`` ([] bool) computes the acceptance, top1 and top3 terms (NaN
    without; see `draft_loss_through_head`). ``draft_ids`` [N]: the reduced draft vocabulary the
    token term is computed over (None: all tokens).

    ``totals`` [K]: each draft's trained positions over a whole batch these rows are one micro-batch
    of (:func:`trained_counts`). Draft k's terms are then S_k / (totals_k + eps) instead of its
    masked mean S_k / (n_k + eps), so the micro-batches' losses, gradients and metrics sum to the
    whole batch's.

    Returns:
      (loss, metrics): the loss and :func:`metrics_of` it and each draft's terms.
    """
    tokens, positions, segment_ids = batch["tokens"], batch["positions"], batch["segment_ids"]
    mask = segment_causal_mask(segment_ids)
    if "features" in batch:
        features = batch["features"].astype(target.dtype)
    else:
        with jax.named_scope("target_features"):
            features = target(tokens, positions, mask, return_logits=False).hidden
    features = jax.lax.stop_gradient(features)
    drafts = [draft_targets(features, tokens, segment_ids, batch["loss_mask"], ahead)
              for ahead in range(1, settings.unroll + 1)]
    inputs = features
    if key is not None and settings.noise > 0:
        inputs = features + feature_noise(key, features.shape, segment_ids, settings.noise).astype(features.dtype)
    embeddings = [target.embed(next_tokens) for next_tokens, _, _ in drafts]
    with jax.named_scope("draft"):
        if settings.unroll == 1:
            predictions = [head(inputs, embeddings[0], positions, mask)[0]]
        else:
            predictions = head.unrolled(inputs, embeddings, positions, mask)
    loss, terms = jnp.zeros((), jnp.float32), []
    with jax.named_scope("loss"):
        for index, (predicted, (_, next_features, trained)) in enumerate(zip(predictions, drafts)):
            draft_loss, draft_terms = draft_loss_through_head(
                predicted, next_features, target.lm_head_weight(), trained, token_loss=settings.token_loss,
                feature_weight=settings.feature_weight, token_weight=settings.token_weight,
                chunk=settings.loss_chunk, agreement=agreement, draft_ids=draft_ids)
            if totals is not None:  # the masked mean's share of the whole batch's
                share = (trained.sum(dtype=jnp.float32) + MASK_EPS) / (totals[index] + MASK_EPS)
                draft_loss, draft_terms = share * draft_loss, LossTerms(*[share * term for term in draft_terms])
            loss = loss + settings.unroll_decay ** index * draft_loss
            terms.append(draft_terms)
    return loss, metrics_of(loss, terms)


def metrics_of(loss: Array, terms: Sequence[LossTerms]) -> dict[str, Array]:
    """Loggable float32 scalars: loss, then draft 1's loss_feature, loss_token, acceptance, top1, top3,
    and draft k > 1's (with ``settings.unroll`` > 1) as depth{k}_loss_feature, ..., depth{k}_top3."""
    metrics = {"loss": loss}
    for depth, draft_terms in enumerate(terms, 1):
        prefix = "" if depth == 1 else f"depth{depth}_"
        metrics.update({f"{prefix}loss_{n}" if n in ("feature", "token") else f"{prefix}{n}": v
                        for n, v in draft_terms._asdict().items()})
    return {name: value.astype(jnp.float32) for name, value in metrics.items()}


def _zero_metrics(unroll: int) -> dict[str, Array]:
    """The carry a micro-batch scan sums :func:`metrics_of` into."""
    scalar = jnp.zeros((), jnp.float32)
    return metrics_of(scalar, [LossTerms(*[scalar] * len(LossTerms._fields))] * unroll)


def _train_step(head_graphdef: nnx.GraphDef, target_graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                settings: StepSettings, state: TrainState, target_params: nnx.State, batches: dict[str, Array],
                agreement: bool | Array = True, draft_ids: Array | None = None) -> tuple[TrainState, dict[str, Array]]:
    """One optimizer step over A micro-batches ([A, R, L] arrays), equal to one batch of all A x R rows.

    Each draft's loss over the whole batch is a masked mean S / (n + eps) over its n trained
    positions; each micro-batch contributes S_a / (n + eps) (``totals`` of
    :func:`draft_loss_on_rows`), so the micro-batches' gradients and metrics sum to the whole
    batch's, for every draft of the training-time test too. (The EAGLE reference's accumulation
    averages the micro-batch means instead, so a micro-batch with few trained tokens weighs as
    much as a full one.) TVD++ normalises its reward over each position's vocabulary, so the
    equality holds for it too; only ``losses.tvd_plus_plus(normalize="batch")``, which no config selects,
    standardises within each micro-batch.

    Metrics: the loss terms and agreement of :func:`metrics_of`, ``grad_norm`` and ``tokens`` (the
    step's non-padding tokens, all rows of the global batch).

    ``agreement`` ([] bool, traced) asks for the acceptance/top1/top3 metrics, which are NaN
    without it; the loop sets it only on the steps it logs. ``draft_ids`` [N]: a reduced draft
    vocabulary the token term is computed over (`draft_loss_through_head`).
    """
    target = nnx.merge(target_graphdef, target_params)
    base_key = jax.random.fold_in(jax.random.key(settings.seed), state.step)
    micro_batches = jax.tree.leaves(batches)[0].shape[0]
    totals = None if micro_batches == 1 else trained_counts(batches, settings.unroll)

    def micro_loss(params: nnx.State, batch: dict[str, Array], key: Array):
        head = nnx.merge(head_graphdef, params)
        return draft_loss_on_rows(head, target, batch, key, settings, agreement, draft_ids, totals)

    def accumulate(carry, inputs):
        index, batch = inputs
        (_, metrics), grads = jax.value_and_grad(micro_loss, has_aux=True)(
            state.params, batch, jax.random.fold_in(base_key, index))
        return jax.tree.map(jnp.add, carry, (grads, metrics)), None

    if micro_batches == 1:  # the batch's own masked means: the gradient as it is, bit for bit
        batch = jax.tree.map(lambda x: x[0], batches)
        (_, metrics), grads = jax.value_and_grad(micro_loss, has_aux=True)(
            state.params, batch, jax.random.fold_in(base_key, 0))
    else:
        zeros = (jax.tree.map(jnp.zeros_like, state.params), _zero_metrics(settings.unroll))
        (grads, metrics), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(micro_batches), batches))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["tokens"] = (batches["segment_ids"] > 0).sum(dtype=jnp.int32)  # every process's rows; exact past 2**24
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def _eval_step(head_graphdef: nnx.GraphDef, target_graphdef: nnx.GraphDef, settings: StepSettings,
               params: nnx.State, target_params: nnx.State, batches: dict[str, Array], totals: Array | None = None,
               draft_ids: Array | None = None) -> dict[str, Array]:
    """Loss terms of A micro-batches ([A, R, L] arrays) without noise or update.

    ``totals`` [K] (float32): each draft's trained positions over the whole evaluated set these
    micro-batches are part of (:func:`trained_counts` of all of it); the result is then these
    batches' share of the set's masked means, so the results of all of the set's batches sum to
    its metrics exactly, for every draft. None: the batches are the whole set (their own masked
    means, as `_train_step` computes them).
    """
    head = nnx.merge(head_graphdef, params)
    target = nnx.merge(target_graphdef, target_params)
    micro_batches = jax.tree.leaves(batches)[0].shape[0]
    if totals is None and micro_batches > 1:
        totals = trained_counts(batches, settings.unroll)

    def accumulate(metrics_sum, batch):
        _, metrics = draft_loss_on_rows(head, target, batch, None, settings, draft_ids=draft_ids, totals=totals)
        return jax.tree.map(jnp.add, metrics_sum, metrics), None

    if micro_batches == 1:
        _, metrics = draft_loss_on_rows(head, target, jax.tree.map(lambda x: x[0], batches), None, settings,
                                        draft_ids=draft_ids, totals=totals)
    else:
        metrics, _ = jax.lax.scan(accumulate, _zero_metrics(settings.unroll), batches)
    return metrics


def batch_spec(mesh: Mesh, rules: ShardingRules, leading: int) -> NamedSharding:
    """Sharding of [*leading, R, L, ...] batch arrays: rows over the batch axes."""
    return NamedSharding(mesh, PartitionSpec(*([None] * leading), rules.spec(("batch",), mesh=mesh)[0]))


def compile_steps(head_graphdef: nnx.GraphDef, target_graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                  settings: StepSettings, state_shardings: Any, target_shardings: Any, mesh: Mesh,
                  rules: ShardingRules, draft_ids: np.ndarray | None = None):
    """The jitted train step ``(state, target_params, batches, agreement)`` (state donated, explicit
    shardings) and eval step ``(params, target_params, batches, totals)``, both over [A, R, L] micro-batches;
    ``draft_ids`` [N] (a reduced draft vocabulary, `draft_loss_through_head`) is a constant of both."""
    replicated = NamedSharding(mesh, PartitionSpec())
    ids = None if draft_ids is None else np.asarray(draft_ids, np.int32)
    train = jax.jit(functools.partial(_train_step, head_graphdef, target_graphdef, tx, settings, draft_ids=ids),
                    in_shardings=(state_shardings, target_shardings, batch_spec(mesh, rules, 1), replicated),
                    out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    evaluate = jax.jit(functools.partial(_eval_step, head_graphdef, target_graphdef, settings, draft_ids=ids),
                       in_shardings=(state_shardings.params, target_shardings, batch_spec(mesh, rules, 1),
                                     replicated),
                       out_shardings=replicated)
    return train, evaluate
