"""PyTorch state dicts -> checkpoints: both namings, the file readers, and every bad input."""
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

import resnet_jax
from resnet_jax import checkpoint, convert
from resnet_jax.errors import UserError
from resnet_jax.models import layout

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def torch():
    """CI installs torch for these tests (and sets RESNET_JAX_REQUIRE_SHARED=1): fail there,
    skip on a user's machine without it."""
    if os.environ.get("RESNET_JAX_REQUIRE_SHARED") == "1":
        import torch
        return torch
    return pytest.importorskip("torch")


def torchvision_resnet(torch, bottleneck, layers, num_classes):
    """torchvision.models.resnet's ResNet key for key (torchvision does not install beside this
    torch), with non-trivial BN statistics and affine parameters so that a mix-up of
    mean/var/scale/bias or of block order changes the logits. Eval mode."""
    nn = torch.nn

    class BasicBlock(nn.Module):
        expansion = 1

        def __init__(self, inplanes, planes, stride=1, downsample=None):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample = downsample

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(out)) + identity)

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, inplanes, planes, stride=1, downsample=None):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # v1.5: stride here
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes * 4)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = downsample

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            return self.relu(self.bn3(self.conv3(out)) + identity)

    class ResNet(nn.Module):
        def __init__(self, block):
            super().__init__()
            self.inplanes = 64
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
                setattr(self, f"layer{i + 1}", self._make_layer(block, planes, n, 1 if i == 0 else 2))
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512 * block.expansion, num_classes)

        def _make_layer(self, block, planes, blocks, stride):
            downsample = None
            if stride != 1 or self.inplanes != planes * block.expansion:
                downsample = nn.Sequential(
                    nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                    nn.BatchNorm2d(planes * block.expansion))
            blocks_ = [block(self.inplanes, planes, stride, downsample)]
            self.inplanes = planes * block.expansion
            blocks_ += [block(self.inplanes, planes) for _ in range(1, blocks)]
            return nn.Sequential(*blocks_)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    net = ResNet(Bottleneck if bottleneck else BasicBlock)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.weight.copy_(0.5 + 0.5 * torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
            if isinstance(m, Bottleneck):
                m.bn3.weight.mul_(0.3)  # keep 16 residual additions from blowing up the scale
    return net.eval()


def _check_logits(torch, net, loaded, image_size=64):
    x = np.random.default_rng(1).normal(size=(2, 3, image_size, image_size)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    got = jax.jit(lambda v, x: loaded.model.apply(v, x, train=False))(
        loaded.variables, x.transpose(0, 2, 3, 1))
    assert np.abs(want).max() > 0.1  # a dead net would match anything
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_torchvision_resnet18_pth_matches_torch(torch, tmp_path):
    net = torchvision_resnet(torch, False, (2, 2, 2, 2), num_classes=10)
    # as DataParallel training scripts save it: `module.` prefix inside {'state_dict': ...}
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}, "epoch": 3}, path)
    convert.convert(str(path), "resnet18", str(tmp_path / "ckpt"))
    loaded = checkpoint.load_model(str(tmp_path / "ckpt"))
    assert loaded.metadata["format"] == "torchvision"
    assert loaded.metadata["model_options"] == {"num_classes": 10}
    np.testing.assert_allclose(loaded.normalization.mean, convert.IMAGENET_NORMALIZATION.mean)
    _check_logits(torch, net, loaded)


@pytest.mark.slow
def test_torchvision_resnet50_npz_matches_torch(torch, tmp_path):
    net = torchvision_resnet(torch, True, (3, 4, 6, 3), num_classes=10)
    path = tmp_path / "resnet50.npz"
    np.savez(path, **{k: v.numpy() for k, v in net.state_dict().items()})
    convert.convert(str(path), "resnet50", str(tmp_path / "ckpt"))
    loaded = checkpoint.load_model(str(tmp_path / "ckpt"))
    assert loaded.metadata["model_options"]["stride_in_3x3"] is True
    _check_logits(torch, net, loaded)


def test_akamaster_layout_goes_into_the_models_blocks(akamaster_dir):
    state = convert.read_state_dict(str(akamaster_dir / "resnet20.npz"))
    variables, options, fmt = convert.convert_state_dict(state, "resnet20")
    assert fmt == "cifar" and options == {"num_classes": 10}
    # block i of stage s is `block{i}`, as the model holds it; OIHW -> HWIO
    np.testing.assert_array_equal(variables["params"]["stage2"]["block2"]["conv1"]["kernel"],
                                  state["layer2.2.conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(variables["batch_stats"]["stage3"]["block0"]["bn2"]["var"],
                                  state["layer3.0.bn2.running_var"])
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], state["linear.weight"].T)
    n_params = sum(x.size for x in jax.tree.leaves(variables["params"]))
    assert n_params == 269_722


