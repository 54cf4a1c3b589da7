"""Checkpoints: an orbax CheckpointManager directory whose every step holds three items,

  model     {'params', 'batch_stats'}: all that inference needs;
  train     step, optimizer state and the learning-rate schedule's state (schedule.stored;
            absent in converted weights): the data position and dropout keys follow from the
            step and the config's seed;
  metadata  JSON: model name and options, input normalisation, config, provenance.

A converted PyTorch net and a training workdir are the same kind of directory, so evaluation and
analysis read both through `load_model`.

Items holding variables (and optimizer states that mirror them) are stored in
`layout.to_checkpoint`'s layout, every stage's identical blocks stacked in `blocks`, whatever
layout the model holds: `save` (for `save_model` and `workdir.Workdir.save`) stacks, and
`restore_checked` restores that layout and hands back the model's. Checksums and
`stored_shapes` are those of the stored layout.
"""
import contextlib
import dataclasses
import hashlib
import json
import logging
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

import resnet_jax
from resnet_jax import storage
from resnet_jax.errors import UserError, first_line
from resnet_jax.models import XLA, Kernels, layout
from resnet_jax.models.inputs import Preprocessing

ITEMS = ("model", "train", "metadata")


class DamagedCheckpoint(UserError):
    """A step whose files are missing, unreadable, or changed since they were written."""


# Input preprocessing stored with the weights (mean, std and the image size trained on).
Normalization = Preprocessing


@dataclasses.dataclass
class LoadedModel:
    model: nn.Module
    variables: Dict[str, Any]  # {'params', 'batch_stats'}
    normalization: Normalization
    metadata: Dict[str, Any]
    step: int
    directory: str = ""


def manager(directory: str, *, max_to_keep: Optional[int] = None, best_metric: Optional[str] = None,
            keep_best: int = 0, read_only: bool = False, async_save: bool = True,
            item_handlers: Optional[Dict[str, Any]] = None) -> ocp.CheckpointManager:
    """The one CheckpointManager construction of the package. `item_handlers` (name -> handler)
    replaces the lazily registered items, for reading item metadata before any restore."""
    policy = best_fn = None
    if best_metric and keep_best:
        # best_fn makes orbax write each step's metrics to disk: without them, the steps of an
        # earlier run read back metric-less, and BestN would keep them all for ever. Steps
        # without metrics (written before this) count for LatestN only.
        best_fn = lambda m: m[best_metric]  # noqa: E731
        policy = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(max_to_keep or 1),
            ocp.checkpoint_managers.BestN(get_metric_fn=best_fn, reverse=False, n=keep_best,
                                          keep_checkpoints_without_metrics=False)])
        max_to_keep = None  # the policy decides
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, read_only=read_only, create=not read_only,
        save_interval_steps=0 if read_only else 1, enable_async_checkpointing=async_save,
        preservation_policy=policy, best_fn=best_fn, best_mode="max")
    if item_handlers is not None:
        return ocp.CheckpointManager(storage.path(directory), options=options,
                                     item_handlers=item_handlers)
    return ocp.CheckpointManager(storage.path(directory), options=options, item_names=ITEMS)


def save_model(directory: str, variables, *, model_name: str, model_options: Dict[str, Any],
               normalization: Normalization, step: int = 0, extra: Optional[Dict] = None) -> str:
    """Weights alone (no training state), as a checkpoint every reader of the package accepts."""
    check_new_directory(directory)
    meta = metadata(model_name, model_options, normalization, extra)
    with manager(directory, async_save=False) as mngr:
        save(mngr, step, meta, model={"params": variables["params"],
                                      "batch_stats": variables.get("batch_stats", {})})
    return directory


def save(mngr: ocp.CheckpointManager, step: int, meta: Dict, metrics: Optional[Dict] = None,
         **items) -> None:
    """The one save of the package: `items` (trees in the model's layout: `model`, and `train`
    for a train state) at `step` in the stored layout (`layout.to_checkpoint`), beside `meta`
    with their checksums (`for_saving`, which refuses a non-finite item); asynchronous where
    `mngr` saves so (returns once the arrays are on the host)."""
    stored = {name: layout.to_checkpoint(tree) for name, tree in items.items()}
    meta = for_saving(mngr, step, meta, **stored)
    mngr.save(step, metrics=metrics, args=ocp.args.Composite(
        **{name: ocp.args.StandardSave(tree) for name, tree in stored.items()},
        metadata=ocp.args.JsonSave(meta)))


