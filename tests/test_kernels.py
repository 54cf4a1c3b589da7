"""The CPU kernel sets (resnet_jax.kernels.cpu) compute what XLA's do: both convolutions (oneDNN's
kernels, XLA's with a canonical VJP) give lax's outputs and autodiff's gradients within float32
rounding, and their structural choice (materialised block outputs) changes nothing but speed.
Each test names the set it runs: no test reaches a path by patching a module."""
import os
import platform
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import fresh_python
import resnet_jax.kernels
from resnet_jax import native, parallel
from resnet_jax.kernels import cpu
from resnet_jax.kernels.cpu import onednn_conv
from resnet_jax.models import cifar, compute, imagenet

NHWC = ("NHWC", "HWIO", "NHWC")


# The zoo's convolutions (3x3 pad 1, 1x1 pad 0, 7x7 pad 3; stride 1 and 2), on even and odd
# sizes (where the stride does not divide the padded input and its last rows get no gradient),
# non-square maps, and flax's 'VALID' string; with 5 -> 4 channels, then two with enough for
# oneDNN's Winograd kernels (3x3 stride 1, sizes that its 4x4 tiles do not divide) and a strided
# one of as many, which stays direct.
CASES = [
    (3, 1, ((1, 1), (1, 1)), (8, 9), (5, 4)), (3, 2, ((1, 1), (1, 1)), (8, 8), (5, 4)),
    (3, 2, ((1, 1), (1, 1)), (9, 7), (5, 4)), (1, 1, "VALID", (6, 5), (5, 4)),
    (1, 2, "VALID", (8, 8), (5, 4)), (1, 2, ((0, 0), (0, 0)), (7, 9), (5, 4)),
    (7, 2, ((3, 3), (3, 3)), (16, 15), (5, 4)), (7, 2, ((3, 3), (3, 3)), (11, 12), (5, 4)),
    (3, 1, ((1, 1), (1, 1)), (8, 9), (32, 32)), (3, 1, ((1, 1), (1, 1)), (7, 6), (64, 32)),
    (3, 2, ((1, 1), (1, 1)), (8, 8), (32, 64)),
]


def _inputs():
    rng = np.random.default_rng(0)
    inputs = []
    for kernel, stride, padding, size, (c, o) in CASES:
        x = rng.standard_normal((3, *size, c), np.float32)
        w = rng.standard_normal((kernel, kernel, c, o), np.float32)
        y = jax.eval_shape(lambda x, w: lax.conv_general_dilated(
            x, w, (stride, stride), padding, dimension_numbers=NHWC), x, w)
        inputs.append((x, w, rng.standard_normal(y.shape, np.float32)))
    return inputs


def _outputs_and_grads(conv, inputs):
    """Per case: output, dx and dw; all cases in one jit (one compile: CPU time is scarce)."""
    def run(inputs):
        results = []
        for (kernel, stride, padding, *_), (x, w, dy) in zip(CASES, inputs):
            y, vjp = jax.vjp(lambda x, w: conv(x, w, (stride, stride), padding,
                                               dimension_numbers=NHWC), x, w)
            results.append((y, *vjp(dy)))
        return results
    return jax.jit(run)(inputs)


@pytest.fixture(params=["onednn", "canonical"])
def kernels(request):
    """Each CPU kernel set in turn (these computations run on one device)."""
    if request.param == "onednn":
        request.getfixturevalue("onednn")
        return cpu.ONEDNN
    return cpu.CANONICAL


def _assert_close(got, want, err_msg):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()),
                               err_msg=err_msg)


def test_same_values_and_gradients_as_lax(kernels):
    inputs = _inputs()
    want = _outputs_and_grads(lax.conv_general_dilated, inputs)
    got = _outputs_and_grads(kernels.conv_general_dilated, inputs)
    target = "resnet_jax_conv_forward" in str(jax.jit(
        lambda x, w: kernels.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)
    ).lower(*inputs[0][:2]).as_text())
    assert target == (kernels is cpu.ONEDNN)
    for case, outputs, references in zip(CASES, got, want):
        for name, g, ref in zip(("y", "dx", "dw"), outputs, references):
            _assert_close(g, ref, f"{case} {name}")


