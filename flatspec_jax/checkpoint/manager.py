"""Orbax checkpoints of the draft head: layout, identity checks and restore onto any mesh.

On-disk layout of ``<run_dir>/checkpoints/<step>/`` (one orbax step directory, written
atomically by orbax: a half-written step is never visible as a step):

    state/   orbax StandardSave of {"params": {"first_layer/self_attn/q_proj": {"value": [D, N, H]}, ...},
                                    "opt_state": {"1/0/count": [], "1/0/mu/...": ...}, "step": []}
             parameters keyed by their NNX path, each an NNX variable's {"value": array} in
             our [in, out] orientation with head axes split (q_proj [D, N, H], o_proj [N, H, D];
             ``weights.layout.LAYER_TENSORS`` maps them to HF names and shapes);
             optimizer leaves keyed by their path in optax's state, e.g. "1/0/mu/fc/value"
             (the AdamW first moment of fc's weight; checkpoints of earlier versions of this package
             key them "000", "001", ... in flattening order, and still restore). To read a head
             without this package, ``flatspec export`` writes the public EAGLE layout
    data/    JSON: the training data's position, {"next_batch": global batches consumed}
             (``data.pipeline.TrainingBatches``; exact data order on resume, with any worker
             or process count)
    meta/    JSON: the resolved config, the draft architecture (ArchSpec), the target's
             identity (its ArchSpec and a hash of its tokenizer vocabulary) and, for a head
             trained on a reduced draft vocabulary (``draft.vocab``), its token ids under
             "draft_vocab" (null otherwise): decoding must draft from exactly those

Arrays are saved with their logical shapes, not their device layout, so a checkpoint
written on one mesh restores on another: restore is given the target shardings.

A *params-only* step (what ``flatspec import`` writes, see :func:`save_draft_params`) has
``state/`` = {"params": ..., "step": []} without "opt_state", no ``data/``, and its meta adds
``"params_only": true`` plus where the parameters came from. :func:`load_draft_head` reads
both kinds; training cannot resume from a params-only step (it has no optimizer or data
state), so one is written as step 0, which ``flatspec train`` never restores.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from orbax.checkpoint import checkpoint_managers as policies

from flatspec_jax import runtime
from flatspec_jax.models.eagle import EagleHead
from flatspec_jax.sharding import ShardingRules, state_shardings
from flatspec_jax.weights.arch import ArchSpec

log = logging.getLogger(__name__)

META_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
"""A run directory's orbax draft checkpoints."""
DAMAGED_STEP = ("the step is damaged: delete that directory (training then resumes from the previous checkpoint, "
                "if there is one)")
ITEM_NAMES = ("state", "data", "meta")
"""The items of a step directory (see the module docstring)."""


class CheckpointMismatchError(ValueError):
    """A checkpoint was made for another target model, is not a draft checkpoint, or is damaged."""


@contextlib.contextmanager
def _reader(directory: Path, **kwargs: Any) -> Iterator[ocp.CheckpointManager]:
    """A read-only orbax manager of ``directory`` (``kwargs``: its item names or handlers), closed
    on the way out, a failed restore included."""
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True), **kwargs)
    try:
        yield manager
    finally:
        manager.close()


def _restore_item(manager: ocp.CheckpointManager, step: int, what: str, **items: Any) -> Any:
    """``manager.restore`` of ``items`` at ``step``; a damaged step (a missing item, cut or garbled
    files) is a one-line error naming the step directory and what to do."""
    try:
        return manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as err:  # noqa: BLE001 - orbax reports a cut array file as a bare Exception
        # The first sentence: orbax appends a dump of the TensorStore spec to a failed array read.
        first = re.split(r"(?<=\S)\.\s", str(err).strip().partition("\n")[0], maxsplit=1)[0]
        raise CheckpointMismatchError(
            f"{manager.directory}/{step}: cannot read its {what} ({type(err).__name__}: {first[:300]}); "
            f"{DAMAGED_STEP}") from err