def check_new_directory(directory: str) -> None:
    """UserError unless `directory` (local or gs://) is absent or empty: where `save_model`
    writes, and convert checks before converting anything."""
    path = storage.path(directory)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {directory!r} is a file; name a new directory")
    if path.exists() and any(path.iterdir()):
        raise UserError(f"output directory {directory!r} is not empty; choose a new --out")


def checksums(tree) -> Dict[str, int]:
    """{path: a 32-bit hash of the array's bits}, computed where the arrays are (one jitted pass,
    no copy to the host). Each element's bits are multiplied by an odd weight of its position
    and summed modulo 2**32, so any change of one element (a flipped bit included) changes it."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    hashes = jax.device_get(_hashes([x for _, x in leaves]))
    return {jax.tree_util.keystr(path): int(h) for (path, _), h in zip(leaves, hashes)}


@jax.jit
def _hashes(arrays):
    def one(x):
        x = jnp.ravel(jnp.asarray(x))
        if x.dtype == jnp.bool_:
            bits = x.astype(jnp.uint32)
        elif x.dtype.itemsize < 4:
            unsigned = jnp.uint8 if x.dtype.itemsize == 1 else jnp.uint16
            bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
        else:
            bits = jnp.ravel(jax.lax.bitcast_convert_type(x, jnp.uint32))
        weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(0x9E3779B1) | jnp.uint32(1)
        return jnp.sum(bits * weights, dtype=jnp.uint32)
    return [one(x) for x in arrays]


class NonFiniteState(UserError):
    """Arrays about to be saved hold NaN or Inf: a diverged run, never written to disk."""


def nonfinite(tree) -> list:
    """Paths (keystr) of the inexact arrays of `tree` holding a NaN or Inf; one jitted pass."""
    leaves = [(path, x) for path, x in jax.tree_util.tree_leaves_with_path(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    bad = jax.device_get(_all_finite([x for _, x in leaves]))
    return [jax.tree_util.keystr(path) for (path, _), ok in zip(leaves, bad) if not ok]


@jax.jit
def _all_finite(arrays):
    return [jnp.isfinite(x).all() for x in arrays]


def with_checksums(meta: Dict, **items) -> Dict:
    """`meta` plus the checksums of the items saved beside it and a digest of the whole (checked
    by `read_metadata` and `verify`); NonFiniteState if any item holds a NaN or Inf: no path may
    save a diverged state."""
    for name, tree in items.items():
        bad = nonfinite(tree)
        if bad:
            raise NonFiniteState(f"{len(bad)} arrays of the {name!r} item hold NaN or Inf "
                                 f"(first {name}{bad[0]})")
    meta = dict(meta, checksums={name: checksums(tree) for name, tree in items.items()})
    meta.pop(DIGEST, None)
    return dict(meta, **{DIGEST: _digest(meta)})


DIGEST = "metadata_sha256"


def for_saving(mngr: ocp.CheckpointManager, step: int, meta: Dict, **items) -> Dict:
    """`with_checksums` for a save of `step` by `mngr`; a non-finite state is refused naming the
    step and the newest step kept instead (the one way a state reaches a save)."""
    try:
        return with_checksums(meta, **items)
    except NonFiniteState as e:
        kept = max(mngr.all_steps(), default=None)
        kept = ("no checkpoint was saved" if kept is None
                else f"the newest checkpoint (step {kept}) is kept")
        raise NonFiniteState(f"step {step} is not saved: {e}; the run diverged and {kept} in "
                             f"{str(mngr.directory)!r}; lower --config.lr") from None


def _digest(meta: Dict) -> str:
    """sha256 of `meta` (without its digest) as canonical JSON: covers the normalisation, the
    class list, the config and the arrays' checksums, so one changed character is caught."""
    body = {k: v for k, v in meta.items() if k != DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def verify(directory: str, step: int, meta: Dict, **items) -> None:
    """The one definition of an intact step, with `read_metadata`'s digest check of `meta`:
    DamagedCheckpoint unless the restored `items` hash as they did when saved and hold only
    finite numbers (a checkpoint written without checksums is checked for the latter only)."""
    stored = meta.get("checksums") or {}
    for name, tree in items.items():
        if name in stored:
            mine = checksums(tree)
            bad = [k for k in stored[name] if mine.get(k) != stored[name][k]]
            if bad:
                raise DamagedCheckpoint(f"checkpoint {directory!r} step {step} is damaged: "
                                        f"{len(bad)} arrays of its {name!r} item differ from what "
                                        f"was saved (first {bad[0]})")
        bad = nonfinite(tree)
        if bad:
            raise DamagedCheckpoint(
                f"checkpoint {directory!r} step {step} holds non-finite numbers in "
                f"{name}{bad[0]}: damaged, or saved from a diverged run")


def restore_checked(mngr: ocp.CheckpointManager, directory: str, step: int, meta: Dict,
                    targets: Dict[str, Any]) -> Dict[str, Any]:
    """Each item in `targets` (abstract values in the model's layout, with their shardings),
    restored from the stored layout, verified, then in the model's layout and placed as its
    target says. A file that is missing, truncated or unreadable, or an array that changed, is a
    DamagedCheckpoint naming the step."""
    stored = {name: layout.to_checkpoint(t) for name, t in targets.items()}
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(
            **{name: ocp.args.StandardRestore(t) for name, t in stored.items()}))
    except Exception as e:  # tensorstore and orbax raise many kinds for a damaged file
        raise DamagedCheckpoint(f"checkpoint {directory!r} step {step} is damaged: it cannot be "
                                f"read ({first_line(e)})") from None
    restored = {name: restored[name] for name in targets}
    verify(directory, step, meta, **restored)  # the checksums are the stored arrays'
    return {name: in_model_layout(tree, targets[name]) for name, tree in restored.items()}