# --- bad input: one line naming the problem

def _akamaster_state(akamaster_dir, depth=20):
    return convert.read_state_dict(str(akamaster_dir / f"resnet{depth}.npz"))


def test_state_dict_of_another_depth_names_keys_and_the_likely_model(akamaster_dir):
    with pytest.raises(UserError) as e:
        convert.convert_state_dict(_akamaster_state(akamaster_dir, 32), "resnet20")
    msg = str(e.value)
    assert "60 unexpected keys (layer1.3.bn1.bias" in msg and "pass --model resnet32" in msg
    assert "\n" not in msg
    with pytest.raises(UserError, match=r"missing keys \(layer1\.3\.bn1\.bias.*and 57 more\)"):
        convert.convert_state_dict(_akamaster_state(akamaster_dir, 20), "resnet32")


def test_missing_and_misshapen_keys_are_named(akamaster_dir):
    state = _akamaster_state(akamaster_dir)
    del state["layer2.1.bn1.running_var"]
    state["conv1.weight"] = np.zeros((16, 3, 5, 5), np.float32)
    with pytest.raises(UserError) as e:
        convert.convert_state_dict(state, "resnet20")
    msg = str(e.value)
    assert "1 missing keys (layer2.1.bn1.running_var)" in msg
    assert "1 keys of another shape (conv1.weight (16, 3, 5, 5) where resnet20 needs (16, 3, 3, 3))" in msg
    assert "unexpected" not in msg


def test_cifar_weights_into_an_imagenet_net_fail(akamaster_dir):
    with pytest.raises(UserError, match="does not fit resnet18: .*missing keys"):
        convert.convert_state_dict(_akamaster_state(akamaster_dir), "resnet18")


def test_bad_model_options(akamaster_dir):
    from resnet_jax import UnknownModelError
    with pytest.raises(UnknownModelError, match="shortcut must be"):
        convert.convert_state_dict(_akamaster_state(akamaster_dir), "resnet20", {"shortcut": "D"})
    with pytest.raises(UnknownModelError, match="unknown option 'widht'"):
        convert.convert_state_dict(_akamaster_state(akamaster_dir), "resnet20", {"widht": 2})
    # option B expects projection weights the option-A file does not have
    with pytest.raises(UserError, match=r"missing keys \(layer2\.0\.shortcut\.0\.weight"):
        convert.convert_state_dict(_akamaster_state(akamaster_dir), "resnet20", {"shortcut": "B"})
    with pytest.raises(UserError, match="not key=value"):
        convert.parse_options(["shortcut"])
    assert convert.parse_options(["shortcut=B", "num_classes=100"]) == {"shortcut": "B", "num_classes": 100}


def test_vgg_is_refused(akamaster_dir):
    with pytest.raises(UserError, match="not 'vgg19'"):
        convert.convert_state_dict(_akamaster_state(akamaster_dir), "vgg19")


def test_unreadable_sources(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="does not exist"):
        convert.read_state_dict(str(tmp_path / "nope.npz"))
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(UserError, match="unknown state dict file type"):
        convert.read_state_dict(str(tmp_path / "w.txt"))
    np.savez(tmp_path / "obj.npz", a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(UserError, match="without pickle"):
        convert.read_state_dict(str(tmp_path / "obj.npz"))
    np.savez(tmp_path / "other.npz", **{"features.0.weight": np.zeros(3)})
    with pytest.raises(UserError, match="unrecognised state dict"):
        convert.detect_format(convert.read_state_dict(str(tmp_path / "other.npz")))
    (tmp_path / "bad.pth").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="torch cannot read"):
        convert.read_state_dict(str(tmp_path / "bad.pth"))
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(UserError, match="needs PyTorch: pip install torch, or convert it to .npz"):
        convert.read_state_dict(str(tmp_path / "bad.pth"))


