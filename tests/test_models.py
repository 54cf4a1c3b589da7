"""The zoo is the paper's: parameter counts, multiply-adds, structure, options, and errors."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import resnet_jax
from resnet_jax.models import layers, layout


def abstract_init(name, image_size=32, **options):
    model = resnet_jax.create_model(name, input_size=None, **options)  # any size: structure only
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
    assert c["params"]["stage1"]["block2"]["shortcut"]["conv"]["kernel"].shape == (1, 1, 64, 64)


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
    kernel = np.stack([params["stage3"][f"block{b}"]["conv2"]["kernel"] for b in range(1, 9)])
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
    assert float(jnp.abs(grads["stage2"]["block1"]["conv1"]["kernel"]).sum()) > 0


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


@pytest.mark.parametrize("name,separate", [("resnet20", 2), ("resnet56", 8), ("plain110", 17),
                                           ("resnet152", 35)])
def test_stages_of_up_to_35_identical_blocks_are_separate_modules(name, separate):
    """Each identical block its own module (no stacked parameters: they cost a slice per
    parameter and block, and a concatenate per gradient, in every compile)."""
    _, shapes = abstract_init(name, 64)
    for stage in shapes["params"].values():
        if "block0" in stage:
            assert layout.SCANNED not in stage
    deepest = max((s for s in shapes["params"].values() if "block0" in s), key=len)
    assert set(deepest) == {f"block{b}" for b in range(separate + 1)}  # eval_shape sorts keys


def test_resnet1202_stages_stay_one_scan():
    _, shapes = abstract_init("resnet1202")
    stage = shapes["params"]["stage2"]
    assert list(stage) == ["block0", layout.SCANNED]
    assert stage[layout.SCANNED]["conv1"]["kernel"].shape == (199, 3, 3, 32, 32)


def _random(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


def test_checkpoint_layout_stacks_identical_blocks_and_back():
    """`to_checkpoint` stacks block b into row b - 1 of `blocks`; `from_checkpoint` gives the
    model's tree back exactly, inside an optimizer state (namedtuples) too, and for abstract
    values with their sharding."""
    model, shapes = abstract_init("resnet56", 8, widths=(2, 4, 4))  # 9 blocks a stage
    params = _random(shapes["params"])
    opt_state = optax.trace(0.9).init(params)
    tree = {"params": params, "opt_state": (optax.EmptyState(), opt_state)}
    stored = layout.to_checkpoint(tree)
    kernel = stored["params"]["stage2"][layout.SCANNED]["conv1"]["kernel"]
    assert kernel.shape == (8, 3, 3, 4, 4)
    assert list(stored["params"]["stage2"]) == ["block0", layout.SCANNED]
    np.testing.assert_array_equal(kernel[2], params["stage2"]["block3"]["conv1"]["kernel"])
    trace = stored["opt_state"][1].trace["stage3"][layout.SCANNED]["bn2"]["scale"]
    assert type(stored["opt_state"][1]) is type(opt_state) and trace.shape == (8, 4)
    back = layout.from_checkpoint(stored)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    jax.tree.map(np.testing.assert_array_equal, back, tree)
    assert layout.unstack_blocks(stored)["params"]["stage2"].keys() == params["stage2"].keys()

    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(jax.devices()[:1], ("data",)),
                                          jax.sharding.PartitionSpec())
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                            shapes)
    stored_abstract = layout.to_checkpoint(abstract)
    leaf = stored_abstract["params"]["stage1"][layout.SCANNED]["conv2"]["kernel"]
    assert leaf.shape == (8, 3, 3, 2, 2) and leaf.sharding.spec == jax.sharding.PartitionSpec(None)
    assert (jax.tree.map(lambda s: s.shape, layout.from_checkpoint(stored_abstract))
            == jax.tree.map(lambda s: s.shape, abstract))


def test_checkpoint_layout_of_a_scanned_net_is_its_own():
    _, shapes = abstract_init("resnet1202")
    assert layout.to_checkpoint(shapes) == shapes
    assert layout.from_checkpoint(shapes) == shapes


def test_unstack_blocks_names_every_block_in_depth_order():
    """Per-block names whatever the model holds: block b is row b - 1 of a scan's `blocks`."""
    _, shapes = abstract_init("resnet1202")
    flat = layout.unstack_blocks(shapes["params"])
    assert list(flat["stage2"]) == [f"block{b}" for b in range(200)]
    assert list(flat) == list(shapes["params"])  # the stem, the stages and fc where they were
    assert flat["stage3"]["block199"]["bn2"]["scale"].shape == (64,)
    _, per_block = abstract_init("resnet20")
    assert layout.unstack_blocks(per_block) == per_block