def in_model_layout(stored, target):
    """A restored tree (stored layout) in the layout of `target` (abstract values in the model's
    layout), each array placed with its target's sharding: one jitted program, which slices
    sharded arrays where they are."""
    shardings = jax.tree.map(lambda t: t.sharding, target)
    return jax.jit(layout.from_checkpoint, out_shardings=shardings)(stored)


def metadata(model_name, model_options, normalization: Normalization, extra=None) -> Dict:
    return dict(model=model_name, model_options=dict(model_options or {}),
                normalization=normalization.to_json(), resnet_jax=resnet_jax.__version__,
                **(extra or {}))


def latest_step(directory: str, step: Optional[int] = None) -> int:
    if not storage.path(directory).exists():
        raise UserError(f"checkpoint directory {directory!r} does not exist")
    if not storage.path(directory).is_dir():
        raise UserError(f"checkpoint {directory!r} is a file; pass the directory that holds the "
                        "numbered steps (a training workdir or the --out of resnet_jax.convert)")
    with manager(directory, read_only=True) as mngr:
        steps = mngr.all_steps()
    if not steps:
        raise UserError(f"no checkpoint in {directory!r}; pass a training workdir or the --out of "
                        "resnet_jax.convert")
    if step is None:
        return max(steps)
    if step not in steps:
        raise UserError(f"no step {step} in {directory!r}; it has steps {steps}")
    return step


def read_metadata(directory: str, step: Optional[int] = None, mngr=None) -> Dict:
    """The step's metadata item (the latest step's by default); DamagedCheckpoint if unreadable
    or changed since it was written (its digest; steps saved before digests have none)."""
    step = latest_step(directory, step) if step is None or mngr is None else step
    try:
        if mngr is not None:
            meta = _read_metadata(mngr, step)
        else:
            with manager(directory, read_only=True) as mngr:
                meta = _read_metadata(mngr, step)
    except Exception as e:
        raise DamagedCheckpoint(f"checkpoint {directory!r} step {step} is damaged: its metadata "
                                f"cannot be read ({first_line(e)})") from None
    if DIGEST in meta and meta[DIGEST] != _digest(meta):
        raise DamagedCheckpoint(f"checkpoint {directory!r} step {step} is damaged: its metadata "
                                "(normalisation, classes, config or checksums) changed since it "
                                "was written")
    return meta


