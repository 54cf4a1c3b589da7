"""Training: schedule and optimizer arithmetic, 8 devices = 1 device, runs killed and resumed,
SIGTERM, a checkpoint moving between device counts, and each bad input with its message.

Runs go through the CLI in subprocesses (a fresh process is what a kill or a preemption leaves,
and XLA_FLAGS must be set before JAX starts); they share one compilation cache and one tiny
config (configs/cpu.py:tiny, overrides that leave the compiled step unchanged), so each distinct
step compiles once per session.
"""
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import refuse_write_probes, tiny_config
from resnet_jax import checkpoint, parallel, schedule, train
from resnet_jax import state as state_lib
from resnet_jax import config as config_lib
from resnet_jax import workdir as workdir_lib
from resnet_jax.data import splits
from resnet_jax.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = f"{REPO}/configs/cpu.py:tiny"
# 12 steps, a checkpoint every 4, a log line every step: room for kills at different moments.
RUN = ["--config.num_steps=12", "--config.checkpoint_every=4", "--config.log_every=1"]
TIMEOUT = 600


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax-compile")),
             RESNET_JAX_CACHE=str(tmp_path_factory.mktemp("cache")))
    e.pop("XLA_FLAGS", None)
    return e


def _with_devices(env, devices):
    """None: the CLI's own default (`kernels.cpu.use_cpu_cores`, several CPU devices here)."""
    if devices is None:
        return env
    return dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def start(workdir, *flags, env, devices=None):
    return subprocess.Popen(
        [sys.executable, "-m", "resnet_jax.train", "--config", TINY, "--workdir", str(workdir), *flags],
        cwd=REPO, env=_with_devices(env, devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)


def wait_for(proc, pattern):
    """Read the run's output until a line matches `pattern`; the lines read so far."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.search(pattern, line):
            return lines
    proc.wait()
    pytest.fail(f"run ended (rc {proc.returncode}) before {pattern!r}:\n{''.join(lines[-30:])}")


def finish(proc):
    out, _ = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, out


def train_cli(workdir, *flags, env, devices=None):
    rc, out = finish(start(workdir, *flags, env=env, devices=devices))
    assert rc == 0, out[-3000:]
    return json.loads(out.strip().splitlines()[-1]), out


def params_of(workdir):
    return jax.device_get(checkpoint.load_model(str(workdir)).variables)


def random_variables(model, seed=0):
    """Variables of `model` without compiling its init (slow on XLA:CPU)."""
    rng = np.random.default_rng(seed)
    draw = lambda path, s: (np.ones(s.shape) if path[-1].key == "var"
                            else 0.3 * rng.standard_normal(s.shape)).astype(s.dtype)
    return jax.tree_util.tree_map_with_path(draw, checkpoint.abstract_variables(model))


def assert_trees_close(a, b, rtol):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-7, err_msg=jax.tree_util.keystr(path))


# ---------------------------------------------------------------------------------------------
# Arithmetic


def test_learning_rate_schedule_and_warmup():
    c = config_lib.load_config(f"{REPO}/configs/cifar10.py:resnet110")
    assert c.warmup_lr == 0.01 and config_lib.load_config(f"{REPO}/configs/cifar10.py:resnet56").warmup_lr == 0
    lr = lambda step, done, scale=1.0: float(schedule.learning_rate(c, jnp.int32(step), _schedule(
        lr_scale=jnp.float32(scale), warmup_done=jnp.asarray(done))))
    assert lr(0, False) == pytest.approx(0.01) and lr(40_000, False) == pytest.approx(0.01)
    assert lr(0, True) == pytest.approx(0.1) and lr(31_999, True) == pytest.approx(0.1)
    assert lr(32_000, True) == pytest.approx(0.01) and lr(48_000, True) == pytest.approx(0.001)
    assert lr(100, True, 0.1) == pytest.approx(0.01)  # a plateau division


def _schedule(**fields):
    base = dict(lr_scale=jnp.float32(1), warmup_done=jnp.asarray(False), warmup_end=jnp.int32(-1),
                warmup_error=jnp.float32(1), best_error=jnp.float32(1), stale_evals=jnp.int32(0))
    return schedule.ScheduleState(**{**base, **fields})


def test_warmup_ends_once_the_running_training_error_is_below_80_percent():
    """Not at one lucky batch (at ResNet-110's start one batch of 128 fell below 80 % error at
    step 15, and lr 0.1 then raised its loss), but once the batches' running error is below."""
    c = config_lib.load_config(f"{REPO}/configs/cifar10.py:resnet110")
    state = _schedule()
    errors = [0.9] * 20 + [0.5] + [0.9] * 5 + [0.7] * 40 + [0.95]
    for step, error in enumerate(errors):
        state = schedule.warmup(c, state, jnp.int32(step), error)
        if step <= 25:
            assert not bool(state.warmup_done), step
    assert bool(state.warmup_done)  # and it stays done after a bad batch
    running = [1.0]
    for error in errors:
        running.append(c.warmup_smoothing * running[-1] + (1 - c.warmup_smoothing) * error)
    first = next(i for i, r in enumerate(running) if r < 0.8)  # counted from 1, as the log
    assert int(state.warmup_end) == first and first > 26


def test_plateau_divides_the_lr_after_patience_evaluations_without_gain():
    c = config_lib.load_config(f"{REPO}/configs/imagenet.py:resnet50")
    assert c.lr_plateau_patience == 3
    mesh = parallel.make_mesh(jax.devices()[:1])
    state, scales = _schedule(), []
    for error in [0.6, 0.5, 0.4995, 0.5, 0.45, 0.46, 0.47, 0.46, 0.46, 0.46, 0.46]:
        state = schedule.plateau(c, state, error, mesh)
        scales.append(float(state.lr_scale))
    # gains at 0.5 and 0.45; 0.4995 is under min_delta; three stale evaluations divide by 10
    np.testing.assert_allclose(scales, [1, 1, 1, 1, 1, 1, 1, 0.1, 0.1, 0.1, 0.01], rtol=1e-6)
    assert schedule.plateau(config_lib.load_config(TINY), state, 0.9, mesh) is state  # off in CIFAR


def test_sgd_matches_pytorch_and_decay_mask():
    c = config_lib.load_config(TINY)
    params = {"conv": {"kernel": jnp.array([1.0, -2.0])}, "bn": {"scale": jnp.array([3.0])}}
    grads = {"conv": {"kernel": jnp.array([0.5, 0.5])}, "bn": {"scale": jnp.array([1.0])}}
    for on, decayed in (("all", {"kernel", "scale"}), ("kernels", {"kernel"})):
        c.weight_decay_on = on
        tx = state_lib.optimizer(c)
        state = tx.init(params)
        u1, state = tx.update(grads, state, params)
        u2, state = tx.update(grads, state, params)
        for (path, p), g, got in zip(jax.tree_util.tree_leaves_with_path(params),
                                     jax.tree.leaves(grads), jax.tree.leaves(u2)):
            d = g + (c.weight_decay * p if path[-1].key in decayed else 0)  # torch: d_p += wd * p
            expected = d + c.momentum * d  # buf = momentum * buf + d_p, twice from zero
            np.testing.assert_allclose(got, expected, rtol=1e-6)
    c.weight_decay_on = "biases"
    with pytest.raises(UserError, match="weight_decay_on must be"):
        config_lib.check(c, num_devices=1)


def test_grouped_batch_norm_is_bn_per_group():
    c = config_lib.load_config(TINY)
    model, _ = state_lib.create_model(c, 10)
    x = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
    variables = random_variables(model)
    c.bn_group_size = 4
    forward = jax.jit(lambda v, x: train._forward(model, c, v, x, jax.random.key(2)))
    grouped, stats = forward(variables, x)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    parts = [apply(variables, x[i:i + 4]) for i in (0, 4)]
    np.testing.assert_allclose(grouped, jnp.concatenate([p[0] for p in parts]), rtol=1e-4, atol=1e-5)
    mean_stats = jax.tree.map(lambda a, b: (a + b) / 2, parts[0][1]["batch_stats"], parts[1][1]["batch_stats"])
    assert_trees_close(stats, mean_stats, 1e-4)
    whole, _ = apply(variables, x)
    assert not np.allclose(whole, grouped, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Checkpoints of the train state


def _random_state(target: state_lib.TrainState) -> state_lib.TrainState:
    """A state shaped and placed as `target`, every array drawn (the momentum too), but the
    running training error, which checkpoints do not hold."""
    rng = np.random.default_rng(0)
    draw = lambda s: jax.device_put(rng.standard_normal(s.shape).astype(s.dtype), s.sharding)
    drawn = jax.tree.map(draw, target)
    return drawn.replace(schedule=drawn.schedule.replace(warmup_error=jnp.float32(1.0)))


def _stored_keys(directory, step, item):
    handlers = {item: ocp.StandardCheckpointHandler(), "metadata": ocp.JsonCheckpointHandler()}
    with checkpoint.manager(directory, read_only=True, item_handlers=handlers) as mngr:
        tree = mngr.item_metadata(step)[item]
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def save(mngr, state, meta, metrics):
    """The trainer's save of `state` (Workdir.save) into the folder `mngr` manages."""
    return workdir_lib.Workdir(str(mngr.directory), mngr, None, {}, meta=meta).save(state, metrics)


def test_train_state_round_trips_through_the_stacked_checkpoint_layout(tmp_path):
    """The model holds block1, block2, ...; the checkpoint (weights, BN statistics and the
    momentum inside optax's state) stores them stacked in `blocks`, as checkpoints always have,
    and restores to the state that was saved, placed on the target's mesh."""
    c = tiny_config()
    model, options = state_lib.create_model(c, 10)
    target = state_lib.abstract_state(c, model, parallel.make_mesh(jax.devices()[:1]), 32)
    assert "block1" in target.params["stage2"] and "blocks" not in target.params["stage2"]
    state = _random_state(target)
    norm = checkpoint.Normalization(np.zeros(3, np.float32))
    meta = checkpoint.metadata(c.model, options, norm, extra=dict(image_size=32))
    step = int(state.step)
    with checkpoint.manager(str(tmp_path), async_save=False) as mngr:
        save(mngr, state, meta, {train.BEST_METRIC: 0.1})
    shapes = checkpoint.stored_shapes(str(tmp_path), step)
    assert shapes["params/stage2/blocks/conv1/kernel"] == (2, 3, 3, 8, 8)
    assert not any("block1" in k for k in shapes)
    stored = _stored_keys(str(tmp_path), step, "train")
    # the schedule's state flat beside step and opt_state, as checkpoints always stored it (so
    # workdirs written before schedule.py resume); the running training error is not stored
    assert {f"['{k}']" for k in ("step", *schedule.STORED)} <= set(stored)
    assert not any("warmup_error" in k or "schedule" in k for k in stored)
    momentum = [k for k in stored if "opt_state" in k]
    assert any("'blocks'" in k for k in momentum) and not any("block1" in k for k in momentum)
    with checkpoint.manager(str(tmp_path), read_only=True) as mngr:
        restored = workdir_lib.restore(mngr, step, target)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim)


def test_a_non_finite_state_is_never_saved(tmp_path):
    """lr=inf then SIGTERM within the first step saved 41 of 67 arrays non-finite, which the
    rerun then called "the last good checkpoint". Every save goes through `train.save`."""
    c = tiny_config()
    model, options = state_lib.create_model(c, 10)
    target = state_lib.abstract_state(c, model, parallel.make_mesh(jax.devices()[:1]), 32)
    state = _random_state(target)
    state = state.replace(params=jax.tree.map(lambda x: x * jnp.inf, state.params))
    meta = checkpoint.metadata(c.model, options, checkpoint.Normalization(np.zeros(3, np.float32)))
    with checkpoint.manager(str(tmp_path), async_save=False) as mngr:
        with pytest.raises(checkpoint.NonFiniteState, match=r"step \d+ is not saved: \d+ arrays "
                           "of the 'model' item hold NaN or Inf .* no checkpoint was saved"):
            save(mngr, state, meta, {train.BEST_METRIC: -1.0})
        assert mngr.all_steps() == []


def test_train_step_neither_slices_parameters_nor_concatenates_gradients():
    """Each identical block is its own module: the lowered step holds no per-block slice of a
    stacked parameter and no concatenate of gradients or BN statistics (stacked, this ResNet-20
    lowered to 388 slices and 180 concatenates). The few slices left are option A's
    subsampling shortcuts."""
    c = tiny_config()
    model, _ = state_lib.create_model(c, 10)
    mesh = parallel.make_mesh(jax.devices()[:1])
    step = train.make_train_step(c, model, mesh, checkpoint.Normalization(np.zeros(3, np.float32)))
    text = step.lower(state_lib.abstract_state(c, model, mesh, 32),
                      jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.uint8),
                      jax.ShapeDtypeStruct((8,), jnp.int32)).as_text()
    assert len(re.findall(r"stablehlo\.concatenate\b", text)) == 0
    assert len(re.findall(r"stablehlo\.(dynamic_)?slice\b", text)) <= 8


