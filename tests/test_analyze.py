"""resnet_jax.analyze: streamed statistics equal the materialised ones, batch-mode BN obeys its
closed form, the command writes its files, and each bad input is one line with nothing written."""
import csv
import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import resnet_jax
from resnet_jax import analyze, checkpoint, lines
from resnet_jax.models import layout
from resnet_jax.errors import UserError
from resnet_jax.responses import capture_responses

from conftest import refuse_write_probes

OPTIONS = dict(widths=(4, 8, 8))  # ResNet-20's 19 3x3 layers, few channels: fast on CPU
NORM = checkpoint.Normalization(mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
IMAGES = np.random.default_rng(0).integers(0, 256, (300, 32, 32, 3), dtype=np.uint8)


def _fan_in(shape):
    return np.prod(shape[-4:-1]) if len(shape) >= 4 else shape[0]  # conv (maybe stacked), dense


def _init(name, seed, options=OPTIONS):
    """Random He-scaled kernels and non-trivial BN (gamma, beta, running statistics), drawn in
    numpy from the model's shapes: nothing to compile."""
    model = resnet_jax.create_model(name, input_size=None, **options)  # 32x32 for every net
    rng = np.random.default_rng(seed)
    draw = dict(scale=lambda s: rng.uniform(0.3, 2.0, s), bias=lambda s: rng.normal(0, 0.7, s),
                var=lambda s: rng.uniform(0.5, 3.0, s), mean=lambda s: rng.normal(0, 0.3, s),
                kernel=lambda s: rng.normal(0, np.sqrt(2 / _fan_in(s)), s))
    variables = jax.tree_util.tree_map_with_path(
        lambda path, x: np.float32(draw[path[-1].key](x.shape)),
        checkpoint.abstract_variables(model))
    return model, variables


@pytest.fixture(scope="module")
def resnet():
    return _init("resnet20", 1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A ResNet, a plain net, a 'training workdir' with three steps, and a checkpoint whose
    metadata names another net than its weights."""
    root = tmp_path_factory.mktemp("ckpt")
    for name, seed, saved_as in (("resnet20", 0, "resnet20"), ("plain20", 1, "plain20"),
                                 ("resnet20", 2, "resnet32")):
        checkpoint.save_model(str(root / f"{name}-as-{saved_as}"), _init(name, seed)[1],
                              model_name=saved_as,
                              model_options=OPTIONS, normalization=NORM)
    meta = checkpoint.metadata("resnet20", OPTIONS, NORM)
    with checkpoint.manager(str(root / "run"), async_save=False) as mngr:
        for step in (0, 50, 100):
            mngr.save(step, args=ocp.args.Composite(
                model=ocp.args.StandardSave(layout.to_checkpoint(_init("resnet20", step)[1])),
                metadata=ocp.args.JsonSave(meta)))
    return root


def _two_pass(model, variables, images, per_channel):
    """float64 numpy over every response at once: the reference the stream must match."""
    responses = capture_responses(model, variables, NORM(images))
    out = {}
    for name, r in responses.items():
        r = np.asarray(r, np.float64)
        if per_channel:
            flat = r.reshape(-1, r.shape[-1])
            out[name] = (flat.std(0).mean(), flat.mean(0).mean())
        else:
            out[name] = (r.std(), r.mean())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("pool", analyze.POOLS)
def test_streamed_statistics_equal_two_pass_over_all_responses(resnet, pool):
    model, variables = resnet
    # 300 images in batches of 128: the last batch holds 44 images and 84 masked copies.
    rows = analyze.response_statistics(model, variables, NORM, IMAGES,
                                       analyze.Settings(pool=pool, batch_size=128))
    expected = _two_pass(model, variables, IMAGES, per_channel=pool == "channel")
    assert [r["layer"] for r in rows] == list(expected)
    assert len(rows) == 19
    for row in rows:
        std, mean = expected[row["layer"]]
        np.testing.assert_allclose(row["std"], std, rtol=1e-5, err_msg=row["layer"])
        np.testing.assert_allclose(row["mean"], mean, rtol=1e-5, atol=1e-6 * std,
                                   err_msg=row["layer"])
    assert rows[0]["count"] == 300 * 32 * 32 * 4  # every image once, padding left out


def test_rows_name_stage_block_and_kernel_and_drop_the_stem(resnet):
    model, variables = resnet
    settings = analyze.Settings(include_stem=False, batch_size=300)
    rows = analyze.response_statistics(model, variables, NORM, IMAGES[:40], settings)
    assert [r["layer_index"] for r in rows] == list(range(1, 19))
    first, scanned, last = rows[0], rows[3], rows[-1]
    assert (first["layer"], first["stage"], first["block"], first["kernel"]) == \
        ("stage1/block0/conv1", "stage1", 0, "3x3x4x4")
    assert (scanned["layer"], scanned["block"], scanned["kernel"]) == \
        ("stage1/block1/conv2", 1, "3x3x4x4")
    assert (last["layer"], last["stage"], last["block"], last["kernel"]) == \
        ("stage3/block2/conv2", "stage3", 2, "3x3x8x8")


@pytest.mark.slow
def test_rows_keep_depth_order_past_the_tenth_block():
    """ResNet-110's 18 blocks a stage: block10 comes after block9, not after block1 (as the keys
    of a dict returned from jit come back, sorted), or Figure 7's layer-order curve is shuffled."""
    model, variables = _init("resnet110", 0, dict(widths=(2, 4, 4)))
    rows = analyze.response_statistics(model, variables, NORM, IMAGES[:8],
                                       analyze.Settings(batch_size=8))
    assert [r["layer"] for r in rows] == ["conv1"] + [
        f"stage{s}/block{b}/conv{c}" for s in (1, 2, 3) for b in range(18) for c in (1, 2)]


@pytest.mark.slow
@pytest.mark.parametrize("name, options, kernels", [
    # VGG-19's sixteen 3x3 convs (no BN: the response is the conv's output), shrunk in width.
    ("vgg19", dict(stages=((4, 2), (8, 2), (8, 4), (8, 4), (8, 4)), num_classes=10),
     ["3x3x3x4", "3x3x4x4"] + ["3x3x4x8"] + ["3x3x8x8"] * 13),
    # ResNet-50's bottlenecks: the 3x3 conv of each of its 16 blocks, the 7x7 stem left out.
    ("resnet50", dict(widths=(4, 8, 8, 8), num_classes=10),
     ["3x3x4x4"] * 3 + ["3x3x8x8"] * 13),
])
def test_every_kind_of_net_gives_its_3x3_layers(name, options, kernels):
    model, variables = _init(name, 3, options)
    rows = analyze.response_statistics(model, variables, NORM, IMAGES[:6],
                                       analyze.Settings(batch_size=4))
    assert [r["kernel"] for r in rows] == kernels
    assert all(np.isfinite(r["std"]) and r["std"] > 0 for r in rows)


def _bn_of(params, layer):
    """(gamma, beta) of the BN that follows `layer`'s conv, by per-block names."""
    *scope, conv = layer.split("/")
    node = layout.unstack_blocks(params)
    for p in scope:
        node = node[p]
    bn = node["bn" + conv[len("conv"):]]
    return np.asarray(bn["scale"]), np.asarray(bn["bias"])


@pytest.mark.slow
def test_batch_bn_std_is_the_closed_form_of_gamma_and_beta(resnet):
    model, variables = resnet
    # Batches of 256: the last holds 44 images; padding would skew its statistics if it ran.
    rows = analyze.response_statistics(model, variables, NORM, IMAGES,
                                       analyze.Settings(batch_norm="batch", batch_size=256))
    stds = []
    for row in rows:
        gamma, beta = _bn_of(variables["params"], row["layer"])
        expected = np.sqrt(np.mean(gamma.astype(np.float64) ** 2) + np.var(beta.astype(np.float64)))
        # BN's epsilon shrinks each channel's variance by var / (var + 1e-5).
        np.testing.assert_allclose(row["std"], expected, rtol=2e-4, err_msg=row["layer"])
        np.testing.assert_allclose(row["mean"], np.mean(beta), atol=1e-4, err_msg=row["layer"])
        stds.append(row["std"])
    assert np.ptp(stds) > 0.1  # the layers differ, so matching each one is a real check


def _analyze(tmp_path, specs, **kw):
    kw = dict(data="synthetic:24", split="test", out=str(tmp_path / "out"),
              settings=analyze.Settings(batch_size=16)) | kw
    return analyze.analyze(specs, **kw)


@pytest.mark.parametrize("case, message", [
    ("no_checkpoint", "no checkpoint in"),
    ("mismatch", "resnet32"),
    ("unknown_split", "split 'validation' not found"),
    ("unknown_path", "does not exist"),
    ("label_twice", "label 'A' given twice"),
    ("baseline", "--baseline 'C' is none of the labels"),
    ("num_images", "--num_images must be in 1..24"),
])
def test_bad_input_is_one_clear_error_and_writes_nothing(checkpoints, tmp_path, case, message):
    r20 = str(checkpoints / "resnet20-as-resnet20")
    specs, kw = [r20], {}
    if case == "no_checkpoint":
        (tmp_path / "empty").mkdir()
        specs = [str(tmp_path / "empty")]
    elif case == "mismatch":
        specs = [str(checkpoints / "resnet20-as-resnet32")]
    elif case in ("unknown_split", "unknown_path"):
        (tmp_path / "imgs" / "test" / "cat").mkdir(parents=True)
        root = tmp_path / ("imgs" if case == "unknown_split" else "nowhere")
        kw = dict(data=f"folder:{root}", split="validation")
    elif case == "label_twice":
        specs = [r20 + "=A", str(checkpoints / "plain20-as-plain20") + "=A"]
    elif case == "baseline":
        specs, kw = [r20 + "=A", str(checkpoints / "plain20-as-plain20") + "=B"], dict(baseline="C")
    elif case == "num_images":
        kw = dict(num_images=25)
    with pytest.raises(UserError, match=message):
        _analyze(tmp_path, specs, **kw)
    assert not (tmp_path / "out").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".analyze-")]