def _read_metadata(mngr, step) -> Dict:
    meta = mngr.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]
    if not isinstance(meta, dict) or "model" not in meta:
        raise ValueError("no model name in it")
    return meta


def abstract_variables(model: nn.Module, image_size: Optional[int] = None):
    """Shapes and dtypes of {'params', 'batch_stats'}, on one device, without computing anything;
    by default at the size the model expects (32 where it takes any)."""
    image_size = image_size or getattr(model, "input_size", None) or 32
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                        {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})})


def stored_shapes(directory: str, step: int) -> Dict[str, Tuple[int, ...]]:
    """{'params/stage2/blocks/conv1/kernel': shape, ...} of the `model` item in its stored layout
    (`layout.to_checkpoint`), read from orbax's item metadata without restoring any array."""
    handlers = {"model": ocp.StandardCheckpointHandler(), "metadata": ocp.JsonCheckpointHandler()}
    try:
        with manager(directory, read_only=True, item_handlers=handlers) as mngr:
            tree = mngr.item_metadata(step)["model"]
    except Exception as e:
        raise DamagedCheckpoint(f"checkpoint {directory!r} step {step} is damaged: the layout of "
                                f"its weights cannot be read ({first_line(e)})") from None
    if tree is None:
        raise UserError(f"checkpoint {directory!r} step {step} holds no model weights")
    return _flat_shapes(tree)


def _stored_shapes_of(target) -> Dict[str, Tuple[int, ...]]:
    """What `stored_shapes` reads from a checkpoint of variables like `target` (model layout)."""
    return _flat_shapes(layout.to_checkpoint(target))


def _flat_shapes(tree) -> Dict[str, Tuple[int, ...]]:
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _shape_mismatches(stored: Dict[str, Tuple[int, ...]], wanted: Dict[str, Tuple[int, ...]]):
    """['params/fc/kernel (64, 10) where the model has (64, 100)', 'params/x absent', ...]."""
    out = [f"{name} absent" if name not in stored else
           f"{name} {stored[name]} where the model has {shape}"
           for name, shape in sorted(wanted.items(), key=lambda kv: not kv[0].startswith("params/"))
           if stored.get(name) != shape]
    return out + [f"{name} not in the model" for name in stored if name not in wanted]


def _guess_stored_model(stored, model: nn.Module, model_name: str, options: Dict) -> str:
    """The zoo's net of the same family and options whose shapes are exactly `stored`, or ''."""
    family = model_name.rstrip("0123456789")
    for name in sorted(resnet_jax.list_models(), key=lambda n: not n.startswith(family)):
        if name == model_name:
            continue
        try:
            other = resnet_jax.create_model(name, **options)
        except resnet_jax.UnknownModelError:
            continue
        if type(other) is type(model) and _stored_shapes_of(abstract_variables(other)) == stored:
            return name
    return ""


def model_for(name: str, options: Dict, image_size: int, kernels: Kernels = XLA) -> nn.Module:
    """The zoo's net as trained on `image_size` images: a net of one input size (CIFAR's, VGG)
    expects that size, a fully convolutional one (the ImageNet ResNets) takes any."""
    model = resnet_jax.create_model(name, kernels=kernels, **options)
    return model if model.input_size is None else model.clone(input_size=image_size)


def load_model(directory: str, step: Optional[int] = None,
               kernels: Kernels = XLA, attempts: int = 3) -> LoadedModel:
    """The model (computing with `kernels`), its variables and its normalisation from a workdir
    or converted weights: `step`, or the latest. A latest step that a live trainer prunes while
    it is read is not damage: the newest step is read instead."""
    for attempt in range(attempts):
        chosen = latest_step(directory, step)
        try:
            return _load_step(directory, chosen, kernels)
        except UserError:  # DamagedCheckpoint, or "no step N" from a read after the listing
            pruned = step is None and not (storage.path(directory) / str(chosen)).exists()
            if not pruned or attempt == attempts - 1:
                raise