# ---------------------------------------------------------------------------------------------
# Devices


EIGHT_VS_ONE = textwrap.dedent(f"""
    import json, sys, jax, numpy as np
    sys.path.insert(0, "tests")
    from conftest import differences_by_kind
    from resnet_jax import checkpoint, parallel, train
    from resnet_jax import config as config_lib
    from resnet_jax import state as state_lib
    from resnet_jax import workdir as workdir_lib
    from resnet_jax.data import pipeline, sources
    assert jax.device_count() == 8
    c = config_lib.load_config({TINY!r})
    ds = sources.load(c.data.source, "train")
    norm = checkpoint.Normalization(sources.mean_image(ds.images))
    out = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = parallel.make_mesh(devices)
        model, options = state_lib.create_model(c, ds.num_classes)
        state = state_lib.init_state(c, model, mesh, 32)
        start = jax.device_get(state.variables)
        source = pipeline.DeviceInput(ds, c.batch_size, mesh, seed=c.seed)
        step = train.make_train_step(c, model, mesh, norm)
        losses = []
        for s in range(3):
            images, labels = source.batch(s)
            assert len(images.sharding.device_set) == len(devices)
            state, m = step(state, images, labels)
            losses.append(m["loss"])
        out.append(jax.device_get((losses, start, state.variables, source.batch(3))))
    (l1, start1, v1, b1), (l8, start8, v8, b8) = out
    np.testing.assert_array_equal(b1[0], b8[0])  # the same augmented batch on any mesh
    for a, b in zip(jax.tree.leaves(start1), jax.tree.leaves(start8)):
        np.testing.assert_array_equal(a, b)  # the same initial state on any mesh
    # The first loss comes before any update: BN statistics of some devices' rows only would
    # show here. The later ones follow updates that a ReLU tie may have changed (one element
    # rounding moved across zero: 2 % of the kernels' movement in this net, where a gradient
    # not reduced over the devices is of the order of the movement itself).
    np.testing.assert_allclose(l1[0], l8[0], rtol=1e-5)
    np.testing.assert_allclose(l1, l8, rtol=1e-3)
    diffs = differences_by_kind(v8, v1, start1)
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < 0.1, (worst, diffs[worst])
    # the 8-device state as the training loop saves it, for a 1-device process to resume
    meta = checkpoint.metadata(c.model, options, norm, extra=dict(image_size=32))
    with checkpoint.manager(sys.argv[1], async_save=False) as mngr:
        workdir_lib.Workdir(sys.argv[1], mngr, None, {{}}, meta=meta).save(state, {{train.BEST_METRIC: 0.1}})
    print("losses", l1, l8, "worst", worst, diffs[worst])
""")