def vocab_hash(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary (token strings in id order)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()


def draft_meta(config: dict[str, Any], draft: ArchSpec, target: ArchSpec, target_vocab_hash: str,
               fc_bias: bool, draft_vocab: np.ndarray | None = None,
               inputs: dict[str, str | None] | None = None) -> dict[str, Any]:
    """The metadata saved with every checkpoint; ``draft_vocab`` [N]: the token ids a head trained on a
    reduced vocabulary proposes from; ``inputs``: what it was trained on (`train.resume.training_inputs`)."""
    return {"version": META_VERSION, "config": config, "draft_arch": json.loads(draft.to_json()),
            "fc_bias": fc_bias, "target_arch": json.loads(target.to_json()), "target_vocab_hash": target_vocab_hash,
            "draft_vocab": None if draft_vocab is None else [int(i) for i in draft_vocab], "inputs": inputs}


def trained_draft_vocab(meta: dict[str, Any]) -> np.ndarray | None:
    """[N] int32 ascending ids a checkpoint's head was trained to propose from; None for a head trained
    on the whole vocabulary (and for checkpoints written before the field existed)."""
    ids = meta.get("draft_vocab")
    return None if ids is None else np.asarray(ids, np.int32)


def flatten_params(state: nnx.State) -> dict[str, Any]:
    """{"first_layer/self_attn/q_proj": array, ...} for every variable of a state."""
    return {"/".join(str(k) for k in path): value for path, value in nnx.to_flat_state(state)}


def unflatten_params(state: nnx.State, flat: dict[str, Any]) -> nnx.State:
    """Copies ``flat`` (as made by :func:`flatten_params`) into a state of the same structure."""
    pairs = [(path, flat["/".join(str(k) for k in path)]) for path, _ in nnx.to_flat_state(state)]
    return nnx.from_flat_state(pairs)


def _flatten_opt_state(opt_state: Any) -> dict[str, Any]:
    """{"1/0/mu/fc/kernel/value": leaf, ...}: every leaf of an optax state keyed by its path, in
    flattening order."""
    pairs = [(jax.tree_util.keystr(path, simple=True, separator="/"), leaf)
             for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]]
    flat = dict(pairs)
    if len(flat) != len(pairs):
        raise ValueError("two optimizer-state leaves have the same path; they cannot be checkpointed by path")
    return flat


def _as_abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params: nnx.State, param_shardings: Any,
                         mesh: Mesh) -> Any:
    """Moments follow their parameters' shardings; scalars (step counts) are replicated."""
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(tx, lambda _, sharding: sharding, abstract_opt, param_shardings,
                                 transform_non_params=lambda _: replicated)


class _CheckpointManager(ocp.CheckpointManager):
    """orbax's manager kept off JAX's preemption sync point. orbax reports the step of every save to it
    (twice, and once more from process 0's finalize thread), which would move the point the processes
    agree on away from the checks of ``runtime.reached_preemption``, or apart between processes; the
    training loop decides itself when a preemption is saved."""

    def reached_preemption(self, step: int) -> bool:
        return runtime.told_to_stop()


def _heldout_loss(metrics: dict[str, float]) -> float:
    """What ranks the evaluated checkpoints: the held-out loss, lower is better."""
    return metrics["eval_loss"]


