"""resnet_jax.compile: the trainer's programs compiled for TPU slices on this CPU host (libtpu).

The programs are the ones a TPU host would build (the kernels follow the target devices, not the
host's backend), they fit the chips, hold no CPU custom calls, and all-reduce the gradients once
per step. libtpu is in the `test` extra: CI (RESNET_JAX_REQUIRE_NATIVE=1) fails without it, a
user's clone skips.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, require_native
from resnet_jax import compile as tpu_compile
from resnet_jax import config as config_lib
from resnet_jax import state as state_lib
from resnet_jax.errors import UserError
from resnet_jax.models.compute import XLA

CPU_TARGETS = ("resnet_jax_", "onednn", "__cpu", "xla_cpu")
# XLA's exec_time_optimization_effort for the compiles here: -1 compiles about 4x faster than the
# default 0 (ResNet-20's train step: minutes on two cores at 0), and leaves what these tests check
# (fits, no CPU custom calls, the gradients all-reduced once) as it is at 0.
EFFORT = -1.0


@pytest.fixture(scope="module")
def v5e():
    if not tpu_compile.libtpu_installed():
        require_native("libtpu is not installed (pip install 'resnet-jax[tpu]')")
    return tpu_compile.target_devices("v5e:2x2")


def _config(spec, **changes):
    config = config_lib.load_config(str(REPO / "configs" / spec))
    with config.unlocked():
        config.update(changes)
    return config


def _gradient_bytes(programs):
    """The gradients as the step computes them: in the compute dtype (layers cast their float32
    parameters to it, so their gradients are bfloat16 until the cast back, and XLA all-reduces
    the bfloat16 partial sums)."""
    state = state_lib.abstract_state(programs.config, programs.model, programs.mesh, programs.image_size)
    itemsize = jnp.dtype(programs.config.compute_dtype).itemsize
    return sum(int(np.prod(p.shape)) * itemsize for p in jax.tree.leaves(state.params))


def _bn_channels(programs):
    state = state_lib.abstract_state(programs.config, programs.model, programs.mesh, programs.image_size)
    return sum(int(np.prod(s.shape)) for path, s in jax.tree_util.tree_leaves_with_path(
        state.batch_stats) if path[-1].key == "mean")


def _check_train_step(programs, per_chip):
    """Compiles, fits, no CPU custom call, and the all-reduces carry the gradients once: at least
    their bytes, at most those plus BN's per-channel statistics (forward and backward, float32)
    and the metrics. (Not one all-reduce: XLA combines the gradients' into a few, and BN's
    statistics need their own, layer by layer.)"""
    chip = tpu_compile.CHIPS["v5e"]
    r = tpu_compile.compile_program(programs, "train", per_chip, chip, EFFORT)
    assert r.fits and 0 < r.total_bytes < chip.hbm_bytes
    assert not [c for c in r.custom_calls if c.lower().startswith(CPU_TARGETS)], r.custom_calls
    assert set(r.collectives) == {"all-reduce"}, r.collectives
    reduced = r.collectives["all-reduce"]["bytes"]
    gradients = _gradient_bytes(programs)
    bn = 4 * 4 * _bn_channels(programs)  # f32 sum and sum of squares, forward and backward
    assert gradients <= reduced <= gradients + bn + 1024, (reduced, gradients, bn)
    assert r.flops > 0 and r.bytes_accessed > 0
    return r


@pytest.mark.slow
def test_cifar_resnet20_train_step_fits_v5e(v5e):
    programs = tpu_compile.Programs.build(_config("cifar10.py:resnet20"), v5e)
    assert programs.model.kernels is XLA  # the target's kernels, though this host is a CPU
    _check_train_step(programs, per_chip=32)


@pytest.mark.slow
def test_imagenet_resnet18_bf16_train_step_fits_v5e(v5e):
    config = _config("imagenet.py:resnet18", compute_dtype="bfloat16")
    programs = tpu_compile.Programs.build(config, v5e, image_size=64)
    _check_train_step(programs, per_chip=16)


def test_tpu_program_does_not_depend_on_the_host(v5e, monkeypatch):
    """The program lowered for TPU chips on this CPU host is the one a TPU host lowers: the same
    text with the host's default backend forced to 'tpu'. (A program for CPU devices differs,
    which shows that the comparison can tell.)"""
    config = _config("cifar10.py:resnet20")
    lowered = lambda devices: tpu_compile.Programs.build(config, devices).lower("train", 8).as_text()
    here = lowered(v5e)
    cpu = lowered(jax.devices("cpu")[:4])
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    monkeypatch.setattr(jax._src.xla_bridge, "default_backend", lambda: "tpu")
    assert jax.default_backend() == "tpu"
    forced = lowered(v5e)
    assert here == forced
    assert here.replace("TPU", "") != cpu.replace("TPU", "")


@pytest.mark.slow
def test_multi_host_slice_compiles(v5e):
    """v4:2x2x2 is eight chips on two hosts: the one SPMD program, every host's part of it."""
    result = tpu_compile.run_compile(_config("cifar10.py:resnet20"), "v4:2x2x2", batch_size=64,
                                     programs=("eval",), effort=EFFORT, log=lambda *a: None)
    assert (result["chips"], result["hosts"]) == (8, 2)
    (r,) = result["reports"]
    assert r["fits"] and r["per_chip_batch"] == 8
    assert r["hbm_bytes"] == 32 * tpu_compile.GiB