def _cli(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "resnet_jax.convert", *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.slow
def test_cli_converts_and_refuses_a_used_out(akamaster_dir, tmp_path):
    out = tmp_path / "ckpt"
    rc, stdout, stderr = _cli(akamaster_dir / "resnet20.npz", "--model", "resnet20", "--out", out)
    assert rc == 0, stderr
    assert "wrote resnet20" in stdout and stderr == ""
    assert "unchecked: " in stdout and "--data" in stdout
    rc, _, stderr = _cli(akamaster_dir / "resnet20.npz", "--model", "resnet20", "--out", out)
    assert rc == 2 and stderr.strip() == f"error: output directory {str(out)!r} is not empty; choose a new --out"


@pytest.mark.parametrize("args,message", [
    (["resnet32.npz", "--model", "resnet20"], "does not fit resnet20: 60 unexpected keys"),
    (["resnet20.npz", "--model", "resnet21"], "unknown model 'resnet21'; did you mean"),
])
def test_cli_bad_input_is_one_line(akamaster_dir, tmp_path, args, message):
    args = [akamaster_dir / args[0], *args[1:], "--out", tmp_path / "ckpt"]
    rc, stdout, stderr = _cli(*args)
    assert rc == 2
    assert stderr.startswith("error: ") and stderr.count("\n") == 1 and message in stderr, stderr
    assert not (tmp_path / "ckpt").exists()  # nothing half-written


def test_a_truncated_npz_is_one_line(tmp_path):
    np.savez(tmp_path / "full.npz", **{f"w{i}": np.zeros(1000, np.float32) for i in range(4)})
    data = (tmp_path / "full.npz").read_bytes()
    for size in (len(data) // 2, 100):
        (tmp_path / "cut.npz").write_bytes(data[:size])
        with pytest.raises(UserError, match=r"'.*cut.npz' is not a readable .npz \(BadZipFile") as e:
            convert.read_state_dict(str(tmp_path / "cut.npz"))
        assert "\n" not in str(e.value)


def _png_folder(root, split, classes, per_class=2):
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in classes:
        (root / split / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                root / split / c / f"{i}.png")
    return root


def test_converted_cifar_net_records_cifar10_classes_and_refuses_other_names(akamaster_dir,
                                                                            tmp_path):
    """PyTorch's tutorial names (plane, car, ...) sort in another order than CIFAR-10's: the
    converted net's labels would silently follow that order (28 % instead of 80 %)."""
    from resnet_jax import evaluate
    from resnet_jax.data import sources
    convert.convert(str(akamaster_dir / "resnet20.npz"), "resnet20", str(tmp_path / "ckpt"))
    loaded = checkpoint.load_model(str(tmp_path / "ckpt"))
    assert evaluate.model_classes(loaded) == sources.CIFAR10_CLASSES
    tutorial = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    root = _png_folder(tmp_path / "data", "test", tutorial, per_class=1)
    with pytest.raises(UserError, match="lacks the model's classes airplane, automobile"):
        sources.load(f"folder:{root}", "test", classes=evaluate.model_classes(loaded))
    with pytest.raises(UserError, match="--classes names 2 classes but"):
        convert.convert(str(akamaster_dir / "resnet20.npz"), "resnet20", str(tmp_path / "c2"),
                        classes=["a", "b"])


@pytest.mark.slow
def test_with_data_a_net_at_chance_level_is_refused_and_a_working_one_scored(
        akamaster_dir, cifar_jpeg, tmp_path):
    """ResNet-20's weights fit plain-20's shapes exactly (the shortcuts carry none): converted
    as plain20 it scored 10.00 % with exit 0."""
    data = f"folder:{cifar_jpeg}"
    with pytest.raises(UserError, match=r"converted as plain20 scores \d+\.\d % top-1 on 500 "
                                        r"images of .*, chance level \(10 %\).*nothing written"):
        convert.convert(str(akamaster_dir / "resnet20.npz"), "plain20", str(tmp_path / "p"),
                        data=data)
    assert not (tmp_path / "p").exists()
    checked = convert.convert(str(akamaster_dir / "resnet20.npz"), "resnet20",
                              str(tmp_path / "r"), data=data).checked
    assert checked["count"] == 500 and checked["top1"] > 0.6
    assert convert.convert(str(akamaster_dir / "resnet20.npz"), "resnet20",
                           str(tmp_path / "u")).checked is None  # unchecked, and the CLI says so


def test_out_naming_a_file_says_so(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match=r"--out '.*f' is a file; name a new directory"):
        convert.convert(str(tmp_path / "none.npz"), "resnet20", str(tmp_path / "f"))


def test_model_hints_agree_whichever_wrong_model_was_given():
    """A ResNet-20 with projection shortcuts was hinted plain20 -> resnet20 -> plain20."""
    model = resnet_jax.create_model("resnet20", shortcut="B")
    target = traverse_util.flatten_dict(layout.unstack_blocks(checkpoint.abstract_variables(model)))
    state = {convert._torch_name(path, "cifar"): np.zeros(convert._torch_shape(leaf.shape))
             for path, leaf in target.items()}
    for wrong in ("plain20", "resnet20"):
        with pytest.raises(UserError, match=r"pass --model resnet20 --option shortcut=B$"):
            convert.convert_state_dict(state, wrong)
    variables, options, _ = convert.convert_state_dict(state, "resnet20", {"shortcut": "B"})
    assert options["shortcut"] == "B"
