"""Checkpoint directories: round trip, and a mismatch caught before orbax restores anything."""
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import resnet_jax
from resnet_jax import checkpoint
from resnet_jax.errors import UserError
from resnet_jax.models import layout

REPO = pathlib.Path(__file__).resolve().parents[1]
NORM = checkpoint.Normalization(mean=np.full((32, 32, 3), 0.5, np.float32))


def _variables(name, **options):
    """Random variables of the right shapes (model.init would compile for tens of seconds)."""
    model = resnet_jax.create_model(name, **options)
    rng = np.random.default_rng(0)
    return model, jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype),
                               checkpoint.abstract_variables(model))


def test_save_then_load_round_trips(tmp_path):
    model, variables = _variables("resnet20", shortcut="B")
    checkpoint.save_model(str(tmp_path / "c"), variables, model_name="resnet20",
                          model_options={"shortcut": "B"}, normalization=NORM, step=7,
                          extra={"source": "test"})
    loaded = checkpoint.load_model(str(tmp_path / "c"))
    assert loaded.step == 7 and loaded.metadata["source"] == "test"
    assert loaded.model.shortcut == "B"
    jax.tree.map(np.testing.assert_array_equal, loaded.variables, dict(variables))
    np.testing.assert_array_equal(loaded.normalization.mean, NORM.mean)
    shapes = checkpoint.stored_shapes(str(tmp_path / "c"), 7)
    assert shapes["params/stage2/blocks/conv1/kernel"] == (2, 3, 3, 32, 32)
    assert shapes["batch_stats/bn1/mean"] == (16,)


def test_a_checkpoint_in_the_stacked_layout_loads_into_per_block_modules(tmp_path):
    """Checkpoints store a stage's identical blocks stacked in `blocks` (every checkpoint written
    so far, converted weights included); the model holds `block1`, `block2`, ...: the restored
    variables are the saved ones, block b from row b - 1, and compute the same logits."""
    model, variables = _variables("resnet20", widths=(4, 8, 8))
    stacked = layout.stack_blocks(variables)
    assert stacked["params"]["stage3"]["blocks"]["conv2"]["kernel"].shape == (2, 3, 3, 8, 8)
    meta = checkpoint.metadata("resnet20", {"widths": [4, 8, 8]}, NORM)
    with checkpoint.manager(str(tmp_path / "old"), async_save=False) as mngr:
        mngr.save(3, args=ocp.args.Composite(model=ocp.args.StandardSave(stacked),
                                             metadata=ocp.args.JsonSave(meta)))
    loaded = checkpoint.load_model(str(tmp_path / "old"))
    assert "block2" in loaded.variables["params"]["stage3"]
    assert jax.tree.structure(loaded.variables) == jax.tree.structure(dict(variables))
    jax.tree.map(np.testing.assert_array_equal, loaded.variables, dict(variables))
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(loaded.model.apply(loaded.variables, x),
                                  model.apply(variables, x))


def _mislabelled(tmp_path):
    """resnet20 weights whose metadata says resnet32."""
    _, variables = _variables("resnet20")
    directory = str(tmp_path / "c")
    checkpoint.save_model(directory, variables, model_name="resnet32", model_options={},
                          normalization=NORM)
    return directory


def test_mismatch_names_the_stored_net_and_the_first_parameters(tmp_path):
    directory = _mislabelled(tmp_path)
    with pytest.raises(UserError) as e:
        checkpoint.load_model(directory)
    msg = str(e.value)
    assert "holds resnet20 weights but its metadata names resnet32" in msg
    assert "params/stage1/blocks/bn1/bias (2, 16) where the model has (4, 16)" in msg
    assert "\n" not in msg


@pytest.mark.slow
def test_mismatch_through_a_cli_leaves_no_traceback(tmp_path):
    directory = _mislabelled(tmp_path)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "resnet_jax.evaluate", "--checkpoint", directory,
                           "--data", "synthetic:8"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: checkpoint") and proc.stderr.count("\n") == 1, proc.stderr
    assert "holds resnet20 weights" in proc.stderr
    assert "Traceback" not in proc.stderr and "Event loop" not in proc.stderr


