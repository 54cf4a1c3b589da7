"""Evaluation: the whole split counted once, converted PyTorch nets reach PyTorch's accuracy."""
import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import resnet_jax
from resnet_jax import checkpoint, convert, evaluate, lines, storage
from resnet_jax.data import sources
from resnet_jax.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]

# Top-1 of the akamaster nets on ../shared/data/cifar10-jpeg/test as PyTorch computes it with the
# same weights (its README and ../shared/bench/torch_cifar.py accuracy): the shallowest and the
# deepest, each a full pass over the 10,000 images (ResNet-32 and -44, 82.56 and 82.67 in
# PyTorch, convert the same way).
TORCH_TOP1 = {"resnet20": 81.03, "resnet56": 83.20}


def _loaded(akamaster_dir, name):
    """Converted weights as load_model hands them back, without a round trip through disk."""
    state = convert.read_state_dict(str(akamaster_dir / f"{name}.npz"))
    variables, options, _ = convert.convert_state_dict(state, name)
    return checkpoint.LoadedModel(resnet_jax.create_model(name, **options), variables,
                                  convert.IMAGENET_NORMALIZATION, {"model": name}, 0)


@pytest.mark.slow
def test_converted_akamaster_nets_reach_pytorch_top1(akamaster_dir, cifar_jpeg, tmp_path):
    test = sources.load(f"folder:{cifar_jpeg}", "test")
    assert len(test) == 10_000
    measured = {}
    for name, want in TORCH_TOP1.items():
        out = str(tmp_path / name)
        convert.convert(str(akamaster_dir / f"{name}.npz"), name, out)
        result = evaluate.evaluate(checkpoint.load_model(out), test, batch_size=500, progress=None)
        assert result["count"] == 10_000
        measured[name] = 100 * result["top1"]
        assert result["top1"] <= result["top5"] <= 1
    print("top-1 on cifar10-jpeg/test:", {k: round(v, 2) for k, v in measured.items()})
    for name, want in TORCH_TOP1.items():
        assert abs(measured[name] - want) <= 0.05, (name, measured[name], want)