def test_winograd_kernels_where_they_pay(onednn):
    """oneDNN's Winograd kernels do stride-1 3x3 convolutions of 32 channels or more (all three
    directions), where they take half to two thirds of the direct kernels' time; others stay
    direct. oneDNN has them for AVX-512 only: elsewhere everything must fall back to direct."""
    code = """if True:
        import jax, numpy as np
        from resnet_jax.kernels.cpu import onednn_conv
        assert onednn_conv.available()
        for c, stride in ((32, 1), (16, 1), (32, 2)):
            x, w = np.ones((2, 8, 8, c), np.float32), np.ones((3, 3, c, c), np.float32)
            f = lambda x, w: onednn_conv.conv(x, w, (stride, stride), ((1, 1), (1, 1))).sum()
            jax.block_until_ready(jax.jit(jax.value_and_grad(f, (0, 1)))(x, w))
    """
    env = dict(os.environ, ONEDNN_VERBOSE="1", XLA_FLAGS="")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=env).stdout
    used = set()
    for line in out.splitlines():
        if line.startswith("onednn_verbose,exec,cpu,convolution,"):
            shape = re.search(r"mb2_ic(\d+)oc\d+_ih8oh(\d+)", line)
            direction = re.search(r"(forward_training|backward_data|backward_weights)", line)
            algorithm = re.search(r"alg:convolution_(\w+)", line)
            used.add((int(shape[1]), int(shape[2]), direction[1], algorithm[1]))
    # The instruction set oneDNN runs: the CPU's, or less under ONEDNN_MAX_CPU_ISA.
    avx512 = any(line.startswith("onednn_verbose,info,cpu,isa:") and "AVX-512" in line
                 for line in out.splitlines())
    directions = ("forward_training", "backward_data", "backward_weights")
    assert used == {(c, oh, d, "winograd" if (c, oh) == (32, 8) and avx512 else "direct")
                    for c, oh in ((32, 8), (16, 8), (32, 4)) for d in directions}


# The instruction sets below AVX-512 that oneDNN 2.6 has float32 convolution kernels of their own
# for, each with its own memory layouts and channel blocks: SSE4.1 (direct forward kernels, GEMM
# for both backward ones), AVX and AVX2; as dnnl_cpu_isa_t bit masks. AVX-512's kernels (direct,
# 1x1, Winograd) are the development and CI machines' own, which the rest of this file runs; its
# later tiers (VNNI, bfloat16, AMX) run float32 on those.
ISA_TIERS = {"SSE41": 0x1, "AVX": 0x3, "AVX2": 0x7}
# This file's tests of every kernel, direction and layout, and of a whole net's gradients.
KERNEL_TESTS = ("test_same_values_and_gradients_as_lax[onednn]",
                "test_winograd_kernels_where_they_pay",
                "test_model_gradients_match_lax[onednn]")


@pytest.mark.slow
@pytest.mark.parametrize("isa", ISA_TIERS)
def test_kernels_at_each_isa_tier(onednn, isa):
    """oneDNN picks its kernels by the CPU's instruction set, so a CPU of another kind runs
    kernels that no test ran here (AVX2's 1x1 stride-2 backward weights were wrong, on CPUs
    without AVX-512 only). ONEDNN_MAX_CPU_ISA caps that choice when oneDNN starts: each tier
    runs this file's kernel tests in a process of its own (a cap above the CPU runs the CPU's
    tier)."""
    if platform.machine() != "x86_64":
        pytest.skip(f"oneDNN's instruction-set tiers are x86's, not {platform.machine()}'s")
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA=isa)
    effective = subprocess.run(
        [sys.executable, "-c", "import ctypes, ctypes.util; print(ctypes.CDLL("
         "ctypes.util.find_library('dnnl')).dnnl_get_effective_cpu_isa())"],
        capture_output=True, text=True, check=True, env=env).stdout
    assert int(effective) & ~ISA_TIERS[isa] == 0, f"{isa} cap ignored: dnnl_cpu_isa_t {effective}"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *(f"{__file__}::{name}" for name in KERNEL_TESTS)],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, f"ONEDNN_MAX_CPU_ISA={isa}:\n{done.stdout[-5000:]}"