def test_missing_directory_step_and_used_out(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        checkpoint.load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no checkpoint in"):
        checkpoint.load_model(str(tmp_path / "empty"))
    directory = _mislabelled(tmp_path)
    with pytest.raises(UserError, match=r"no step 3 in .* it has steps \[0\]"):
        checkpoint.load_model(directory, step=3)
    with pytest.raises(UserError, match="is not empty"):
        checkpoint.save_model(directory, {"params": {}}, model_name="resnet20", model_options={},
                              normalization=NORM)
    (tmp_path / "file").write_text("x")  # was NotADirectoryError's traceback
    with pytest.raises(UserError, match=r"--out '.*file' is a file; name a new directory"):
        checkpoint.save_model(str(tmp_path / "file"), {"params": {}}, model_name="resnet20",
                              model_options={}, normalization=NORM)


def test_checksums_see_one_flipped_bit_in_any_dtype():
    import jax.numpy as jnp
    rng = np.random.default_rng(0)
    tree = {"f32": rng.normal(size=(3, 5)).astype(np.float32),
            "bf16": jnp.asarray(rng.normal(size=7), jnp.bfloat16),
            "i32": np.arange(6, dtype=np.int32), "u8": np.arange(9, dtype=np.uint8),
            "flag": np.array(True), "scalar": np.float32(0.25)}
    before = checkpoint.checksums(tree)
    assert before == checkpoint.checksums(jax.tree.map(np.array, tree))  # a function of the bits
    for name, leaf in tree.items():
        bits = np.array(leaf).copy()
        raw = bits.reshape(-1).view(np.uint8)
        raw[-1] ^= 1  # the lowest bit of the last byte (bool: True -> False)
        changed = checkpoint.checksums(dict(tree, **{name: bits}))
        assert [k for k in before if changed[k] != before[k]] == [f"['{name}']"], name


def _damage(step_dir: pathlib.Path, how: str):
    """Flip, truncate or delete the largest array file of a saved step, as disks and copies do."""
    files = [p for p in (step_dir / "model").rglob("*") if p.is_file() and "/d/" in str(p)]
    target = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    if how == "flip":  # in the middle of the data: zstd stores random floats raw, so it decodes
        for i in range(len(data) // 2, len(data) // 2 + 8):
            data[i] ^= 0x40
        target.write_bytes(bytes(data))
    elif how == "truncate":
        target.write_bytes(bytes(data[: len(data) // 2]))
    else:
        target.unlink()


@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
def test_a_damaged_step_is_one_line_naming_it_and_the_intact_ones(tmp_path, how):
    model, variables = _variables("resnet20", widths=(4, 8, 16))
    for step in (1, 2):
        checkpoint.save_model(str(tmp_path / f"s{step}"), variables, model_name="resnet20",
                              model_options={"widths": (4, 8, 16)}, normalization=NORM, step=step)
    directory = tmp_path / "s1"  # both steps in one directory
    (tmp_path / "s2" / "2").rename(directory / "2")
    _damage(directory / "2", how)
    with pytest.raises(checkpoint.DamagedCheckpoint) as e:
        checkpoint.load_model(str(directory))
    message = str(e.value)
    assert "\n" not in message and "step 2 is damaged" in message, message
    assert message.endswith("pass --step with one of [1]"), message
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]  # nothing removed
    assert checkpoint.load_model(str(directory), 1).step == 1


def test_damaged_metadata_is_one_line(tmp_path):
    model, variables = _variables("resnet20", widths=(4, 8, 16))
    checkpoint.save_model(str(tmp_path / "c"), variables, model_name="resnet20",
                          model_options={"widths": (4, 8, 16)}, normalization=NORM, step=3)
    (tmp_path / "c" / "3" / "metadata" / "metadata").write_text('{"model": "resn')
    with pytest.raises(checkpoint.DamagedCheckpoint, match="step 3 is damaged: its metadata cannot be read"):
        checkpoint.load_model(str(tmp_path / "c"))


@pytest.mark.parametrize("change", [
    ("0.5, 0.5", "0.5, 0.6"),  # one character of the stored normalisation
    ('"model_options"', '"model_options" '),  # harmless whitespace is not a change
    ('"cat", "dog"', '"dog", "cat"')])  # two classes swapped
def test_changed_metadata_is_damage_not_a_plausible_score(tmp_path, change):
    """The metadata decides the numbers as much as the arrays: it is covered by its digest."""
    model, variables = _variables("resnet20", widths=(4, 8, 16))
    classes = ["airplane", "automobile", "bird", "cat", "dog", "deer", "frog", "horse", "ship",
               "truck"]
    checkpoint.save_model(str(tmp_path / "c"), variables, model_name="resnet20",
                          model_options={"widths": (4, 8, 16)}, normalization=NORM, step=3,
                          extra=dict(classes=classes))
    path = tmp_path / "c" / "3" / "metadata" / "metadata"
    text = path.read_text()
    assert change[0] in text
    path.write_text(text.replace(change[0], change[1], 1))
    if change[0] == '"model_options"':
        assert checkpoint.load_model(str(tmp_path / "c")).step == 3
        return
    with pytest.raises(checkpoint.DamagedCheckpoint,
                       match="step 3 is damaged: its metadata .* changed since it was written"):
        checkpoint.load_model(str(tmp_path / "c"))


def test_nothing_non_finite_is_saved_and_a_saved_one_is_damage(tmp_path):
    model, variables = _variables("resnet20", widths=(4, 8, 16))
    variables["params"]["fc"]["bias"][3] = np.inf
    with pytest.raises(checkpoint.NonFiniteState,
                       match=r"step 2 is not saved: 1 arrays of the 'model' item hold NaN or Inf "
                             r"\(first model\['params'\]\['fc'\]\['bias'\]\); the run diverged "
                             "and no checkpoint was saved"):
        checkpoint.save_model(str(tmp_path / "c"), variables, model_name="resnet20",
                              model_options={"widths": (4, 8, 16)}, normalization=NORM, step=2)
    # a step written with checksums by an older version that did not check: damaged, not resumed
    meta = checkpoint.metadata("resnet20", {"widths": [4, 8, 16]}, NORM)
    stored = layout.to_checkpoint(variables)
    meta = dict(meta, checksums={"model": checkpoint.checksums(stored)})
    with checkpoint.manager(str(tmp_path / "old"), async_save=False) as mngr:
        mngr.save(2, args=ocp.args.Composite(model=ocp.args.StandardSave(stored),
                                             metadata=ocp.args.JsonSave(meta)))
    with pytest.raises(checkpoint.DamagedCheckpoint, match="step 2 holds non-finite numbers"):
        checkpoint.load_model(str(tmp_path / "old"))


def test_keep_checkpoints_prunes_the_steps_of_an_earlier_run(tmp_path):
    """After a resume, the steps saved before it were kept for ever (a run killed ten times
    kept 11 steps with keep_checkpoints=3): orbax read them back without their metrics."""
    def run(steps, metric):
        with checkpoint.manager(str(tmp_path), max_to_keep=2, best_metric="val_top1",
                                keep_best=1, async_save=False) as mngr:
            for step in steps:
                mngr.save(step, metrics={"val_top1": metric[step]}, args=ocp.args.Composite(
                    model=ocp.args.StandardSave({"w": np.ones(3)}),
                    metadata=ocp.args.JsonSave({"model": "resnet20"})))
            return mngr.all_steps()

    assert run([1, 2], {1: 0.9, 2: 0.2}) == [1, 2]
    # 1 is the best, 5 and 6 the latest; 2 and 3 go though saved before this run
    assert run([3, 4, 5, 6], {3: 0.3, 4: 0.1, 5: -1.0, 6: 0.2}) == [1, 5, 6]


def test_a_step_pruned_by_a_live_trainer_while_read_is_not_damage(tmp_path, monkeypatch):
    """evaluate on a workdir still training said "step 40 is damaged ... Directory does not
    exist" when the trainer pruned step 40 meanwhile; it reads the newest step instead."""
    model, variables = _variables("resnet20", widths=(4, 8, 16))
    for step in (2, 3):
        checkpoint.save_model(str(tmp_path / f"s{step}"), variables, model_name="resnet20",
                              model_options={"widths": (4, 8, 16)}, normalization=NORM, step=step)
    directory = tmp_path / "s2"
    read = checkpoint.read_metadata

    def trainer_moves_on(*args, **kwargs):  # saves step 3 and prunes step 2 meanwhile
        if (directory / "2").exists():
            (tmp_path / "s3" / "3").rename(directory / "3")
            import shutil
            shutil.rmtree(directory / "2")
        return read(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "read_metadata", trainer_moves_on)
    assert checkpoint.load_model(str(directory)).step == 3
    with pytest.raises(UserError, match="no step 2"):  # an explicit step is not replaced
        checkpoint.load_model(str(directory), 2)


def test_a_file_is_not_called_missing(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="checkpoint '.*f' is a file; pass the directory"):
        checkpoint.load_model(str(tmp_path / "f"))


def test_quiet_orbax_drops_only_a_failed_restores_leftovers(monkeypatch):
    """After a damaged read, orbax's other read coroutines are dropped with errors pending and a
    late read may call into its closed event loop; Python reports those as unraisable exceptions,
    which the CLIs must not print after their one-line report. Any other unraisable exception
    still reaches the previous hook."""
    import sys
    import types
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    checkpoint.quiet_orbax()

    def raised_in(filename):
        code = compile("raise Exception('read failed')", filename, "exec")
        try:
            exec(code, {})
        except Exception as e:  # noqa: BLE001 - the exception is the test's object
            return types.SimpleNamespace(exc_value=e, exc_traceback=e.__traceback__)

    closed = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"),
                                   exc_traceback=None)
    orbax_read = raised_in("/venv/site-packages/orbax/checkpoint/serialization.py")
    other = raised_in("/work/user_code.py")
    for unraisable in (closed, orbax_read, other):
        sys.unraisablehook(unraisable)
    checkpoint.quiet_orbax()  # once only: not wrapped twice
    sys.unraisablehook(other)
    assert seen == [other, other]
