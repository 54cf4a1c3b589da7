"""Responses: which layers, in what order, and that they are the BN outputs the paper means."""
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import resnet_jax
from resnet_jax import responses


def abstract_responses(name, image_size=32, **options):
    model = resnet_jax.create_model(name, input_size=None, **options)  # any size: names only
    x = jnp.zeros((2, image_size, image_size, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    return jax.eval_shape(functools.partial(responses.capture_responses, model), variables, x)


@pytest.mark.parametrize("name,count", [("resnet20", 19), ("plain20", 19), ("resnet56", 55),
                                        ("resnet110", 109), ("resnet1202", 1201)])
def test_cifar_response_counts(name, count):
    assert len(abstract_responses(name)) == count


@pytest.mark.parametrize("name,count", [("resnet50", 16), ("resnet152", 50), ("resnet34", 32),
                                        ("vgg19", 16)])
def test_imagenet_response_counts(name, count):
    """Bottleneck nets: the 3x3 conv of each block; the 7x7 stem is not a 3x3 layer."""
    assert len(abstract_responses(name, 64)) == count


def test_names_are_in_depth_order():
    names = list(abstract_responses("resnet20"))
    expected = ["conv1"] + [f"stage{s}/block{b}/conv{c}" for s in (1, 2, 3) for b in range(3)
                            for c in (1, 2)]
    assert names == expected
    shapes = abstract_responses("resnet20")
    assert shapes["stage2/block0/conv1"].shape == (2, 16, 16, 32)
    assert shapes["stage3/block2/conv2"].shape == (2, 8, 8, 64)
    vgg = list(abstract_responses("vgg19", 64))
    assert vgg[:3] == ["stage1/conv1", "stage1/conv2", "stage2/conv1"]
    assert list(abstract_responses("resnet50", 64))[:2] == ["stage1/block0/conv2", "stage1/block1/conv2"]


@pytest.mark.slow
def test_depth_order_survives_jit_past_the_tenth_block():
    """ResNet-110 has 18 blocks a stage; jit hands a dict back with its keys sorted as strings
    (block10 before block2), and `in_depth_order` restores the order of the forward pass."""
    model = resnet_jax.create_model("resnet110", widths=(2, 4, 4))
    x = jnp.zeros((1, 32, 32, 3))
    variables = model.init(jax.random.key(0), x)
    direct = list(responses.capture_responses(model, variables, x))
    assert direct == ["conv1"] + [f"stage{s}/block{b}/conv{c}" for s in (1, 2, 3)
                                  for b in range(18) for c in (1, 2)]
    jitted = jax.jit(functools.partial(responses.capture_responses, model))(variables, x)
    assert list(jitted) != direct  # what the helper is for
    assert list(responses.in_depth_order(jitted)) == direct
    assert list(resnet_jax.in_depth_order(abstract_responses("resnet110"))) == direct


def perturbed_bn(variables):
    """Every BN's affine and running statistics far from a fresh BN's, so that the response
    statistics are not those of one."""
    keys = iter(jax.random.split(jax.random.key(2), 1000))

    def perturb(path, leaf):
        if path[-1].key in ("scale", "var"):
            return leaf * jax.random.uniform(next(keys), leaf.shape, minval=0.3, maxval=3.0)
        if path[-1].key in ("bias", "mean"):
            return leaf + jax.random.normal(next(keys), leaf.shape)
        return leaf

    return jax.tree_util.tree_map_with_path(perturb, variables)


@pytest.fixture(scope="module")
def resnet20():
    model = resnet_jax.create_model("resnet20")
    x = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
    variables = perturbed_bn(jax.jit(model.init)(jax.random.key(1), x))
    return model, variables, x


def test_response_is_bn_output_before_relu_and_addition(resnet20):
    model, variables, x = resnet20
    got = jax.jit(functools.partial(responses.capture_responses, model))(variables, x)
    is_bn = lambda m, method: isinstance(m, nn.BatchNorm) and method == "__call__"
    _, state = jax.jit(functools.partial(model.apply, capture_intermediates=is_bn,
                                         mutable=["intermediates"]))(variables, x)
    bn = state["intermediates"]
    np.testing.assert_array_equal(got["stage1/block0/conv2"], bn["stage1"]["block0"]["bn2"]["__call__"][0])
    np.testing.assert_array_equal(got["stage3/block2/conv1"], bn["stage3"]["block2"]["bn1"]["__call__"][0])
    np.testing.assert_array_equal(got["conv1"], bn["bn1"]["__call__"][0])
    assert float(got["stage2/block1/conv2"].min()) < 0  # before ReLU


def test_recorded_with_capture_intermediates_and_reducible_in_place(resnet20):
    model, variables, x = resnet20
    _, state = jax.jit(functools.partial(model.apply, capture_intermediates=resnet_jax.is_response,
                                         mutable=["intermediates"]))(variables, x)
    got = jax.jit(functools.partial(responses.capture_responses, model))(variables, x)
    np.testing.assert_array_equal(
        got["stage2/block2/conv1"], state["intermediates"]["stage2"]["block2"]["response1"]["__call__"][0])
    maxima = jax.jit(functools.partial(responses.capture_responses, model, reduce=jnp.max))(variables, x)
    assert list(maxima) == list(got)
    for name in got:
        np.testing.assert_allclose(maxima[name], got[name].max(), rtol=1e-6)


def test_train_mode_pooled_std_is_set_by_gamma_and_beta(resnet20):
    """With batch statistics each channel is normalised exactly, so over all N,H,W,C elements
    the response has variance mean(gamma^2) + var(beta): the paper's std is BN's parameters."""
    model, variables, x = resnet20
    got = jax.jit(functools.partial(responses.capture_responses, model, train=True))(variables, x)
    bn = variables["params"]["stage2"]["block1"]["bn2"]
    gamma, beta = np.asarray(bn["scale"]), np.asarray(bn["bias"])
    expected = np.sqrt(np.mean(gamma**2) + np.var(beta))
    r = np.asarray(got["stage2/block1/conv2"], np.float64)
    np.testing.assert_allclose(r.std(), expected, rtol=1e-3)
    # BN's epsilon (1e-5) shrinks the variance by var / (var + eps): hence 1e-3, not 1e-6.


def test_moments_merge_to_the_two_pass_result():
    rng = np.random.default_rng(0)
    a, b = rng.normal(3, 2, (5, 4, 4, 8)), rng.normal(1, 0.5, (3, 4, 4, 8))
    ma = responses.response_moments({"x": jnp.asarray(a)})["x"]
    mb = responses.response_moments({"x": jnp.asarray(b)})["x"]
    n, mean, m2 = responses.merge_moments(ma, mb)
    both = np.concatenate([a, b])
    assert int(n) == both.size
    np.testing.assert_allclose(mean, both.mean(), rtol=1e-5)
    np.testing.assert_allclose(np.sqrt(m2 / n), both.std(), rtol=1e-5)


def test_image_moments_pool_to_the_masked_two_pass_result():
    rng = np.random.default_rng(1)
    r = rng.normal(2.0, 3.0, (6, 5, 4, 8)) * rng.uniform(0.5, 2.0, 8)
    mask = np.array([True, False, True, True, False, True])
    per_image = responses.image_moments(jnp.asarray(r))
    kept = r[mask]
    n, mean, m2 = responses.pool_moments(per_image, per_channel=True, mask=jnp.asarray(mask))
    np.testing.assert_array_equal(n, np.full(8, kept.size // 8))
    np.testing.assert_allclose(mean, kept.mean((0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(m2, kept.var((0, 1, 2)) * kept.size / 8, rtol=1e-4)
    n, mean, m2 = responses.pool_moments(per_image, mask=jnp.asarray(mask))
    assert int(n) == kept.size
    np.testing.assert_allclose(np.sqrt(m2 / n), kept.std(), rtol=1e-5)
    np.testing.assert_allclose(mean, kept.mean(), rtol=1e-5)


def test_pooling_asks_for_float32_products():
    """The sums over images are products with the mask; on TPU a float32 product defaults to
    bfloat16 passes, which would round the counts and sums to 8 bits of mantissa."""
    per_image = responses.image_moments(jnp.ones((4, 3, 3, 8)))
    text = jax.jit(responses.pool_moments).lower(per_image).as_text()
    dots = re.findall(r"stablehlo\.dot_general.*", text)
    assert dots and all("precision = [HIGHEST, HIGHEST]" in d for d in dots), dots


def _rank4_reductions(lowered) -> int:
    """Reductions over a rank-4 tensor in a lowered program: each is a pass over an activation."""
    return len(re.findall(r"stablehlo\.reduce.*\(tensor<\d+x\d+x\d+x\d+xf32>", lowered.as_text()))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet20", "plain20", "resnet50"])
def test_moments_taken_in_cache_are_the_responses_moments(name, onednn):
    """With oneDNN's kernels the moments come from each conv's output as it is written, mapped
    through BN: the same numbers as reducing the captured responses, and no pass over them (the
    analysis program reduces no more activations than the forward pass, its global pooling)."""
    from resnet_jax.kernels import cpu
    model = resnet_jax.create_model(name, kernels=cpu.ONEDNN)
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    variables = perturbed_bn(jax.jit(model.init)(jax.random.key(1), x))
    in_cache = jax.jit(functools.partial(responses.capture_responses, model,
                                         reduce=responses.image_moments))
    from_responses = jax.jit(functools.partial(responses.capture_responses, model,
                                               reduce=lambda r: responses.image_moments(r)))
    got, want = in_cache(variables, x), from_responses(variables, x)
    assert list(got) == list(want)
    for layer in want:
        for g, w in zip(got[layer], want[layer]):
            np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5 * float(jnp.abs(w).max()),
                                       err_msg=layer)
    forward = jax.jit(functools.partial(model.apply, train=False)).lower(variables, x)
    assert _rank4_reductions(in_cache.lower(variables, x)) <= _rank4_reductions(forward)
    assert _rank4_reductions(from_responses.lower(variables, x)) > _rank4_reductions(forward)