def test_onednn_under_vmap(onednn):
    """bn_group_size's vmap runs the kernel once per group."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 8, 6, 6, 5), np.float32)
    w = rng.standard_normal((3, 3, 5, 4), np.float32)

    def grads(conv):
        return jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.tanh(jax.vmap(lambda x: conv(
            x, w, (1, 1), ((1, 1), (1, 1))))(x)) ** 2), (0, 1)))(x, w)
    want = grads(lambda x, w, s, p: lax.conv_general_dilated(x, w, s, p, dimension_numbers=NHWC))
    for g, ref in zip(grads(onednn_conv.conv), want):
        _assert_close(g, ref, "vmap")


def test_kernels_follow_the_devices_a_program_runs_on(onednn):
    """oneDNN's set for one CPU device; with several (the tests' 8) a sharded batch would make
    GSPMD repeat a oneDNN call on every device, so they get XLA's convolutions with the canonical
    VJP; GPUs and TPUs get XLA's own set, whatever the host is."""
    assert resnet_jax.kernels.for_devices(jax.devices()[:1]) is cpu.ONEDNN
    assert resnet_jax.kernels.for_devices(jax.devices()) is cpu.CANONICAL
    for kind in ("tpu", "gpu"):
        devices = [types.SimpleNamespace(platform=kind)] * 4
        assert resnet_jax.kernels.for_devices(devices) is compute.XLA
    x, w = jnp.ones((8, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
    x = jax.device_put(x, NamedSharding(parallel.make_mesh(), P(parallel.DATA_AXIS)))
    hlo = jax.jit(lambda x, w: cpu.CANONICAL.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=NHWC)).lower(x, w).as_text()
    assert "resnet_jax_conv" not in hlo


def test_models_import_no_kernels_and_default_to_xla():
    """`models/` is portable: importing it loads nothing of `resnet_jax.kernels`, and a network
    built without a kernel set traces to lax's own operations (no custom calls, no custom VJP)."""
    code = ("import sys, resnet_jax; m = resnet_jax.create_model('resnet20'); "
            "print(sorted(k for k in sys.modules if k.startswith('resnet_jax.kernels')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, XLA_FLAGS="")).stdout
    assert out.strip() == "[]"
    model = resnet_jax.create_model("resnet20", widths=(4, 8, 8), input_size=None)
    assert model.kernels is compute.XLA
    x = jnp.ones((2, 8, 8, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    jaxpr = str(jax.make_jaxpr(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables))
    assert "custom_vjp" not in jaxpr and "custom_call" not in jaxpr and "ffi" not in jaxpr


def test_onednn_without_headers_is_not_attempted(monkeypatch):
    monkeypatch.setattr(native, "include_dirs", lambda: [])
    monkeypatch.setattr(native, "build", lambda *a: pytest.fail("compiled anyway"))
    monkeypatch.delenv("RESNET_JAX_ONEDNN", raising=False)
    assert "libdnnl-dev" in onednn_conv._load.__wrapped__()


def test_library_is_cached_per_cpu(monkeypatch):
    """The library is built with -march=native: a cache shared by hosts of different CPUs (an
    NFS home) must give each CPU its own build, not one that may hold instructions it lacks."""
    path = lambda: onednn_conv._library_path("/usr/bin/g++", "/include")
    here = path()
    assert path() == here
    monkeypatch.setattr(native, "cpu_signature", lambda: b"flags : fpu sse2")
    assert path() != here


def test_onednn_off_or_unbuildable_falls_back_to_xla(tmp_path):
    """RESNET_JAX_ONEDNN=0, or a compiler that fails: XLA's convolutions, the reason in one line,
    no exception."""
    code = ("from resnet_jax.kernels.cpu import onednn_conv as o; print(o.available()); "
            "print(o._load())")
    base = {k: v for k, v in os.environ.items() if k != "RESNET_JAX_ONEDNN"}
    for env, reason in (({"RESNET_JAX_ONEDNN": "0"}, "RESNET_JAX_ONEDNN=0"),
                        ({"CXX": "false"}, "failed")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, env=dict(base, RESNET_JAX_CACHE=str(tmp_path),
                                                  **env)).stdout.splitlines()
        assert out[0] == "False" and reason in out[1], out


def test_other_convolutions_are_lax_own():
    """Grouped, dilated or NCHW convolutions are passed to lax untouched (no custom VJP)."""
    x, w = jnp.ones((2, 4, 8, 8)), jnp.ones((4, 2, 3, 3))
    jaxpr = jax.make_jaxpr(lambda x, w: cpu.ONEDNN.conv_general_dilated(
        x, w, (1, 1), "SAME", feature_group_count=2, dimension_numbers=("NCHW", "OIHW", "NCHW")))
    assert "custom_vjp" not in str(jaxpr(x, w))
    w = jnp.ones((3, 4, 3, 3))
    np.testing.assert_array_equal(
        cpu.ONEDNN.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(2, 2)),
        lax.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(2, 2)))


def test_onednn_takes_float32_only(onednn):
    """bfloat16 (the TPU/GPU configs' compute dtype) stays with XLA, which has the kernels."""
    def hlo(dtype):
        x, w = jnp.ones((2, 8, 8, 4), dtype), jnp.ones((3, 3, 4, 4), dtype)
        return jax.jit(lambda x, w: cpu.ONEDNN.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=NHWC)).lower(x, w).as_text()
    assert "resnet_jax_conv_forward" in hlo(jnp.float32)
    assert "resnet_jax_conv_forward" not in hlo(jnp.bfloat16)


def _train_grads(model, variables, x, y):
    def loss(params):
        logits, _ = model.apply({**variables, "params": params}, x, train=True,
                                mutable=["batch_stats"])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
    return jax.jit(jax.grad(loss))(variables["params"])


def _random_variables(fast, plain, x, rng):
    """Variables for both models (whose parameter trees must agree): random values in place of
    `init`, whose compiled random number generation costs seconds."""
    shapes = jax.eval_shape(fast.init, jax.random.PRNGKey(0), x)
    assert (jax.tree.structure(shapes)
            == jax.tree.structure(jax.eval_shape(plain.init, jax.random.PRNGKey(0), x)))
    return jax.tree.map(lambda s: 0.5 * rng.standard_normal(s.shape, np.float32), shapes)


def _assert_gradients_match_lax(fast, plain, variables, x):
    """`fast`'s train-mode gradients are those of `plain` (computing with `compute.XLA`)."""
    y = jnp.arange(len(x)) % 10
    got = _train_grads(fast, variables, x, y)
    want = _train_grads(plain, variables, x, y)
    jax.tree_util.tree_map_with_path(
        lambda path, g, ref: np.testing.assert_allclose(
            g, ref, rtol=2e-4, atol=2e-5 * float(jnp.abs(ref).max()) + 1e-7,
            err_msg=jax.tree_util.keystr(path)), got, want)


@pytest.mark.slow
def test_model_gradients_match_lax(kernels):
    """Through a whole train-mode ResNet (option B shortcuts, so 1x1 stride-2 convs too): a CPU
    set (oneDNN's with materialised block outputs, or the canonical one) keeps the parameter
    tree, and its gradients are those of lax's convolutions."""
    opts = dict(widths=(4, 8, 8), shortcut="B")
    fast = cifar.CifarResNet(depth=20, kernels=kernels, **opts)
    plain = cifar.CifarResNet(depth=20, kernels=compute.XLA, **opts)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 12, 12, 3), np.float32)
    variables = _random_variables(fast, plain, x, rng)
    assert variables["params"]["stage2"]["block2"]["conv1"]["kernel"].shape == (3, 3, 8, 8)
    assert "custom_vjp" in str(jax.make_jaxpr(lambda v: fast.apply(v, x))(variables))
    _assert_gradients_match_lax(fast, plain, variables, x)