def _cli(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "resnet_jax.analyze", *args],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_command_writes_tables_figures_and_the_curves_over_training(checkpoints, tmp_path):
    out = tmp_path / "fig"
    proc = _cli(str(checkpoints / "plain20-as-plain20"), str(checkpoints / "run"),
                "--data", "synthetic:40", "--batch_size", "16", "--over_training",
                "--baseline", "plain-20", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout.splitlines()
    assert table[0].split()[:3] == ["model", "layers", "mean"]
    body = {line.split()[0]: line.split()[1:] for line in table[1:3]}
    assert set(body) == {"plain-20", "ResNet-20"}  # labels default to the nets' names
    assert body["plain-20"][0] == "19" and body["plain-20"][-1] == "1.000"
    for label in body:
        with open(out / f"{label}.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 19
        assert set(analyze.COLUMNS) <= set(rows[0])
        meta = json.loads((out / f"{label}.json").read_text())
        assert meta["num_images"] == 40 and meta["bn"] == "inference" and len(meta["layers"]) == 19
        assert [r["std"] for r in meta["layers"]] == pytest.approx([float(r["std"]) for r in rows])
    resnet_mean, ratio = float(body["ResNet-20"][1]), float(body["ResNet-20"][-1])
    assert ratio == pytest.approx(resnet_mean / float(body["plain-20"][1]), rel=2e-3)
    assert json.loads((out / "ResNet-20.json").read_text())["step"] == 100  # the latest
    with open(out / "ResNet-20_over_training.csv") as f:
        by_step = {}
        for r in csv.DictReader(f):
            by_step.setdefault(int(r["step"]), []).append(float(r["std"]))
    assert sorted(by_step) == [0, 50, 100] and all(len(v) == 19 for v in by_step.values())
    assert by_step[0] != by_step[100]  # each step's own weights, not the latest's thrice
    with open(out / "ResNet-20.csv") as f:
        assert by_step[100] == pytest.approx([float(r["std"]) for r in csv.DictReader(f)])
    for stem in ("figure7", "ResNet-20_over_training", "plain-20_over_training"):
        for ext in ("png", "pdf"):
            assert (out / f"{stem}.{ext}").stat().st_size > 1000
    assert (out / "table.txt").read_text().splitlines() == table[:3]


@pytest.mark.slow
def test_command_bad_input_prints_one_line_and_exits_non_zero(checkpoints, tmp_path):
    r20, p20 = str(checkpoints / "resnet20-as-resnet20"), str(checkpoints / "plain20-as-plain20")
    proc = _cli(f"{r20}=A", f"{p20}=A",
                "--data", "synthetic:8", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: label 'A' given twice ({r20!r} and {p20!r}); name each as PATH=LABEL"]
    assert not (tmp_path / "out").exists()


def test_non_finite_responses_fail_naming_the_checkpoint(tmp_path):
    """Negative running variances (finite weights, so the checkpoint verifies) make every BN
    response NaN; the command printed `nan` stds without a word."""
    model, variables = _init("resnet20", 0)
    variables = jax.tree_util.tree_map_with_path(
        lambda path, x: -np.abs(x) if path[-1].key == "var" else x, variables)
    path = str(tmp_path / "nan")
    checkpoint.save_model(path, variables, model_name="resnet20", model_options=OPTIONS,
                          normalization=NORM, step=3)
    with pytest.raises(UserError, match=rf"checkpoint '{path}' step 3: the response of conv1 has "
                                        r"std nan \(19 of 19 layers not finite\); nothing written"):
        _analyze(tmp_path, [path])
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_progress_and_a_rerun_skips_the_checkpoints_already_done(checkpoints, tmp_path, capsys,
                                                                 monkeypatch):
    """Killed after its first checkpoint, a rerun with the same arguments computes only the other
    two and writes what one uninterrupted run writes; other arguments compute everything."""
    run = [str(checkpoints / "run")]
    _analyze(tmp_path / "whole", run, over_training=True)
    whole = (tmp_path / "whole" / "out" / "ResNet-20_over_training.csv").read_text()
    err = capsys.readouterr().err.splitlines()
    ends = [line for line in err if "ETA 0:00:00; all: ETA" in line]  # each checkpoint's last
    assert [line.split(":")[1].strip() for line in ends] == [
        f"ResNet-20 step {s} ({i}/3)" for i, s in ((1, 0), (2, 50), (3, 100))]
    assert ends[-1].endswith("all: ETA 0:00:00") and "24/24 images" in ends[-1]

    computed, real = [], analyze.stream_moments

    def killed_after_one(fn, variables, images, settings, progress=None):
        if computed:
            raise KeyboardInterrupt
        computed.append(1)
        return real(fn, variables, images, settings, progress)

    monkeypatch.setattr(analyze, "stream_moments", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        _analyze(tmp_path, run, over_training=True)
    assert not (tmp_path / "out" / "ResNet-20_over_training.csv").exists()
    capsys.readouterr()

    steps = []
    monkeypatch.setattr(analyze, "stream_moments", lambda fn, variables, *a: (
        steps.append(1), real(fn, variables, *a))[1])
    _analyze(tmp_path, run, over_training=True)
    assert len(steps) == 2
    assert "analyze: ResNet-20 step 0 is in" in capsys.readouterr().err
    assert (tmp_path / "out" / "ResNet-20_over_training.csv").read_text() == whole
    _analyze(tmp_path, run, over_training=True, num_images=20)  # another key: all again
    assert len(steps) == 5


def test_kept_rows_come_back_only_for_the_same_key(tmp_path):
    path = analyze._kept_path(str(tmp_path / "out"), "A", 1)
    assert path == f"{tmp_path}/out/.finished/A/1.json"
    assert analyze._kept(path, {"x": 1}) is None
    lines.write_json(path, dict(key={"x": 1, "sums": {"p": 3}}, value=[{"std": 0.5}]))
    assert analyze._kept(path, {"x": 1, "sums": {"p": 3}}) == [{"std": 0.5}]
    assert analyze._kept(path, {"x": 1, "sums": {"p": 4}}) is None  # the checkpoint changed
    (tmp_path / "out" / ".finished" / "A" / "1.json").write_text('{"key": {"x": 1}, "val')
    assert analyze._kept(path, {"x": 1}) is None  # cut short: computed again
    assert analyze._kept_path("gs://b/fig7/", "A", 1) == "gs://b/fig7/.finished/A/1.json"


def test_an_unwritable_out_is_one_line_before_any_checkpoint_is_computed(checkpoints, tmp_path,
                                                                          monkeypatch):
    """A local --out that cannot be written was found after the first checkpoint's statistics
    were computed, as a traceback."""
    monkeypatch.setattr(analyze, "stream_moments", lambda *a: pytest.fail("computed"))
    r20 = [str(checkpoints / "resnet20-as-resnet20")]
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"--out '.*file' is a file; name a directory"):
        _analyze(tmp_path, r20, out=str(tmp_path / "file"))
    with pytest.raises(UserError, match=r"--out '.*file/out' lies under the file '.*file'"):
        _analyze(tmp_path, r20, out=str(tmp_path / "file" / "out"))
    refuse_write_probes(monkeypatch)
    with pytest.raises(UserError, match=r"cannot write in --out '.*out' \(Read-only file system\)"):
        _analyze(tmp_path, r20)
    assert sorted(os.listdir(tmp_path)) == ["file"]