def test_collectives_parse_sync_and_async_hlo():
    hlo = """
  %all-reduce.1 = f32[128,64]{1,0} all-reduce(f32[128,64]{1,0} %p), replica_groups={}
  %ars = (f32[16]{0}, bf16[8]{0}) all-reduce-start(f32[16]{0} %a, bf16[8]{0} %b), replica_groups={}
  %ard = (f32[16]{0}, bf16[8]{0}) all-reduce-done((f32[16]{0}, bf16[8]{0}) %ars)
  ROOT %ag = (bf16[4,8]{1,0}, bf16[16,8]{1,0}) all-gather-start(bf16[4,8]{1,0} %x), dimensions={0}
  %cp = f32[2]{0} collective-permute(f32[2]{0} %y), source_target_pairs={{0,1}}
  %add = f32[2]{0} add(f32[2]{0} %y, f32[2]{0} %y)
"""
    assert tpu_compile.collectives(hlo) == {
        "all-reduce": dict(count=2, bytes=128 * 64 * 4 + 16 * 4 + 8 * 2),
        "all-gather": dict(count=1, bytes=16 * 8 * 2),
        "collective-permute": dict(count=1, bytes=8)}


@pytest.mark.parametrize("limit", [1, 7, 40, 200, 1000])
def test_max_batch_finds_the_largest_batch_that_fits(monkeypatch, limit):
    """Against a stand-in compiler whose memory is affine in the batch (with a slight curve, so
    the linear prediction is not exact) and that refuses past `limit` images a chip: the search
    returns the largest fitting batch, to 8 images past 16, in few compiles."""
    chip = tpu_compile.CHIPS["v5e"]
    fixed, per_image = 100 << 20, 1.0 * (chip.hbm_bytes - (100 << 20)) / (limit + 0.5)
    compiled = []

    def fake(programs, program, b, chip_, effort=0.0):
        compiled.append(b)
        total = int(fixed + per_image * b * (1 + 0.02 * (b > limit / 2)))
        if b > 2 * limit:
            raise tpu_compile.DoesNotFit("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm")
        return tpu_compile.Report("train", b, fixed, 0, 0, total - fixed, 0, chip.hbm_bytes,
                                  chip.peak_flops, chip.hbm_bandwidth, 1.0, 1.0, {}, [], False, 1.0,
                                  1.0)

    monkeypatch.setattr(tpu_compile, "compile_program", fake)
    found = tpu_compile.max_batch(None, chip, start=32)
    fits = lambda b: fake(None, "train", b, chip).fits
    assert fits(found) if found else not fits(1)
    step = 8 if found >= 16 else 1
    assert not fits(found + step)
    assert len(compiled) <= 10 + 2, compiled


@pytest.mark.parametrize("oom", [300, 1100])
def test_max_batch_past_the_compilers_recomputation(monkeypatch, oom):
    """Near the limit XLA's TPU compiler recomputes rather than stores, and memory stays flat
    until it cannot fit at all: the search still ends at the last batch that compiles."""
    chip = tpu_compile.CHIPS["v5e"]
    compiled = []

    def fake(programs, program, b, chip_, effort=0.0):
        compiled.append(b)
        if b > oom:
            raise tpu_compile.DoesNotFit("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm")
        total = min((100 << 20) + b * (100 << 20), int(0.92 * chip.hbm_bytes))
        return tpu_compile.Report("train", b, 100 << 20, 0, 0, total - (100 << 20), 0,
                                  chip.hbm_bytes, chip.peak_flops, chip.hbm_bandwidth, 1.0 * b,
                                  1.0, {}, [], False, 1.0, 1.0)

    monkeypatch.setattr(tpu_compile, "compile_program", fake)
    found = tpu_compile.max_batch(None, chip, start=32)
    assert oom - 8 < found <= oom
    assert len(compiled) <= 16, compiled  # doubling jumps, then bisection to 8 images