@pytest.mark.slow
def test_bottleneck_model_gradients_match_lax(onednn):
    """The ImageNet nets' bottleneck blocks in the paper's layout (the stride in the first 1x1
    conv) with option B shortcuts: each downsampling block0 has two 1x1 stride-2 convs, here on
    8 and 16 channels (fewer than, and one block of, oneDNN's AVX-512 kernels)."""
    opts = dict(stage_sizes=(1, 2, 1, 1), bottleneck=True, widths=(2, 4, 4, 4), num_classes=10)
    fast = imagenet.ImageNetResNet(kernels=cpu.ONEDNN, **opts)
    plain = imagenet.ImageNetResNet(kernels=compute.XLA, **opts)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 64, 64, 3), np.float32)
    variables = _random_variables(fast, plain, x, rng)
    stage2 = variables["params"]["stage2"]["block0"]
    assert stage2["conv1"]["kernel"].shape == (1, 1, 8, 4)
    assert stage2["shortcut"]["conv"]["kernel"].shape == (1, 1, 8, 16)
    _assert_gradients_match_lax(fast, plain, variables, x)


def test_materialize_is_the_identity(onednn):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4, 5, 6), np.float32))
    f = jax.jit(lambda x: jnp.sum(jnp.sin(cpu.materialize(x * 2.0))))
    np.testing.assert_allclose(f(x), jnp.sum(jnp.sin(x * 2.0)), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(jax.grad(f))(x), 2.0 * jnp.cos(x * 2.0), rtol=1e-6)
    np.testing.assert_array_equal(jax.vmap(cpu.materialize)(x), x)
    assert "resnet_jax_materialize" in jax.jit(cpu.materialize).lower(x).as_text()