# ---------------------------------------------------------------------------------------------
# One way to call every net, and misuse refused in one line


# One net of each family in the quick tier; the deeper ones take seconds each to trace.
QUICK = ("resnet20", "plain20", "resnet18", "plain18", "resnet1202", "vgg19")


@pytest.mark.parametrize("name", [n if n in QUICK else pytest.param(n, marks=pytest.mark.slow)
                                  for n in resnet_jax.list_models()])
def test_every_net_takes_the_same_calls(name):
    """init, apply in eval and train mode, features and capture_responses, the same for every
    net of the zoo (VGG included: no BN, dropout); traced abstractly at the smallest size."""
    model = resnet_jax.create_model(name, input_size=None, num_classes=7)
    key, x = jax.random.key(0), jnp.zeros((2, 32, 32, 3))
    variables = jax.eval_shape(model.init, key, x)
    rngs = {"dropout": key}
    logits = jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
    trained, updates = jax.eval_shape(functools.partial(
        model.apply, train=True, mutable=["batch_stats"], rngs=rngs), variables, x)
    assert logits.shape == trained.shape == (2, 7)
    assert jax.tree.structure(dict(updates).get("batch_stats", {})) == jax.tree.structure(
        dict(variables).get("batch_stats", {}))
    features = jax.eval_shape(functools.partial(model.apply, features=True), variables, x)
    assert features["pooled"].shape[0] == 2  # eval_shape sorts the keys
    assert sorted(k for k in features if k != "pooled") == [f"stage{s}" for s in
                                                           range(1, len(features))]
    for train in (False, True):
        captured = jax.eval_shape(functools.partial(
            resnet_jax.capture_responses, model, train=train, rngs=rngs), variables, x)
        assert len(captured) >= 16


@pytest.fixture(scope="module")
def resnet20():
    model = resnet_jax.create_model("resnet20", widths=(2, 4, 4))
    return model, model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


@pytest.mark.parametrize("call, message", [
    (lambda m, v: m.apply(v, jnp.ones((2, 32, 32, 3)), mutable=["batch_stats"]),
     r"apply\(\.\.\., mutable=\['batch_stats'\]\) without train=True computes in eval mode and "
     "leaves BN statistics unchanged; pass train=True"),
    (lambda m, v: m.apply(v, jnp.ones((2, 32, 32, 3)), train=True),
     r"train=True updates BN statistics: apply with mutable=\['batch_stats'\]"),
    (lambda m, v: m.apply(v, np.zeros((2, 32, 32, 3), np.uint8)),
     r"takes normalised float images, not uint8: x = resnet_jax.preprocessing\(name\)\(images\)"),
    (lambda m, v: m.apply(v, np.zeros((2, 32, 32, 3), np.int8)), "not int8"),
    (lambda m, v: m.apply(v, jnp.ones((2, 3, 32, 32))),
     r"takes NHWC images \[N, H, W, 3\]; these \(2, 3, 32, 32\) look NCHW"),
    (lambda m, v: m.apply(v, jnp.ones((2, 32, 32, 1))), "takes RGB images, 3 channels on the "
     "last axis, not 1"),
    (lambda m, v: m.apply(v, jnp.ones((32, 32, 3))), r"a single image: x\[None\]"),
    (lambda m, v: jax.jit(m.apply)(v, jnp.ones((2, 224, 224, 3))),
     r"expects 32x32 images, not 224x224: resize them, or create_model\(\.\.\., "
     "input_size=None\\)"),
])
def test_misuse_is_refused_in_one_line(resnet20, call, message):
    with pytest.raises(resnet_jax.ModelUsageError, match=message) as e:
        call(*resnet20)
    assert len(str(e.value).splitlines()) == 1  # jax adds its traceback note as a note