def test_missing_libtpu_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(tpu_compile, "libtpu_installed", lambda: False)
    with pytest.raises(UserError, match=r"pip install 'resnet-jax\[tpu\]'"):
        tpu_compile.target_devices("v5e:2x2")


def test_missing_cuda_plugin_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(tpu_compile, "_installed", lambda platform: False)
    with pytest.raises(UserError, match=r"pip install 'jax-cuda12-plugin==0.10.2'"):
        tpu_compile.target_devices("h100:8")


def test_the_config_is_checked_for_the_slice_before_compiling(monkeypatch):
    """A bad value (compute_dtype='bf16') was a traceback from deep inside the model."""
    eight = [type("Device", (), {"process_index": 0})()] * 8  # a v5e:2x4 without libtpu
    monkeypatch.setattr(tpu_compile, "target_devices", lambda topology: eight)
    monkeypatch.setattr(tpu_compile.Programs, "build", lambda *a: pytest.fail("built"))
    with pytest.raises(UserError, match=r"^compute_dtype must be 'float32' or 'bfloat16', not "
                       r"'bf16'$"):
        tpu_compile.run_compile(_config("cpu.py:tiny", compute_dtype="bf16"), "v5e:2x4")
    with pytest.raises(UserError, match=r"^batch_size 100 does not split over 8 devices; use a "
                       "multiple of 8$"):
        tpu_compile.run_compile(_config("cpu.py:tiny"), "v5e:2x4", batch_size=100)


@pytest.mark.parametrize("topology", ["v5e", "v3:2x2", "v5e:2by2", "tpu", "v5e:8", "h100:1x2x8"])
def test_bad_topology_names_the_form(topology):
    with pytest.raises(UserError, match="CHIP:AxB"):
        tpu_compile.target_devices(topology)


def test_tpu_table_resumes_from_its_json(tmp_path, monkeypatch):
    """A stopped table run (hours of compiles) resumes: the cells in its JSON are not compiled
    again, and each new cell is written as it finishes."""
    from benchmarks import tpu_table
    path = tmp_path / "table.json"
    done = dict(model="resnet18", topology="v5e:2x2", per_chip=64, gib=1.0, fits=True, max_batch=999)
    path.write_text(json.dumps([done]))
    compiled = []

    def fake_cell(model, topology, effort):
        compiled.append((model, topology))
        assert (model, topology) not in [(c["model"], c["topology"])
                                         for c in json.loads(path.read_text())]
        return dict(done, model=model, topology=topology)

    monkeypatch.setattr(tpu_table, "cell", fake_cell)
    cells = tpu_table.run(["resnet18", "resnet34"], ["v5e:2x2", "v4:2x2x1"], -1.0, str(path))
    assert compiled == [("resnet18", "v4:2x2x1"), ("resnet34", "v5e:2x2"), ("resnet34", "v4:2x2x1")]
    assert len(cells) == len(json.loads(path.read_text())) == 4
    rows = tpu_table.table(cells).splitlines()
    assert rows[0].startswith("| net, bf16 | HBM a chip at 64 images | largest batch a chip, v5e")
    assert rows[2:] == ["| resnet18 | 1.00 GiB | 999 | 999 |", "| resnet34 | 1.00 GiB | 999 | 999 |"]


def test_tpu_table_says_where_the_papers_batch_does_not_fit():
    from benchmarks import tpu_table
    cells = [dict(model="vgg19", topology="v5e:2x2", per_chip=64, gib=float("nan"), fits=False,
                  max_batch=40),
             dict(model="vgg19", topology="v4:2x2x1", per_chip=64, gib=17.5, fits=True, max_batch=90)]
    assert tpu_table.table(cells).splitlines()[2] == "| vgg19 | 17.50 GiB | 40 (64 does not fit) | 90 |"
