"""The zoo is the paper's: parameter counts, multiply-adds, structure, options, and errors."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import resnet_jax
from resnet_jax.models import layers, layout


def abstract_init(name, image_size=32, **options):
    model = resnet_jax.create_model(name, **options)
    return model, jax.eval_shape(model.init, jax.random.key(0),
                                 jnp.zeros((1, image_size, image_size, 3)))


def num_params(variables):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


# Sec. 4.2 with option A (identity shortcuts add no parameters, so plain nets count the same).
CIFAR_PARAMS = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962,
                1202: 19_421_274}


@pytest.mark.parametrize("depth", sorted(CIFAR_PARAMS))
@pytest.mark.parametrize("kind", ["resnet", "plain"])
def test_cifar_parameter_counts(kind, depth):
    _, variables = abstract_init(f"{kind}{depth}")
    assert num_params(variables) == CIFAR_PARAMS[depth]


def test_cifar_option_b_adds_projections_only_where_shape_changes():
    _, a = abstract_init("resnet20")
    _, b = abstract_init("resnet20", shortcut="B")
    # Two projections (16->32 and 32->64), each a 1x1 conv + BN (scale and bias).
    assert num_params(b) - num_params(a) == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    assert set(b["params"]["stage2"]["block0"]["shortcut"]) == {"conv", "bn"}
    assert "shortcut" not in b["params"]["stage1"]["block0"]


# torchvision's published counts; they hold for option B whatever the stride placement.
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
                      "resnet152": 60_192_808}


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_imagenet_v1_5_option_b_matches_torchvision(name):
    _, variables = abstract_init(name, 224, stride_in_3x3=True, shortcut="B")
    assert num_params(variables) == TORCHVISION_PARAMS[name]


def test_option_c_projects_every_shortcut():
    _, b = abstract_init("resnet34", 64)
    _, c = abstract_init("resnet34", 64, shortcut="C")
    assert num_params(c) > num_params(b)
    assert "shortcut" in c["params"]["stage1"]["block0"]
    assert c["params"]["stage1"]["blocks"]["shortcut"]["conv"]["kernel"].shape == (2, 1, 1, 64, 64)


def test_bottleneck_stride_placement():
    """Paper: the stride-2 sits in the first 1x1 conv; v1.5 moves it into the 3x3 conv."""
    shapes = {}
    for v15 in (False, True):
        model = resnet_jax.create_model("resnet50", stride_in_3x3=v15)
        x = jnp.zeros((1, 64, 64, 3))
        variables = jax.eval_shape(model.init, jax.random.key(0), x)
        _, state = jax.eval_shape(functools.partial(
            model.apply, capture_intermediates=True, mutable=["intermediates"]), variables, x)
        block = state["intermediates"]["stage2"]["block0"]
        shapes[v15] = (block["conv1"]["__call__"][0].shape[1], block["conv2"]["__call__"][0].shape[1])
    assert shapes[False] == (8, 8)   # 16x16 stage-1 maps halved by conv1
    assert shapes[True] == (16, 8)   # halved by conv2


def test_shortcut_a_subsamples_and_pads_new_channels_equally():
    x = jnp.arange(2 * 4 * 4 * 16, dtype=jnp.float32).reshape(2, 4, 4, 16)
    shortcut = layers.Shortcut(32, 2, "A", None, None)
    y = shortcut.apply({}, x)
    assert y.shape == (2, 2, 2, 32)
    np.testing.assert_array_equal(y[..., 8:24], x[:, ::2, ::2, :])
    assert not np.any(y[..., :8]) and not np.any(y[..., 24:])


def test_conv_padding_is_symmetric_at_stride_2():
    """PyTorch pads 1 on both sides of a 3x3/2 conv; XLA's 'SAME' would pad 0 before, 1 after."""
    conv = layers.Conv(1, (3, 3), 2)
    x = (jnp.arange(16, dtype=jnp.float32) + 1).reshape(1, 4, 4, 1)
    kernel = jnp.zeros((3, 3, 1, 1)).at[0, 0, 0, 0].set(1.0)  # reads the top-left neighbour
    y = conv.apply({"params": {"kernel": kernel}}, x)
    # out[i, j] = x[2i - 1, 2j - 1]: the padding row/column before the image, then x[1, 1].
    np.testing.assert_array_equal(y[0, :, :, 0], [[0.0, 0.0], [0.0, float(x[0, 1, 1, 0])]])


@pytest.mark.slow
def test_he_normal_init_scale():
    model = resnet_jax.create_model("resnet56")
    params = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))["params"]
    kernel = params["stage3"]["blocks"]["conv2"]["kernel"]  # (8, 3, 3, 64, 64)
    np.testing.assert_allclose(np.std(kernel), np.sqrt(2.0 / (9 * 64)), rtol=0.02)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet20", "plain20"])
def test_forward_backward_under_jit(name):
    model = resnet_jax.create_model(name)
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    variables = jax.jit(model.init)(jax.random.key(1), x)

    @jax.jit
    def loss(params):
        logits, _ = model.apply({**variables, "params": params}, x, train=True,
                                mutable=["batch_stats"])
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[:, 0])

    value, grads = jax.value_and_grad(loss)(variables["params"])
    assert np.isfinite(value)
    assert jax.tree.structure(grads) == jax.tree.structure(variables["params"])
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["stage2"]["blocks"]["conv1"]["kernel"]).sum()) > 0