def test_explicit_training_mode_updates_statistics(resnet20):
    model, variables = resnet20
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), updates["batch_stats"],
                           variables["batch_stats"])
    assert all(jax.tree.leaves(changed))


def test_vgg_training_needs_a_dropout_key():
    model = resnet_jax.create_model("vgg19", input_size=None, num_classes=3)
    x = jnp.zeros((1, 32, 32, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    with pytest.raises(resnet_jax.ModelUsageError, match=r"VGG trains with dropout: pass "
                       r"rngs=\{'dropout': key\}"):
        jax.eval_shape(functools.partial(model.apply, train=True, mutable=["batch_stats"]),
                       variables, x)


def test_create_model_names_options_and_sizes():
    model = resnet_jax.create_model("resnet20", name="backbone")
    assert model.name == "backbone" and model.input_size == 32
    assert resnet_jax.create_model("resnet50").input_size is None  # fully convolutional
    assert resnet_jax.create_model("vgg19").input_size == 224  # its dense layers fix the size
    with pytest.raises(resnet_jax.UnknownModelError, match="'depth' is fixed by the model's name, "
                       r"not an option of 'resnet20'.*; valid options: bn_epsilon, bn_momentum, "
                       "dtype, num_classes, param_dtype, shortcut, widths, zero_init_last$"):
        resnet_jax.create_model("resnet20", depth=56)
    with pytest.raises(resnet_jax.UnknownModelError, match=r"unknown option 'widht' for model "
                       r"'resnet20' \(did you mean 'widths'\?\); valid options: bn_epsilon,"):
        resnet_jax.create_model("resnet20", widht=(1, 2, 3))


def test_each_net_carries_its_preprocessing():
    cifar, imagenet = resnet_jax.preprocessing("resnet20"), resnet_jax.preprocessing("resnet50")
    assert (cifar.input_size, imagenet.input_size) == (32, 224)
    assert resnet_jax.preprocessing("vgg19") == imagenet
    x = cifar(np.full((1, 32, 32, 3), 255, np.uint8))
    np.testing.assert_allclose(x[0, 0, 0], 1 - np.asarray(cifar.mean), rtol=1e-6)


def test_list_models_takes_a_pattern():
    assert resnet_jax.list_models("plain*") == ["plain18", "plain20", "plain32", "plain34",
                                                "plain44", "plain56", "plain110", "plain1202"]
    assert resnet_jax.list_models("vgg*") == ["vgg19"] and resnet_jax.list_models("x*") == []
    assert len(resnet_jax.list_models()) == 20


@pytest.mark.parametrize("widths", [(), (0, 8, 16), (-4, 8, 16), "abc", (4, 8), (4, 8, 16, 32),
                                    (4.0, 8, 16)])
def test_widths_are_one_positive_integer_per_stage(widths):
    """They failed after the data loaded (IndexError, ZeroDivisionError, TypeError), or trained
    a two- or four-stage net under the name resnet20."""
    with pytest.raises(resnet_jax.UnknownModelError, match=r"widths must be 3 positive integers"):
        resnet_jax.create_model("resnet20", widths=widths)
    assert resnet_jax.create_model("resnet20", widths=[4, 8, 16]).widths == [4, 8, 16]


def test_options_are_checked_without_building_a_net(monkeypatch):
    """create_model built a second module only to count the stages that `widths` must match."""
    from resnet_jax.models import cifar, registry
    built, init = [], cifar.CifarResNet.__post_init__
    monkeypatch.setattr(cifar.CifarResNet, "__post_init__",
                        lambda self: built.append(1) or init(self))
    registry.check_options("resnet20", dict(widths=(4, 8, 16), shortcut="B"))
    assert built == []
    resnet_jax.create_model("resnet20", widths=(4, 8, 16))
    assert built == [1]
    with pytest.raises(resnet_jax.UnknownModelError, match="widths must be 4 positive integers"):
        registry.check_options("resnet50", dict(widths=(4, 8, 16)))
