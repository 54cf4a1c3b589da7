"""fast_conv is the same convolution as lax's: identical forward, autodiff's gradients."""
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from resnet_jax.models import cifar, fast_conv

NHWC = ("NHWC", "HWIO", "NHWC")


# The zoo's convolutions (3x3 pad 1, 1x1 pad 0, 7x7 pad 3; stride 1 and 2), on even and odd
# sizes (where the stride does not divide the padded input and its last rows get no gradient),
# non-square maps, and flax's 'VALID' string.
CASES = [
    (3, 1, ((1, 1), (1, 1)), (8, 9)), (3, 2, ((1, 1), (1, 1)), (8, 8)),
    (3, 2, ((1, 1), (1, 1)), (9, 7)), (1, 1, "VALID", (6, 5)), (1, 2, "VALID", (8, 8)),
    (1, 2, ((0, 0), (0, 0)), (7, 9)), (7, 2, ((3, 3), (3, 3)), (16, 15)),
    (7, 2, ((3, 3), (3, 3)), (11, 12)),
]


def _inputs():
    rng = np.random.default_rng(0)
    inputs = []
    for kernel, stride, padding, size in CASES:
        x = rng.standard_normal((3, *size, 5), np.float32)
        w = rng.standard_normal((kernel, kernel, 5, 4), np.float32)
        y = jax.eval_shape(lambda x, w: lax.conv_general_dilated(
            x, w, (stride, stride), padding, dimension_numbers=NHWC), x, w)
        inputs.append((x, w, rng.standard_normal(y.shape, np.float32)))
    return inputs


def _outputs_and_grads(conv, inputs):
    """Per case: output, dx and dw; all cases in one jit (one compile: CPU time is scarce)."""
    def run(inputs):
        results = []
        for (kernel, stride, padding, size), (x, w, dy) in zip(CASES, inputs):
            y, vjp = jax.vjp(lambda x, w: conv(x, w, (stride, stride), padding,
                                               dimension_numbers=NHWC), x, w)
            results.append((y, *vjp(dy)))
        return results
    return jax.jit(run)(inputs)


def test_same_values_and_gradients_as_lax():
    inputs = _inputs()
    want = _outputs_and_grads(lax.conv_general_dilated, inputs)
    got = _outputs_and_grads(fast_conv.conv_general_dilated, inputs)
    for case, (y, dx, dw), (y_ref, dx_ref, dw_ref) in zip(CASES, got, want):
        np.testing.assert_array_equal(y, y_ref, err_msg=str(case))
        for g, ref in ((dx, dx_ref), (dw, dw_ref)):
            np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()),
                                       err_msg=str(case))


def test_other_convolutions_are_lax_own():
    """Grouped, dilated or NCHW convolutions are passed to lax untouched (no custom VJP)."""
    x, w = jnp.ones((2, 4, 8, 8)), jnp.ones((4, 2, 3, 3))
    jaxpr = jax.make_jaxpr(lambda x, w: fast_conv.conv_general_dilated(
        x, w, (1, 1), "SAME", feature_group_count=2, dimension_numbers=("NCHW", "OIHW", "NCHW")))
    assert "custom_vjp" not in str(jaxpr(x, w))
    w = jnp.ones((3, 4, 3, 3))
    np.testing.assert_array_equal(
        fast_conv.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(2, 2)),
        lax.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(2, 2)))


def _train_grads(model, variables, x, y):
    def loss(params):
        logits, _ = model.apply({**variables, "params": params}, x, train=True,
                                mutable=["batch_stats"])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
    return jax.jit(jax.grad(loss))(variables["params"])


def test_scanned_model_gradients_match_lax():
    """Through a whole train-mode ResNet whose stages run under nn.scan (option B shortcuts, so
    1x1 stride-2 convs too): the default model is the fast one on the CPU, its parameter tree is
    unchanged, and its gradients are lax's."""
    opts = dict(widths=(4, 8, 8), shortcut="B")
    fast = cifar.CifarResNet(depth=14, **opts)
    plain = cifar.CifarResNet(depth=14, conv_general_dilated=lax.conv_general_dilated, **opts)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 12, 12, 3), np.float32)
    y = jnp.arange(6) % 10
    shapes = jax.eval_shape(fast.init, jax.random.PRNGKey(0), x)
    assert (jax.tree.structure(shapes)
            == jax.tree.structure(jax.eval_shape(plain.init, jax.random.PRNGKey(0), x)))
    # Random values in place of `init`, whose compiled random number generation costs seconds.
    variables = jax.tree.map(lambda s: 0.5 * rng.standard_normal(s.shape, np.float32), shapes)
    assert variables["params"]["stage2"]["blocks"]["conv1"]["kernel"].shape == (1, 3, 3, 8, 8)
    assert jax.default_backend() != "cpu" or "custom_vjp" in str(
        jax.make_jaxpr(lambda v: fast.apply(v, x))(variables))
    got, want = _train_grads(fast, variables, x, y), _train_grads(plain, variables, x, y)
    jax.tree_util.tree_map_with_path(
        lambda path, g, ref: np.testing.assert_allclose(
            g, ref, rtol=2e-4, atol=2e-5 * float(jnp.abs(ref).max()) + 1e-7,
            err_msg=jax.tree_util.keystr(path)), got, want)