def _load_step(directory: str, step: int, kernels: Kernels) -> LoadedModel:
    meta = read_metadata(directory, step)
    image_size = meta.get("image_size", 32)  # what the net was trained on (converted: made for)
    model = model_for(meta["model"], meta.get("model_options", {}), image_size, kernels)
    target = abstract_variables(model, image_size)
    # Compare shapes first: a mismatched restore fails deep inside orbax's async machinery and
    # leaves 'Event loop is closed' tracebacks on stderr at exit.
    stored = stored_shapes(directory, step)
    problems = _shape_mismatches(stored, _stored_shapes_of(target))
    if problems:
        options = meta.get("model_options", {})
        guess = _guess_stored_model(stored, model, meta["model"], options)
        raise UserError(
            f"checkpoint {directory!r} step {step} holds {guess or 'other'} weights but its "
            f"metadata names {meta['model']}{options or ''}: {len(problems)} parameters differ, "
            f"first {'; '.join(problems[:3])}")
    try:
        with manager(directory, read_only=True) as mngr:
            restored = restore_checked(mngr, directory, step, meta, dict(model=target))
    except DamagedCheckpoint as e:
        with manager(directory, read_only=True) as mngr:
            others = [s for s in mngr.all_steps() if s != step]
        hint = f"pass --step with one of {others}" if others else "no other step to use"
        raise DamagedCheckpoint(f"{e}; {hint}") from None
    return LoadedModel(model, dict(restored["model"]),
                       Normalization.from_json(meta["normalization"], image_size), meta, step,
                       str(directory))


class _QuietOrbax(logging.Filter):
    """Drops orbax's progress chatter, its notes that a directory opened read-only is read-only,
    and the tracebacks its background threads log when a save fails: the failure reaches the
    caller as an exception too, which the CLIs report in one line."""

    NOTES = ("Given directory is read only", "read_only=True, setting save_interval_steps",
             "was found in the checkpoint, but could not be restored")

    def filter(self, record):
        if not record.pathname or "orbax" not in record.pathname:
            return True
        if record.levelno < logging.WARNING or record.levelno >= logging.ERROR:
            return False
        return not any(note in record.getMessage() for note in self.NOTES)


def _orbax_leftover(unraisable) -> bool:
    """Whether an exception Python could not raise anywhere comes from a failed restore's
    leftovers: when a damaged file fails one read, orbax's other read coroutines are dropped with
    their own errors pending, and tensorstore may still complete a read into the event loop orbax
    has closed. The failure itself reaches the caller as `DamagedCheckpoint`."""
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return True
    tb = unraisable.exc_traceback
    while tb is not None:
        if "/orbax/" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _without_orbax_leftovers(default_hook):
    """An unraisable-exception hook that does not print `_orbax_leftover`s ("Exception ignored"
    tracebacks after the one-line report of a damaged step) and hands on everything else."""
    def hook(unraisable):
        if not _orbax_leftover(unraisable):
            default_hook(unraisable)
    hook.drops_orbax_leftovers = True
    return hook


@contextlib.contextmanager
def orbax_quieted():
    """`_QuietOrbax` on absl's logger for the duration and no longer: `quiet_orbax` for a library
    call (resnet_jax.load), which must leave its caller's logging as it was."""
    logger, quiet = logging.getLogger("absl"), _QuietOrbax()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def quiet_orbax():
    """For CLIs: keep stderr to what the user needs. Orbax logs every step of a save or restore
    through absl at INFO, and warns that a directory opened read-only is read-only; an explicit
    --verbosity still shows everything but those warnings."""
    import sys
    from absl import flags, logging as absl_logging
    if not getattr(sys.unraisablehook, "drops_orbax_leftovers", False):
        sys.unraisablehook = _without_orbax_leftovers(sys.unraisablehook)
    logger = logging.getLogger("absl")
    if not any(isinstance(f, _QuietOrbax) for f in logger.filters):
        logger.addFilter(_QuietOrbax())
    if "verbosity" in flags.FLAGS and not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