class DraftCheckpointer:
    """Keeps the last ``keep`` checkpoints plus the best one by held-out loss; saves asynchronously."""

    def __init__(self, directory: Path, keep: int):
        """Raises PermissionError when ``directory`` (or, not yet made, its nearest existing parent) cannot
        be written: found before training, not at the first save after minutes of it."""
        existing = next(p for p in (Path(directory).absolute(), *Path(directory).absolute().parents) if p.exists())
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(f"{existing} is not writable: the draft's checkpoints cannot be saved to {directory}")
        preservation = policies.AnyPreservationPolicy([
            policies.preservation_policy.LatestN(n=keep),
            policies.preservation_policy.BestN(get_metric_fn=_heldout_loss, reverse=True, n=1,
                                               keep_checkpoints_without_metrics=False),
        ])
        self.directory = Path(directory).absolute()
        # The preservation policy alone decides what is kept. best_fn only makes orbax write each evaluated
        # step's metrics beside it (without it they live in this manager's memory), so that a resumed or
        # restarted run still knows which kept step is the best and does not delete it as an old one.
        self.manager = _CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(preservation_policy=preservation, best_fn=_heldout_loss,
                                                 best_mode="min", enable_async_checkpointing=True,
                                                 cleanup_tmp_directories=True),
            item_names=ITEM_NAMES)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, iterator: Any, meta: dict[str, Any],
             metrics: dict[str, float] | None = None) -> None:
        """Saves asynchronously: the train state, ``iterator.get_state()`` and ``meta``."""
        payload = {"params": flatten_params(state.params), "opt_state": _flatten_opt_state(state.opt_state),
                   "step": state.step}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(payload), data=ocp.args.JsonSave(iterator.get_state()),
            meta=ocp.args.JsonSave(meta)), metrics=metrics)

    def restore(self, step: int, abstract_state: Any, shardings: Any, tx: optax.GradientTransformation,
                iterator: Any) -> Any:
        """Restores a TrainState-like (step, params, opt_state) onto ``shardings`` and the iterator's
        position in place (``iterator.set_state``)."""
        params_abstract = _as_abstract(flatten_params(abstract_state.params), flatten_params(shardings.params))
        # Optimizer leaves in flattening order (a jax.tree.map over the dict would sort its keys).
        opt_leaves, opt_def = jax.tree.flatten(abstract_state.opt_state)
        saved_names = self._saved_opt_names(step, list(_flatten_opt_state(abstract_state.opt_state)))
        opt_abstract = {name: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding) for name, leaf, sharding
                        in zip(saved_names, opt_leaves, jax.tree.leaves(shardings.opt_state), strict=True)}
        target = {"params": params_abstract, "opt_state": opt_abstract,
                  "step": jax.ShapeDtypeStruct((), np.int32, sharding=shardings.step)}
        restored = _restore_item(self.manager, step, "training state", state=ocp.args.StandardRestore(target))
        iterator.set_state(self._data_state(step))
        state = restored["state"]
        return type(abstract_state)(
            step=state["step"], params=unflatten_params(abstract_state.params, state["params"]),
            opt_state=jax.tree.unflatten(opt_def, [state["opt_state"][name] for name in saved_names]))

    def _saved_opt_names(self, step: int, names: list[str]) -> list[str]:
        """The on-disk keys of the optimizer leaves ``names`` (this optimizer's paths, in flattening
        order): the paths themselves, or "000", "001", ... in a checkpoint written before leaves
        were keyed by path."""
        with _reader(self.directory, item_handlers={"state": ocp.StandardCheckpointHandler()}) as reader:
            try:
                saved = set(reader.item_metadata(step)["state"]["opt_state"])
            except (KeyError, TypeError, ValueError, OSError) as err:
                raise CheckpointMismatchError(f"{self.directory}/{step}: cannot read its state's metadata ({err}); "
                                              f"{DAMAGED_STEP}") from err
        by_index = [f"{i:03d}" for i in range(len(names))]
        for layout in (names, by_index):
            if saved == set(layout):
                return layout
        missing, unexpected = sorted(set(names) - saved), sorted(saved - set(names))
        raise CheckpointMismatchError(
            f"{self.directory}/{step}: its optimizer state does not fit this optimizer (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); a checkpoint resumes only with the optax transformation it was "
            "trained with (and optax / flax versions that name its state the same way)")

    def _data_state(self, step: int) -> dict[str, Any]:
        # Checkpoints written before the position was saved as JSON hold Grain's own state of the
        # same in-process iterator over global batches, per process: {"next_index": batches}.
        grain_states = sorted((self.directory / str(step) / "data").glob("process_*-of-*.json"))
        if grain_states:
            return {"next_batch": json.loads(grain_states[0].read_text())["next_index"]}
        return _restore_item(self.manager, step, "data position", data=ocp.args.JsonRestore())["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def save_draft_params(directory: Path, params: nnx.State, meta: dict[str, Any], step: int = 0) -> Path:
    """Writes a params-only checkpoint step (see the module docstring) and waits until it is complete.

    ``params`` is the head's state (arrays placed on any mesh); every JAX process must call
    this, as for any orbax save. ``meta`` is :func:`draft_meta`'s dict; ``"params_only": True``
    is added.

    Raises:
      CheckpointMismatchError: when ``directory`` already holds this step.
    """
    directory = Path(directory).absolute()
    manager = _CheckpointManager(directory, options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False),
                                 item_names=ITEM_NAMES)
    try:
        if step in manager.all_steps():
            raise CheckpointMismatchError(f"{directory} already holds step {step}")
        payload = {"params": flatten_params(params), "step": np.asarray(step, np.int32)}
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(payload),
                                                   meta=ocp.args.JsonSave({**meta, "params_only": True})))
        manager.wait_until_finished()
    finally:
        manager.close()
    return directory / str(step)


def holds_trained_steps(directory: Path) -> bool:
    """True when ``directory`` holds a training step (an imported head is step 0, never trained on)."""
    directory = Path(directory)
    return directory.is_dir() and any(p.name.isdigit() and int(p.name) > 0 for p in directory.iterdir())