def _widest_activation_fusion(depth: int) -> int:
    """The most operands of any fusion that makes an activation (rank 4) in the compiled
    gradient of a train-mode ResNet."""
    model = cifar.CifarResNet(depth=depth, widths=(4, 8, 8), kernels=cpu.ONEDNN)
    x = np.random.default_rng(0).standard_normal((4, 8, 8, 3), np.float32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    variables = jax.tree.map(lambda s: np.full(s.shape, 0.5, np.float32), shapes)
    text = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(
        {**variables, "params": p}, x, train=True, mutable=["batch_stats"])[0] ** 2))).lower(
            variables["params"]).compile().as_text()
    fusions = re.finditer(r"= f32\[\d+,\d+,\d+,\d+\]\S* fusion\(([^)]*)\)", text)
    return max(len(re.findall(r"%[\w.\-]+", f.group(1))) for f in fusions)


@pytest.mark.slow
def test_unrolled_stages_do_not_recompute_block_outputs(onednn):
    """XLA:CPU duplicates cheap producers into their consumers: in an unrolled stage each
    backward ReLU recomputed every earlier block's output, in fusions that widened with depth
    (32 operands at depth 20, 68 at 56). With the block outputs materialised they do not."""
    assert _widest_activation_fusion(44) == _widest_activation_fusion(20)


@pytest.mark.parametrize("shape", [(3, 5, 7, 24), (2, 4, 4, 3), (2, 3, 3, 100), (2, 9, 9, 16),
                                   (1, 40, 40, 64)])
def test_image_moments_are_each_images_mean_and_m2(onednn, shape):
    """Any channel count (the kernel tiles 16/32/64 in rows of 64, others one row per pixel)."""
    x = jax.random.normal(jax.random.key(0), shape) * 3.0 + 5.0
    same, mean, m2 = jax.jit(onednn_conv.image_moments)(x)
    np.testing.assert_array_equal(same, x)
    flat = np.asarray(x, np.float64).reshape(shape[0], -1, shape[-1])
    np.testing.assert_allclose(mean, flat.mean(1), rtol=1e-6)
    np.testing.assert_allclose(m2, flat.var(1) * flat.shape[1], rtol=1e-5)


def test_image_moments_read_the_conv_output_before_anything_else(onednn):
    """The kernel is there to read a conv's output while it is in cache: XLA's schedule must run
    it before the fused BN+ReLU that reads (and overwrites) the same buffer, which it did not
    without the ordering."""
    conv = lambda x, w: onednn_conv.conv(x, w, (1, 1), ((1, 1), (1, 1)))

    def layer(x, w):
        y, mean, m2 = onednn_conv.image_moments(conv(x, w))
        return conv(jax.nn.relu(y * 1.5 + 0.5), w), mean, m2

    x, w = jnp.ones((8, 16, 16, 16)), jnp.ones((3, 3, 16, 16))
    schedule = [line for line in jax.jit(layer).lower(x, w).compile().as_text().splitlines()
                if " = " in line and "ENTRY" not in line]
    moments = next(i for i, line in enumerate(schedule) if "resnet_jax_image_moments" in line)
    conv_out = re.search(r"custom-call\((%[\w.]+)\)", schedule[moments]).group(1)
    readers = [i for i, line in enumerate(schedule)
               if re.search(re.escape(conv_out) + r"[,)]", line.split(" = ", 1)[1])]
    assert len(readers) >= 2 and readers[0] == moments, schedule