@pytest.mark.slow
def test_three_steps_on_eight_devices_equal_one_device_and_resume_on_one(env, tmp_path):
    proc = subprocess.run([sys.executable, "-c", EIGHT_VS_ONE, str(tmp_path)], cwd=REPO,
                          env=_with_devices(env, 8), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "losses" in proc.stdout
    loaded = checkpoint.load_model(str(tmp_path))  # onto this process's first device
    assert loaded.step == 3 and loaded.metadata["model"] == "resnet20"
    assert len(jax.tree.leaves(loaded.variables)[0].sharding.device_set) == 1
    result, out = train_cli(tmp_path, *RUN, env=env, devices=1)  # resumes the 8-device run
    assert "on 1 devices" in out and "resumed from" in out and "step 3" in out
    assert result["step"] == 12


# ---------------------------------------------------------------------------------------------
# Kills, preemption, divergence


@pytest.fixture(scope="module")
def uninterrupted(env, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result, _ = train_cli(workdir, *RUN, "--config.keep_checkpoints=1", env=env)
    assert result["step"] == 12
    # of the checkpoints at 4, 8 and 12: the latest and the best by validation top-1
    records = [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val_top1"] for r in records if "val_top1" in r}
    with checkpoint.manager(str(workdir), read_only=True) as mngr:
        kept = mngr.all_steps()
    assert sorted(val) == [4, 8, 12] and 12 in kept and len(kept) <= 2
    assert max(val[s] for s in kept) == max(val.values())
    return workdir


@pytest.mark.slow
def test_sigkill_at_three_moments_then_resume_gives_the_uninterrupted_params(env, tmp_path, uninterrupted):
    moments = [r"step 2/12 ", r"step 4  val", r"step 10/12 "]  # before any checkpoint, while the
    resumed = []                                               # first saves, between two
    for moment in moments:
        proc = start(tmp_path, *RUN, env=env)
        lines = wait_for(proc, moment)
        if moment == moments[-1]:  # saves finish in the background: wait for step 8's to land
            while not (tmp_path / "8").is_dir() and proc.poll() is None:
                time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        resumed += [ln for ln in lines if "resumed from" in ln]
    result, out = train_cli(tmp_path, *RUN, env=env)
    assert result["step"] == 12
    resumed += [ln for ln in out.splitlines() if "resumed from" in ln]
    assert any("step 8" in ln for ln in resumed), resumed
    assert_trees_close(params_of(tmp_path), params_of(uninterrupted), rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_sigterm_and_ctrl_c_leave_a_complete_checkpoint(env, tmp_path, sig):
    """A preemption notice (SIGTERM) and Ctrl-C (SIGINT) both save the step reached and exit 0."""
    proc = start(tmp_path, *RUN[:1], "--config.checkpoint_every=2", "--config.log_every=1", env=env)
    wait_for(proc, r"step 3/12 ")
    proc.send_signal(sig)
    rc, out = finish(proc)
    assert rc == 0 and "Traceback" not in out, out[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["preempted"] and 3 <= result["step"] < 12
    # its validation numbers are those of an earlier step, and say so
    assert result["val_step"] == result["step"] - result["step"] % 2
    assert f"{signal.Signals(sig).name}: saved step {result['step']}" in out
    c = config_lib.load_config(TINY)
    model, _ = state_lib.create_model(c, 10)
    target = state_lib.abstract_state(c, model, parallel.make_mesh(jax.devices()[:1]), 32)
    with checkpoint.manager(str(tmp_path), read_only=True) as mngr:
        assert result["step"] in mngr.all_steps()
        state = workdir_lib.restore(mngr, result["step"], target)
    assert int(state.step) == result["step"]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


@pytest.mark.slow
def test_a_second_trainer_on_a_live_workdir_is_refused_naming_the_first(env, tmp_path):
    """A job launched twice: both exited 0, their metrics rows interleaved."""
    first = start(tmp_path, "--config.num_steps=100000", "--config.checkpoint_every=100000",
                  "--config.log_every=1", env=env)
    try:
        wait_for(first, r"step 1/")
        rc, out = finish(start(tmp_path, *RUN, env=env))
        assert rc == 2, out[-3000:]
        [line] = [ln for ln in out.splitlines() if ln.startswith("error:")]
        assert f"is in use by the trainer pid {first.pid} on host" in line, line
        assert "resnet20 on" not in out  # refused before any data loaded
    finally:
        first.send_signal(signal.SIGTERM)
        rc, out = finish(first)
    assert rc == 0 and "SIGTERM: saved step" in out, out[-3000:]
    assert not (tmp_path / workdir_lib.Lock.NAME).exists()


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(env, tmp_path, uninterrupted):
    # A good checkpoint at step 12 whose learning-rate factor makes the next steps blow up.
    c = config_lib.load_config(TINY)
    model, _ = state_lib.create_model(c, 10)
    target = state_lib.abstract_state(c, model, parallel.make_mesh(jax.devices()[:1]), 32)
    with checkpoint.manager(str(uninterrupted), read_only=True) as mngr:
        state = workdir_lib.restore(mngr, 12, target)
        meta = mngr.restore(12, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]
    with checkpoint.manager(str(tmp_path), async_save=False) as mngr:
        save(mngr, state.replace(schedule=state.schedule.replace(lr_scale=jnp.float32(1e30))), meta, {train.BEST_METRIC: 0.1})
    rc, out = finish(start(tmp_path, *RUN, "--config.num_steps=16", env=env))
    assert rc == 2, out[-3000:]
    error = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(error) == 1 and re.search(r"loss became (nan|inf) at step 1[3-5]", error[0]), out[-2000:]
    assert "last good checkpoint (step 12) is kept" in error[0]
    with checkpoint.manager(str(tmp_path), read_only=True) as mngr:
        assert mngr.all_steps() == [12]


# ---------------------------------------------------------------------------------------------
# Bad input


def test_missing_config_file():
    with pytest.raises(UserError, match="config file 'configs/nope.py' not found"):
        config_lib.load_config("configs/nope.py:resnet20")


@pytest.mark.slow
def test_unknown_config_key_is_one_line(env, tmp_path):
    rc, out = finish(start(tmp_path, "--config.data.sorce=cifar10", env=env))
    assert rc == 2
    [line] = out.strip().splitlines()
    assert line.startswith("error: unknown config key 'data.sorce' ('sorce' is not in data; it has:")
    assert "source" in line and not os.listdir(tmp_path)


def _folder(root, files):
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def _jpeg():
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("change, message", [
    (dict(model="resnet21"), "unknown model 'resnet21'"),
    ({"model_options.shortcut": "D"}, "shortcut must be 'A', 'B' or 'C'"),
    ({"data.source": "folder:/nonexistent/cifar"}, "data folder '/nonexistent/cifar' does not exist"),
    ({"data.source": "EMPTY"}, "no images in"),
    ({"data.source": "BROKEN"}, "cannot decode .*bad.jpg"),
    (dict(batch_size=30), "batch_size 30 does not split over"),
])
def test_bad_input_names_the_problem(tmp_path, change, message, monkeypatch):
    monkeypatch.setenv("RESNET_JAX_CACHE", str(tmp_path / "cache"))
    source = change.get("data.source")
    if source == "EMPTY":
        change["data.source"] = f"folder:{_folder(tmp_path / 'empty', {'train/cat/x.txt': b'', 'test/cat/y.txt': b''})}"
    if source == "BROKEN":
        change["data.source"] = f"folder:{_folder(tmp_path / 'broken', {'train/cat/ok.jpg': _jpeg(), 'train/dog/bad.jpg': b'not a jpeg', 'test/cat/ok.jpg': _jpeg()})}"
    mesh = parallel.make_mesh(jax.devices()[:1]) if "batch_size" not in change else _FakeMesh(4)
    with pytest.raises((UserError, ValueError), match=message) as e:
        train.train_and_evaluate(tiny_config(**change), str(tmp_path / "work"), mesh=mesh)
    assert len(str(e.value).splitlines()) == 1


class _FakeMesh:
    """Only the device count matters for the batch check, which runs first."""
    def __init__(self, n):
        self.devices = np.empty(n, object)


@pytest.mark.slow
def test_workdir_of_another_model_is_refused_and_left_alone(tmp_path):
    other = config_lib.load_config(TINY)
    other.model = "resnet32"
    model, options = state_lib.create_model(other, 10)
    variables = random_variables(model)
    checkpoint.save_model(str(tmp_path), variables, model_name="resnet32", model_options=options,
                          normalization=checkpoint.Normalization(np.zeros(3)), step=7)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(UserError, match=r"holds a checkpoint of resnet32 .*step 7.*not of resnet20"):
        train.train_and_evaluate(config_lib.load_config(TINY), str(tmp_path),
                                 mesh=parallel.make_mesh(jax.devices()[:1]))
    assert sorted(p.name for p in tmp_path.rglob("*") if "tensorboard" not in str(p)
                  and p.name != "metrics.jsonl") == before


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints, changed configs, Ctrl-C, non-finite validation, unwritable workdirs


@pytest.fixture(scope="module")
def every_four(env, tmp_path_factory):
    """A run that saved steps 4, 8 and 12, to copy and damage."""
    workdir = tmp_path_factory.mktemp("every_four")
    train_cli(workdir, *RUN, env=env)
    with checkpoint.manager(str(workdir), read_only=True) as mngr:
        assert mngr.all_steps() == [4, 8, 12]
    return workdir


def _copy(workdir, tmp_path):
    import shutil
    shutil.copytree(workdir, tmp_path / "w")
    return tmp_path / "w"


def _damage(step_dir, how):
    """Flip 8 bytes in the middle of, or truncate, the largest array file of a saved step."""
    files = [p for p in step_dir.rglob("*") if p.is_file() and "/d/" in str(p)]
    target = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    if how == "flip":
        for i in range(len(data) // 2, len(data) // 2 + 8):
            data[i] ^= 0x40
        target.write_bytes(bytes(data))
    else:
        target.write_bytes(bytes(data[: len(data) // 2]))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_a_damaged_latest_step_falls_back_to_the_newest_intact_one(env, tmp_path, every_four, how):
    workdir = _copy(every_four, tmp_path)
    _damage(workdir / "12", how)
    result, out = train_cli(workdir, *RUN, "--config.num_steps=16", env=env)
    assert result["step"] == 16 and "Traceback" not in out
    assert re.search(r"step 12 is damaged: .*; left in place, trying the step before it", out), out[-3000:]
    assert "resumed from" in out and re.search(r"step 8 \(the damaged steps \[12\] are left in place\)", out)
    assert "lower --config.lr" not in out
    with checkpoint.manager(str(workdir), read_only=True) as mngr:
        assert {8, 12, 16} <= set(mngr.all_steps())  # nothing intact removed; 12 left as it was
    assert checkpoint.load_model(str(workdir), 16).step == 16


@pytest.mark.slow
def test_resuming_with_another_config_is_refused_naming_each_change(env, tmp_path, every_four):
    workdir = _copy(every_four, tmp_path)
    before = sorted(str(p) for p in workdir.rglob("*"))
    rc, out = finish(start(workdir, *RUN, "--config.lr=0.05", "--config.data.source=synthetic:256",
                           env=env))
    assert rc == 2, out[-3000:]
    [line] = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert "was trained with another config: data.source 'synthetic:512' -> 'synthetic:256'; " \
           "lr 0.1 -> 0.05;" in line and "--allow_config_change" in line
    assert "resnet20 on" not in out  # refused before any data loaded
    assert sorted(str(p) for p in workdir.rglob("*")) == before
    # the explicit flag lets it through (checked here without training again)
    changed = tiny_config(lr=0.05)
    with checkpoint.manager(str(workdir), read_only=True) as mngr:
        with pytest.raises(UserError, match="lr 0.1 -> 0.05"):
            workdir_lib.read(mngr, str(workdir)).check_config(changed)
        workdir_lib.read(mngr, str(workdir), allow_change=True).check_config(changed)
        workdir_lib.read(mngr, str(workdir)).check_config(
            tiny_config(num_steps=100, log_every=7))  # free to change


@pytest.mark.slow
def test_non_finite_validation_stops_naming_the_step(env, tmp_path, every_four):
    """Negative BN running variances: training (batch statistics) goes on, evaluation gives NaN;
    it once scored such a model as 100 % correct and saved it."""
    c = config_lib.load_config(TINY)
    model, _ = state_lib.create_model(c, 10)
    target = state_lib.abstract_state(c, model, parallel.make_mesh(jax.devices()[:1]), 32)
    with checkpoint.manager(str(every_four), read_only=True) as mngr:
        state = workdir_lib.restore(mngr, 12, target)
        meta = checkpoint.read_metadata(str(every_four), 12, mngr=mngr)
    stats = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.full_like(x, -100.0) if p[-1].key == "var" else x, state.batch_stats)
    with checkpoint.manager(str(tmp_path), async_save=False) as mngr:
        save(mngr, state.replace(batch_stats=stats), meta, {train.BEST_METRIC: 0.1})
    rc, out = finish(start(tmp_path, *RUN, "--config.num_steps=16", env=env))
    assert rc == 2, out[-3000:]
    [line] = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert re.match(r"error: validation at step 16: \d+ of \d+ images got non-finite logits or loss", line)
    assert "the last good checkpoint (step 12) is kept" in line
    with checkpoint.manager(str(tmp_path), read_only=True) as mngr:
        assert mngr.all_steps() == [12]


@pytest.mark.slow
def test_config_problems_come_before_any_data(tmp_path, monkeypatch):
    monkeypatch.setattr(splits, "make_data", lambda *a: pytest.fail("data loaded"))
    with pytest.raises(UserError) as e:
        train.train_and_evaluate(tiny_config(checkpoint_every=0, log_every=0), str(tmp_path / "w"),
                                 mesh=parallel.make_mesh(jax.devices()[:1]))
    assert str(e.value).splitlines() == ["log_every must be an integer >= 1, not 0",
                                         "checkpoint_every must be an integer >= 1, not 0"]
    assert not (tmp_path / "w").exists()


def _cli_flags(monkeypatch, **flags):
    """train_cli's flags as its main reads them, without defining them in this process."""
    from types import SimpleNamespace
    from resnet_jax import train_cli
    values = dict(describe=False, config=tiny_config(), workdir=None, coordinator_address=None,
                  num_processes=None, process_id=None, allow_config_change=False)
    monkeypatch.setattr(train_cli, "FLAGS", SimpleNamespace(**{**values, **flags}))
    return train_cli


def test_a_missing_workdir_is_named_before_anything_starts(monkeypatch, capsys):
    """It came after jax.distributed had waited for the other processes."""
    train_cli = _cli_flags(monkeypatch, coordinator_address="10.0.0.1:1234", num_processes=2,
                           process_id=0)
    monkeypatch.setattr(train_cli.cpu, "use_cpu_cores", lambda *a: pytest.fail("started"))
    monkeypatch.setattr(parallel, "initialize_distributed", lambda *a: pytest.fail("started"))
    with pytest.raises(SystemExit) as e:
        train_cli.main(["train"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: --workdir is required (checkpoints and metrics go "
                                       "there)\n")


def test_the_trainer_keeps_an_explicit_verbosity(monkeypatch, tmp_path):
    """WARNING by default (orbax logs every save at INFO), but --verbosity=0 shows INFO."""
    import logging
    from absl import flags, logging as absl_logging
    train_cli = _cli_flags(monkeypatch, workdir=str(tmp_path))
    monkeypatch.setattr(train_cli.cpu, "use_cpu_cores", lambda *a: 1)
    monkeypatch.setattr(parallel, "initialize_distributed", lambda *a: None)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(train_cli, "log", logging.getLogger("test_train_cli"))
    seen = []
    monkeypatch.setattr(train_cli, "train_and_evaluate",
                        lambda *a, **k: seen.append(absl_logging.get_verbosity()) or {})
    previous = absl_logging.get_verbosity()
    try:
        for given, level in ((0, absl_logging.WARNING), (1, absl_logging.INFO)):
            monkeypatch.setattr(flags.FLAGS["verbosity"], "present", given)
            absl_logging.set_verbosity(absl_logging.INFO)
            train_cli.main(["train"])
            assert seen[-1] == level
    finally:
        absl_logging.set_verbosity(previous)


def test_unwritable_workdirs_are_one_line_before_training(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"--workdir '.*file' is a file; name a directory"):
        workdir_lib.prepare(str(tmp_path / "file"))
    with monkeypatch.context() as m:
        refuse_write_probes(m)
        with pytest.raises(UserError, match=r"cannot write in --workdir '.*ro' \(Read-only file system\)"):
            workdir_lib.prepare(str(tmp_path / "ro"))
    model, _ = state_lib.create_model(config_lib.load_config(TINY), 10)
    variables = checkpoint.abstract_variables(model)
    workdir_lib.check_free_space(str(tmp_path), variables)
    monkeypatch.setattr(workdir_lib.shutil, "disk_usage",
                        lambda p: type("U", (), {"free": 2**19})())
    with pytest.raises(UserError, match=r"has 0 MiB free; checkpoints need about 3 MiB"):
        workdir_lib.check_free_space(str(tmp_path), variables)


def test_a_failed_save_is_one_line_that_exits_at_once():
    class Full:
        directory = "/runs/r20"

        def save(self, *a, **k):
            raise OSError(28, "No space left on device")

    with pytest.raises(workdir_lib.WriteFailed) as e:
        with workdir_lib.writing(Full(), 40):
            Full().save()
    assert str(e.value).startswith("could not write the checkpoint of step 40 in '/runs/r20' "
                                   "(OSError: [Errno 28] No space left on device); the steps "
                                   "saved before it are kept")
    assert e.value.exit_at_once