def read_meta(directory: Path, step: int | None = None) -> tuple[int, dict[str, Any]]:
    """(step, metadata) of a checkpoint directory's given or latest step.

    Raises:
      CheckpointMismatchError: naming the directory when it holds no draft checkpoint.
    """
    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise CheckpointMismatchError(f"{directory} {'is not a directory' if directory.exists() else 'does not exist'}"
                                      " (expected a checkpoint directory of orbax step directories)")
    with _reader(directory, item_names=ITEM_NAMES) as manager:
        steps = manager.all_steps()
        if not steps:
            raise CheckpointMismatchError(f"{directory} holds no checkpoint (expected orbax step directories)"
                                          f"{_what_it_holds(directory)}")
        step = max(steps) if step is None else step
        if step not in steps:
            raise CheckpointMismatchError(f"{directory} holds no step {step} (its steps: "
                                          f"{', '.join(map(str, sorted(steps)))})")
        meta = _restore_item(manager, step, "metadata", meta=ocp.args.JsonRestore())["meta"]
    if not isinstance(meta, dict) or meta.get("version") != META_VERSION:
        raise CheckpointMismatchError(f"{directory}/{step}/meta is not flatspec draft metadata "
                                      f"(version {META_VERSION} expected)")
    return step, meta


def _what_it_holds(directory: Path) -> str:
    """A hint for a directory given where a checkpoint directory was expected, by what it holds."""
    if (directory / CHECKPOINT_DIR).is_dir():
        return f"; it is a run directory: pass {directory / CHECKPOINT_DIR}"
    if directory.name.isdigit() and any((directory / item).is_dir() for item in ITEM_NAMES):
        return f"; it is one step of a checkpoint directory: pass {directory.parent} (export takes --step)"
    if (directory / "config.json").is_file():
        return "; it looks like an EAGLE-format head: `flatspec import --input DIR` turns it into a checkpoint"
    return ""


def check_target(meta: dict[str, Any], target: ArchSpec, target_vocab_hash: str, source: str) -> None:
    """Raises CheckpointMismatchError unless the draft was made for this target."""
    saved = ArchSpec.from_json(json.dumps(meta["target_arch"]), source)
    if saved != target:
        diffs = [f"{k}: draft made for {getattr(saved, k)!r}, target has {getattr(target, k)!r}"
                 for k in target.__dataclass_fields__ if getattr(saved, k) != getattr(target, k)]
        raise CheckpointMismatchError(f"{source}: the draft was trained for another target model ({'; '.join(diffs)})")
    if meta["target_vocab_hash"] != target_vocab_hash:
        raise CheckpointMismatchError(f"{source}: the draft was trained with another tokenizer vocabulary "
                                      "(vocab hash differs)")


def load_draft_head(directory: Path, target: ArchSpec, target_vocab_hash: str, mesh: Mesh, rules: ShardingRules,
                    *, step: int | None = None, dtype: str = "float32") -> EagleHead:
    """The draft head's parameters only (no optimizer state), restored onto ``mesh`` for inference.

    Raises:
      CheckpointMismatchError: when the checkpoint belongs to another target or tokenizer.
    """
    directory = Path(directory).absolute()
    step, meta = read_meta(directory, step)
    check_target(meta, target, target_vocab_hash, f"{directory}/{step}")
    draft = ArchSpec.from_json(json.dumps(meta["draft_arch"]), f"{directory}/{step}/meta")
    # The saved draft architecture: the target's layer shapes (checked above) with the head's own
    # RoPE and norm settings (an imported head's may differ from the target's).
    abstract = nnx.eval_shape(lambda: EagleHead(draft, rngs=nnx.Rngs(0), dtype=jnp.dtype(dtype),
                                                fc_bias=meta["fc_bias"]))
    graphdef, params = nnx.split(abstract)
    shardings = state_shardings(params, mesh, rules)
    target_tree = {"params": _as_abstract(flatten_params(params), flatten_params(shardings))}
    # PyTreeRestore takes the shardings from restore_args only (the item's ShapeDtypeStruct
    # shardings are ignored: orbax would fall back to the saved topology's shardings).
    with _reader(directory, item_names=ITEM_NAMES) as manager:
        restored = _restore_item(manager, step, "parameters", state=ocp.args.PyTreeRestore(
            target_tree, restore_args=ocp.checkpoint_utils.construct_restore_args(target_tree), partial_restore=True))
    log.info("loaded draft head from %s (step %d)", directory, step)
    return nnx.merge(graphdef, unflatten_params(params, restored["state"]["params"]))