@pytest.mark.slow
def test_every_image_counts_once_whatever_the_batch_size(akamaster_dir):
    loaded = _loaded(akamaster_dir, "resnet20")
    data = sources.load("synthetic:37", "test")
    logits = np.asarray(loaded.model.apply(loaded.variables, loaded.normalization(data.images)))
    order = np.argsort(-logits, axis=1, kind="stable")
    want1 = int((order[:, 0] == data.labels).sum())
    want5 = int((order[:, :5] == data.labels[:, None]).any(1).sum())
    for batch_size in (16, 37, 64):  # padded last batch, exact fit, one padded batch
        seen = []
        r = evaluate.evaluate(loaded, data, batch_size, progress_every=1,
                              progress=lambda done, total, s: seen.append((done, total)))
        assert (r["count"], r["correct_top1"], r["correct_top5"]) == (37, want1, want5)
        assert r["top1"] == want1 / 37
        assert seen[-1] == (37, 37) and len(seen) == -(-37 // batch_size)


def test_labels_beyond_the_model_are_refused(akamaster_dir):
    loaded = _loaded(akamaster_dir, "resnet20")
    data = sources.Dataset(np.zeros((2, 32, 32, 3), np.uint8), np.array([3, 12], np.int32),
                           sources.synthetic_classes(10), "x")
    with pytest.raises(UserError, match="has label 12 but the model has 10 classes"):
        evaluate.evaluate(loaded, data)


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "sub" / "r.json"
    lines.write_json(str(path), {"top1": 0.5})
    lines.write_json(str(path), {"top1": 0.25})
    assert json.loads(path.read_text()) == {"top1": 0.25}
    assert os.listdir(path.parent) == ["r.json"]  # no temp file left behind
    with pytest.raises(TypeError):
        lines.write_json(str(path), {"x": object()})
    assert json.loads(path.read_text()) == {"top1": 0.25}  # a failed write keeps the old file
    assert os.listdir(path.parent) == ["r.json"]


def _cli(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "resnet_jax.evaluate", *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_writes_json_and_keeps_stderr_clean(akamaster_dir, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    convert.convert(str(akamaster_dir / "resnet20.npz"), "resnet20", ckpt)
    out = tmp_path / "r.json"
    proc = _cli("--checkpoint", ckpt, "--step", 0, "--data", "synthetic:50", "--batch_size", 32,
                "--json", out)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["count"] == 50 and result["model"] == "resnet20" and result["step"] == 0
    assert 0 <= result["top1"] <= result["top5"] <= 1
    assert "top-1" in proc.stdout
    # progress only: no orbax chatter about the read-only directory, no warnings
    lines = proc.stderr.splitlines()
    assert lines and all(line.startswith("evaluate: ") for line in lines), proc.stderr
    assert lines[-1].startswith("evaluate: 50/50 images") and lines[-1].endswith("ETA 0:00:00")


def test_cli_missing_checkpoint_is_one_line(tmp_path):
    proc = _cli("--checkpoint", tmp_path / "nope", "--data", "synthetic:8")
    assert proc.returncode == 2
    assert proc.stderr == f"error: checkpoint directory {str(tmp_path / 'nope')!r} does not exist\n"


def _small_checkpoint(path, classes=None, var=1.0):
    """A 4/8/16-wide ResNet-20 saved as evaluate reads it; `var` is every BN running variance."""
    import jax
    model = resnet_jax.create_model("resnet20", widths=(4, 8, 16), num_classes=len(classes or "0123456789"))
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map_with_path(
        lambda p, s: (np.full(s.shape, var) if p[-1].key == "var" else
                      0.3 * rng.standard_normal(s.shape)).astype(s.dtype),
        checkpoint.abstract_variables(model))
    checkpoint.save_model(str(path), variables, model_name="resnet20",
                          model_options=dict(widths=(4, 8, 16), num_classes=model.num_classes),
                          normalization=checkpoint.Normalization(np.full(3, 0.5)), step=5,
                          extra=dict(classes=list(classes)) if classes else None)
    return checkpoint.load_model(str(path))


def test_non_finite_outputs_fail_naming_the_checkpoint_instead_of_scoring(tmp_path):
    """A negative running variance (finite weights, checksums intact) makes every logit NaN; the
    old count scored that 100 %."""
    loaded = _small_checkpoint(tmp_path / "c", var=-1.0)
    data = sources.load("synthetic:24", "test")
    with pytest.raises(evaluate.NonFiniteOutput) as e:
        evaluate.evaluate(loaded, data, batch_size=8, progress=None)
    assert str(e.value).startswith(f"checkpoint {str(tmp_path / 'c')!r} step 5 on synthetic:24:test: "
                                   "24 of 24 images got non-finite")


def test_classes_are_checked_before_any_batch_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "make_eval_step", lambda *a: pytest.fail("a batch ran"))
    images = np.zeros((4, 32, 32, 3), np.uint8)
    # converted weights name no classes: the count must match (a 10-class net on 3-class data)
    loaded = _small_checkpoint(tmp_path / "ten")
    three = sources.Dataset(images, np.array([0, 1, 2, 0], np.int32), ("a", "b", "c"), "three")
    with pytest.raises(UserError, match="three has 3 classes but the model has 10"):
        evaluate.evaluate(loaded, three)
    # a trained checkpoint names them: checked by name, naming the difference
    loaded = _small_checkpoint(tmp_path / "abc", classes=("ant", "bee", "cat"))
    other = sources.Dataset(images, np.array([0, 1, 2, 0], np.int32), ("ant", "bee", "dog"), "other")
    with pytest.raises(UserError, match="other has classes that the model's list lacks: dog; "
                                        "lacks the model's classes cat"):
        evaluate.evaluate(loaded, other)


def test_num_images_scores_the_first_images_only(tmp_path):
    loaded = _small_checkpoint(tmp_path / "c")
    data = sources.load("synthetic:24", "test")
    some = evaluate.first_images(data, 10)
    assert len(some) == 10 and (some.labels == data.labels[:10]).all()
    assert evaluate.evaluate(loaded, some, batch_size=8, progress=None)["count"] == 10
    assert evaluate.first_images(data, None) is data
    with pytest.raises(UserError, match=r"--num_images must be in 1\.\.24 for synthetic:24:test, "
                       "not 25"):
        evaluate.first_images(data, 25)
    head = evaluate._Head([{"i": i} for i in range(5)], 3)
    assert len(head) == 3 and head[2] == {"i": 2} and head[-1] == {"i": 2}
    with pytest.raises(IndexError):
        head[3]


def test_the_rate_leaves_out_the_first_batch_and_its_compile(monkeypatch):
    """A clock that the first batch (its compile) moves by 100 s and every later one by 1 s: the
    rate is the later batches' images over their seconds alone."""
    clock = [0.0]
    monkeypatch.setattr(evaluate.time, "perf_counter", lambda: clock[0])

    def step(variables, images, labels, mask):
        clock[0] += 100.0 if clock[0] == 0 else 1.0
        return {k: jnp.asarray(v) for k, v in dict(
            top1=0, top5=0, loss_sum=0.0, count=int(mask.sum()), nonfinite=0).items()}

    batches = [(None, np.zeros(8), np.ones(8, bool))] * 4
    rates = []
    evaluate.evaluate_batches(step, None, batches, lambda d, t, r: rates.append((d, r)), 32,
                              progress_every=2)
    assert rates == [(16, 8.0), (32, 8.0)]


def test_an_unwritable_json_path_is_refused_before_any_scoring(tmp_path):
    """`--json DIR` or a path under a file gave a traceback after scoring: the result lost."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"--json '.*' is a directory; name a file"):
        storage.check_writable(str(tmp_path), "--json", file=True)
    with pytest.raises(UserError, match=r"lies under the file '.*file'"):
        storage.check_writable(str(tmp_path / "file" / "sub" / "r.json"), "--json", file=True)
    storage.check_writable(str(tmp_path / "new" / "r.json"), "--json", file=True)
    assert not (tmp_path / "new").exists()  # created when written


def test_written_json_is_standard_json(tmp_path):
    lines.write_json(str(tmp_path / "r.json"), {"loss": float("nan"), "top1": float("inf")})
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"loss": None, "top1": None}


@pytest.mark.slow
def test_cli_says_when_a_folder_is_numbered_by_sorted_names(tmp_path, monkeypatch):
    """A checkpoint without a class list can only number a folder's classes in sorted order:
    the user is told, since other names (plane, car, ...) would sort differently."""
    from PIL import Image
    monkeypatch.setenv("RESNET_JAX_CACHE", str(tmp_path / "cache"))
    _small_checkpoint(tmp_path / "c")
    for i, name in enumerate("abcdefghij"):
        (tmp_path / "d" / "test" / name).mkdir(parents=True)
        Image.fromarray(np.full((32, 32, 3), 20 * i, np.uint8)).save(
            tmp_path / "d" / "test" / name / "0.png")
    proc = _cli("--checkpoint", tmp_path / "c", "--data", f"folder:{tmp_path / 'd'}",
                "--batch_size", 10)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("note: the checkpoint records no class list; labels follow the "
                                  "sorted names of the class folders"), proc.stderr