@pytest.mark.slow
def test_plain_net_has_no_shortcut_addition():
    """The plain net is the residual net minus the identity: with the second BN of every block
    zeroed, a ResNet passes its input through while the plain net outputs zeros."""
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    out = {}
    for name in ("resnet20", "plain20"):
        model = resnet_jax.create_model(name, zero_init_last=True)
        variables = jax.jit(model.init)(jax.random.key(1), x)
        _, state = jax.jit(functools.partial(model.apply, capture_intermediates=True,
                                             mutable=["intermediates"]))(variables, x)
        out[name] = state["intermediates"]["stage1"]["block0"]["__call__"][0]
    assert not np.any(out["plain20"])
    assert np.any(out["resnet20"])


@pytest.mark.slow
def test_batch_sharded_over_devices_gives_the_same_logits():
    devices = jax.devices()
    assert len(devices) >= 2, "conftest asks for 8 CPU devices"
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    model = resnet_jax.create_model("resnet20")
    x = jax.random.normal(jax.random.key(0), (len(devices) * 2, 32, 32, 3))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    reference = apply(variables, x)
    sharded_x = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    replicated = jax.device_put(variables, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    result = apply(replicated, sharded_x)
    # Train-mode BN pools over the global batch, so the statistics (and logits) match.
    np.testing.assert_allclose(result[0], reference[0], rtol=1e-4, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 result[1], reference[1])


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = resnet_jax.create_model("resnet20", dtype=jnp.bfloat16)
    x = jnp.ones((2, 32, 32, 3))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
    logits, state = jax.jit(functools.partial(model.apply, capture_intermediates=True,
                                              mutable=["intermediates"]))(variables, x)
    assert logits.dtype == jnp.float32 and logits.shape == (2, 10)
    assert state["intermediates"]["stage1"]["block0"]["conv1"]["__call__"][0].dtype == jnp.bfloat16


@pytest.mark.slow
def test_bn_defaults_equal_pytorch():
    model = resnet_jax.create_model("resnet20")
    assert model.bn_momentum == 0.9 and model.bn_epsilon == 1e-5  # torch: momentum 0.1, eps 1e-5
    x = jax.random.normal(jax.random.key(0), (8, 32, 32, 3)) * 3 + 1
    variables = jax.jit(model.init)(jax.random.key(1), x)
    _, state = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(variables, x)
    stem = jnp.asarray(x)  # the stem BN sees the stem conv's output; recompute it
    conv_out = layers.Conv(16, (3, 3)).apply({"params": variables["params"]["conv1"]}, stem)
    np.testing.assert_allclose(state["batch_stats"]["bn1"]["mean"], 0.1 * conv_out.mean((0, 1, 2)),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name,image_size", [("resnet1202", 32), ("resnet152", 224), ("vgg19", 224),
                                              ("plain34", 224), ("resnet101", 224)])
def test_deep_nets_trace(name, image_size):
    model, variables = abstract_init(name, image_size)
    logits = jax.eval_shape(model.apply, variables, jnp.zeros((2, image_size, image_size, 3)))
    assert logits.shape == (2, 10 if image_size == 32 else 1000)


def test_registry_lists_every_network_of_the_paper():
    names = set(resnet_jax.list_models())
    expected = ({f"{k}{d}" for k in ("resnet", "plain") for d in (20, 32, 44, 56, 110, 1202)}
                | {f"resnet{d}" for d in (18, 34, 50, 101, 152)} | {"plain18", "plain34", "vgg19"})
    assert names == expected


def test_unknown_model_names_close_matches():
    with pytest.raises(resnet_jax.UnknownModelError) as e:
        resnet_jax.create_model("resnet21")
    message = str(e.value)
    assert "\n" not in message and "resnet20" in message


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(resnet_jax.UnknownModelError) as e:
        resnet_jax.create_model("resnet20", shortcutt="B")
    assert "shortcut" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(resnet_jax.UnknownModelError, match="shortcut must be"):
        resnet_jax.create_model("resnet20", shortcut="D")
    with pytest.raises(resnet_jax.UnknownModelError, match="stride_in_3x3"):
        resnet_jax.create_model("resnet20", stride_in_3x3=True)  # a bottleneck-only option


def test_num_classes_option():
    _, variables = abstract_init("resnet18", 64, num_classes=10)
    assert variables["params"]["fc"]["kernel"].shape == (512, 10)
    assert isinstance(resnet_jax.create_model("vgg19", batch_norm=True), nn.Module)


def test_layout_unstacks_every_scanned_block_in_depth_order_and_stacks_back():
    """`layout` is the one reading of a stage's `block0` + stacked `blocks`: block b is row b - 1,
    the blocks come out where they ran, and stacking gives the model's tree back exactly."""
    model = resnet_jax.create_model("resnet56", widths=(2, 4, 4))  # 9 blocks a stage
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                          shapes["params"])
    flat = layout.unstack_blocks(params)
    assert list(flat["stage2"]) == [f"block{b}" for b in range(9)]
    assert list(flat) == list(params)  # the stem, the stages and fc where they were
    stacked = params["stage2"]["blocks"]["conv1"]["kernel"]
    np.testing.assert_array_equal(flat["stage2"]["block3"]["conv1"]["kernel"], stacked[2])
    abstract = layout.unstack_blocks(shapes["params"])
    assert abstract["stage3"]["block8"]["bn2"]["scale"].shape == (4,)
    back = layout.stack_blocks(flat)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, back, params)