def test_image_moments_side_by_side(onednn):
    """Independent calls XLA may run at once on its pool, each sharing its images with the pool:
    no call waits on a share nobody runs."""
    xs = [jax.random.normal(jax.random.key(i), (16, 32, 32, 16)) + i for i in range(4)]
    results = jax.jit(lambda *xs: [onednn_conv.image_moments(x * 2.0)[1] for x in xs])(*xs)
    for x, mean in zip(xs, results):
        np.testing.assert_allclose(mean, np.asarray(x * 2.0).mean((1, 2)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cores, devices", [(1, 2), (2, 4), (3, 4), (4, 8), (64, 8)])
def test_default_device_count_two_per_core_power_of_two_at_most_eight(cores, devices):
    assert cpu.default_device_count(cores, onednn=False) == devices


def test_default_device_count_one_with_onednn(monkeypatch):
    """One device where oneDNN can be built, decided without building it (the CLIs ask before
    they know whether the CPU is the backend at all)."""
    assert cpu.default_device_count(64, onednn=True) == 1
    monkeypatch.setattr(onednn_conv, "_load", lambda: pytest.fail("built the library"))
    monkeypatch.setattr(native, "include_dirs", lambda: [])
    assert cpu.default_device_count(64) == 8
    monkeypatch.setattr(onednn_conv, "_unbuildable", lambda: None)
    assert cpu.default_device_count(64) == 1


USE_CPU_CORES = """
import os, sys
from resnet_jax.kernels import cpu
count = cpu.use_cpu_cores(tuple(int(a) for a in sys.argv[1:]))
import jax
print(count, jax.device_count(), "multi_thread_eigen=false" in os.environ.get("XLA_FLAGS", ""))
"""


def test_use_cpu_cores_gives_the_default_and_runs_devices_sequentially():
    count, devices, sequential = fresh_python(USE_CPU_CORES)
    assert int(count) == int(devices) == cpu.default_device_count()
    assert sequential == str(int(devices) > 1)


def test_use_cpu_cores_halves_until_every_batch_splits():
    code = USE_CPU_CORES.replace("tuple(int(a) for a in sys.argv[1:])", "(6, 10)")
    count, devices, _ = fresh_python(code)
    assert int(count) == int(devices) == min(2, cpu.default_device_count())


def test_use_cpu_cores_keeps_the_users_count():
    count, devices, sequential = fresh_python(
        USE_CPU_CORES, "--xla_force_host_platform_device_count=3")
    assert (int(count), int(devices), sequential) == (3, 3, "True")


def test_use_cpu_cores_after_the_backend_started_changes_nothing():
    code = "import jax; jax.devices()\n" + USE_CPU_CORES
    count, devices, sequential = fresh_python(code)
    assert (int(count), int(devices), sequential) == (-1, 1, "False")


def test_onednn_set_builds_its_library_when_first_used(onednn, tmp_path):
    """A caller may hold `cpu.ONEDNN` without asking `for_devices` (which builds and registers
    the library): the first traced call registers it, instead of XLA failing to find a handler."""
    code = ("import jax, jax.numpy as jnp, resnet_jax; from resnet_jax.kernels import cpu; "
            "m = resnet_jax.create_model('resnet20', widths=(4, 8, 8), input_size=None, kernels=cpu.ONEDNN); "
            "x = jnp.ones((2, 8, 8, 3)); v = jax.jit(m.init)(jax.random.key(0), x); "
            "print(jax.jit(m.apply)(v, x).shape)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, XLA_FLAGS=""))
    assert out.returncode == 0 and out.stdout.strip() == "(2, 10)", out.stderr[-2000:]


def test_native_sources_ship_with_the_package():
    """Every C/C++ source native.py builds is package data, or a pip-installed copy (not
    editable) would lack it and silently take the slow path."""
    import fnmatch
    import pathlib
    import tomllib
    root = pathlib.Path(__file__).resolve().parents[1]
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]
    sources = [p for ext in ("*.c", "*.cc") for p in (root / "resnet_jax").rglob(ext)]
    assert len(sources) >= 2
    for source in sources:
        package = ".".join(source.parent.relative_to(root).parts)
        assert any(fnmatch.fnmatch(source.name, g) for g in data.get(package, [])), source
