"""ImageNet-style input on a small generated folder of variable-size JPEGs: the decode-and-crop
against resizing the whole image, the device half of the augmentation, training batches as a
function of (seed, step) whatever the worker count or the process's rows, streamed evaluation."""
import io
import json
import os

import jax
import numpy as np
import pytest
import simplejpeg
from PIL import Image

from resnet_jax import parallel
from resnet_jax.data import augment, imagenet, jpeg
from resnet_jax.errors import UserError

SIZE, SCALE = 32, (36, 60)  # the paper's 224 and [256, 480], scaled down for speed


def _jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _photo(h, w, seed=0):
    """Smooth enough to compress like a photograph, varied enough that crops differ."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    channels = [np.sin(rng.uniform(3, 12) * x + rng.uniform(2, 9) * y + rng.uniform(0, 6))
                for _ in range(3)]
    return np.clip(127.5 + 120 * np.stack(channels, -1), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """ILSVRC-style folder: train and validation, 3 classes, 12 images each of sizes 40-90 px."""
    root = tmp_path_factory.mktemp("ilsvrc")
    rng = np.random.default_rng(0)
    for split in ("train", "validation"):
        for i in range(12):
            d = root / split / f"n{i % 3:08d}"
            d.mkdir(parents=True, exist_ok=True)
            h, w = (int(v) for v in rng.integers(40, 91, 2))
            (d / f"{i:04d}.JPEG").write_bytes(_jpeg(_photo(h, w, seed=i)))
    return str(root)


def _reference_crop(image, rng, size, scale):
    """The scale augmentation as the paper states it: resize the whole image to shorter side S,
    then crop (the draws in imagenet_train_crop's order)."""
    s = int(rng.integers(scale[0], scale[1] + 1))
    resized = augment.resize_shorter_side(image, s)
    h, w = resized.shape[:2]
    top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    return augment.crop(resized, top, left, size)


@pytest.mark.parametrize("shape", [(48, 64), (64, 45), (50, 50), (41, 90)])
def test_decode_and_crop_is_resize_then_crop(shape):
    encoded = _jpeg(_photo(*shape))
    image = jpeg.decode(encoded)
    for seed in range(4):
        ours = augment.imagenet_train_crop(encoded, np.random.default_rng(seed), size=SIZE, scale=SCALE)
        ref = _reference_crop(image, np.random.default_rng(seed), SIZE, SCALE)
        assert ours.shape == (SIZE, SIZE, 3) and ours.dtype == np.uint8
        # the same window and filter; PIL rounds to 8 bits between its horizontal and vertical
        # passes, and the passes start at other pixels, so a level or two differs here and there
        diff = np.abs(ours.astype(int) - ref)
        assert diff.max() <= 2 and diff.mean() < 0.5  # a crop one pixel off: ~10


def test_a_large_jpeg_is_decoded_at_reduced_scale_and_matches_closely():
    encoded = _jpeg(_photo(600, 480))  # shorter side 480 -> 36..40: libjpeg decodes at 1/8
    image = jpeg.decode(encoded)
    diffs = []
    for seed in range(4):
        ours = augment.imagenet_train_crop(encoded, np.random.default_rng(seed), size=SIZE, scale=(36, 40))
        ref = _reference_crop(image, np.random.default_rng(seed), SIZE, (36, 40))
        diffs.append(np.abs(ours.astype(int) - ref).mean())
    assert max(diffs) < 3.0  # DCT scaling instead of antialiased bilinear: within grey levels


def _encode(image, **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=90, **options)
    return buf.getvalue()


# 4:2:0 (ImageNet's usual), 4:2:2, 4:4:4, progressive, grey: fancy upsampling reads neighbouring
# chroma, so a window decoded alone has edges of its own unless the decoder is given margins
WINDOW_CASES = {"420": dict(subsampling=2), "422": dict(subsampling=1),
                "444": dict(subsampling=0), "progressive": dict(progressive=True),
                "grey": dict()}


@pytest.mark.parametrize("case", sorted(WINDOW_CASES))
def test_a_window_decoded_alone_has_the_whole_images_pixels(case, jpeg_window):
    """A box of whole pixels resized to its own size is a copy: the window decoder's pixels must
    be the whole image's exactly, at every offset (iMCU boundaries and the image's edges too)."""
    image = _photo(83, 121, seed=5)
    if case == "grey":
        image = np.repeat(np.asarray(Image.fromarray(image).convert("L"))[..., None], 3, -1)
    encoded = _encode(image if case != "grey" else image[..., 0], **WINDOW_CASES[case])
    whole = jpeg.decode(encoded)
    rng = np.random.default_rng(0)
    for left, top, n in [(0, 0, 30), (121 - 30, 83 - 30, 30), (0, 0, 83), (17, 1, 40)] + \
            [(int(rng.integers(0, 121 - 25)), int(rng.integers(0, 83 - 25)), 25) for _ in range(8)]:
        window = jpeg._decode_window(encoded, 1, (left, top, left + n, top + n), n)
        assert window is not None
        np.testing.assert_array_equal(window, whole[top:top + n, left:left + n])


@pytest.mark.parametrize("case", ["420", "progressive"])
def test_window_decoder_resizes_as_pil_resizes_the_whole_image(case, jpeg_window):
    """Fractional boxes, shrinking and growing, at full and DCT-reduced scale, against PIL's
    resize of the whole decoded image (Pillow 13 runs the passes in the other order: a grey level
    here and there)."""
    encoded = _encode(_photo(300, 410, seed=2), **WINDOW_CASES[case])
    whole = jpeg.decode(encoded)
    rng = np.random.default_rng(1)
    for out, side in [(32, 40.5), (32, 70.2), (32, 150.0), (32, 290.0), (64, 48.3)]:
        left, top = rng.uniform(0, 410 - side), rng.uniform(0, 300 - side)
        box = (left, top, left + side, top + side)
        ours = jpeg.crop_resize(encoded, box, out)
        reduce = 2 ** min(3, int(np.log2(max(side / out, 1.0))))
        scaled = simplejpeg.decode_jpeg(encoded, colorspace="RGB", min_height=-(-300 // reduce),
                                        min_width=-(-410 // reduce))
        sy, sx = scaled.shape[0] / 300, scaled.shape[1] / 410  # 103 / 410 at 1/4: not 1/4
        ref = np.asarray(Image.fromarray(scaled).resize(
            (out, out), Image.BILINEAR, box=(box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)))
        diff = np.abs(ours.astype(int) - ref)
        assert diff.max() <= 1 and diff.mean() < 0.1, (out, side, diff.max(), diff.mean())
    assert whole.shape == (300, 410, 3)


def test_jpeg_window_decoder_unbuildable_decodes_whole_images(monkeypatch, caplog):
    """No libjpeg headers: said in one log line, naming the package; crops still come, from the
    whole image."""
    monkeypatch.setattr(jpeg, "_crop_library", jpeg._crop_library.__wrapped__)
    monkeypatch.setattr(jpeg.native, "include_dirs", lambda: [])
    monkeypatch.setattr(jpeg.native, "build", lambda *a: pytest.fail("compiled anyway"))
    jpeg._log_once.cache_clear()
    assert "libjpeg-dev" in jpeg.window_decoding()
    encoded = _jpeg(_photo(60, 80))
    with caplog.at_level("WARNING"):
        crops = [jpeg.crop_resize(encoded, (3.5, 2.0, 50.5, 49.0), 32) for _ in range(2)]
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "libjpeg-dev" in caplog.records[0].message and crops[0].shape == (32, 32, 3)


def test_undecodable_bytes_name_the_problem():
    with pytest.raises(UserError, match="cannot decode image 7"):
        jpeg.decode(b"not a jpeg", "image 7")


def test_flip_lighting_mirrors_half_and_shifts_along_the_eigenvectors():
    images = np.random.default_rng(0).integers(40, 216, (64, 5, 7, 3), dtype=np.uint8)
    key = jax.random.key(3)
    flipped = np.asarray(augment.flip_lighting(images, key, pca_std=0.0))
    mirrored = np.array([np.array_equal(f, im[:, ::-1]) for f, im in zip(flipped, images)])
    same = np.array([np.array_equal(f, im) for f, im in zip(flipped, images)])
    assert np.all(mirrored | same) and 16 < mirrored.sum() < 48
    shifted = np.asarray(augment.flip_lighting(images, key)).astype(np.float32)
    shift = shifted - flipped  # the same flips: one key, the same split
    for s in shift:  # one colour shift per image, the same on every pixel, along pca_lighting's
        assert np.ptp(s.reshape(-1, 3), axis=0).max() <= 1
    mean_shift = shift.reshape(64, -1, 3).mean(1) / 255.0
    alphas = np.linalg.lstsq(augment.PCA_EIGVEC * augment.PCA_EIGVAL, mean_shift.T, rcond=None)[0].T
    np.testing.assert_allclose(np.asarray(augment.pca_lighting(np.zeros(3, np.float32), alphas[0])),
                               mean_shift[0], atol=2e-3)
    assert 0.05 < alphas[:, 0].std() < 0.2  # draws of std 0.1 (the first axis is well resolved)


def test_folder_split_reads_bytes_and_labels(folder):
    split = imagenet.open_split(f"folder:{folder}", "train")
    assert len(split) == 12 and split.num_classes == 3 and split.name.endswith(":train")
    ex = split.source[4]
    assert isinstance(ex["image"], bytes) and ex["label"] == 1
    with pytest.raises(UserError, match="not found"):
        imagenet.open_split(f"folder:{folder}", "val")


def test_training_batches_are_a_function_of_seed_and_step(folder):
    split = imagenet.open_split(f"folder:{folder}", "train")
    mesh = parallel.make_mesh()  # 8 CPU devices: the batch crosses them as on a TPU host
    kw = dict(seed=1, size=SIZE, scale=SCALE, workers=0)
    a = imagenet.HostInput(split.source, 8, mesh, **kw)
    first = [a.batch(s) for s in (3, 4, 5)]
    images, labels = first[-1]
    assert images.shape == (8, SIZE, SIZE, 3) and images.dtype == np.uint8
    assert images.sharding.is_equivalent_to(parallel.batch_sharding(mesh), 4)
    np.testing.assert_array_equal(np.asarray(labels), split.source.labels[a.indices(5)])
    assert a.input_wait > 0
    resumed = imagenet.HostInput(split.source, 8, mesh, **kw)
    np.testing.assert_array_equal(np.asarray(resumed.batch(5)[0]), np.asarray(images))
    again = a.batch(4)  # a jump back restarts the stream there
    np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(first[1][0]))
    assert not np.array_equal(np.asarray(first[0][0]), np.asarray(first[1][0]))
    other_seed = imagenet.HostInput(split.source, 8, mesh, **dict(kw, seed=2)).batch(5)
    assert not np.array_equal(np.asarray(other_seed[0]), np.asarray(images))
    for h in (a, resumed):
        h.close()


def test_a_process_builds_only_its_rows(folder):
    """What a second host of a pod slice computes: rows 4..7 of the same global batch."""
    split = imagenet.open_split(f"folder:{folder}", "train")
    whole = imagenet.TrainCrops(split.source, len(split), 8, slice(0, 8), 1, SIZE, SCALE)
    second = imagenet.TrainCrops(split.source, len(split), 8, slice(4, 8), 1, SIZE, SCALE)
    step = 5
    for r in range(4):
        ours, label = second(step * 4 + r)
        theirs, their_label = whole(step * 8 + 4 + r)
        np.testing.assert_array_equal(ours, theirs)
        assert label == their_label


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(folder):
    split = imagenet.open_split(f"folder:{folder}", "train")
    mesh = parallel.make_mesh(jax.devices()[:1])
    kw = dict(seed=1, size=SIZE, scale=SCALE)
    inline = imagenet.HostInput(split.source, 4, mesh, workers=0, **kw)
    pooled = imagenet.HostInput(split.source, 4, mesh, workers=2, **kw)
    try:
        for step in (2, 3, 4):
            x, y = inline.batch(step)
            px, py = pooled.batch(step)
            np.testing.assert_array_equal(np.asarray(px), np.asarray(x))
            np.testing.assert_array_equal(np.asarray(py), np.asarray(y))
    finally:
        inline.close()
        pooled.close()


@pytest.mark.parametrize("ten_crop", [False, True])
def test_eval_streams_variable_size_images_in_padded_masked_batches(folder, ten_crop):
    split = imagenet.open_split(f"folder:{folder}", "validation")
    mesh = parallel.make_mesh()
    batches = list(imagenet.eval_batches(split.source, 8, mesh, size=SIZE, resize=36,
                                         ten_crop=ten_crop, threads=2))
    crop = (10, SIZE, SIZE, 3) if ten_crop else (SIZE, SIZE, 3)
    assert [b[0].shape for b in batches] == [(8,) + crop] * 2
    masks = np.concatenate([np.asarray(m) for _, _, m in batches])
    labels = np.concatenate([np.asarray(y) for _, y, _ in batches])[masks]
    np.testing.assert_array_equal(labels, split.source.labels)  # every image once, in order
    first = augment.imagenet_eval(jpeg.decode(split.source[0]["image"]), size=SIZE, resize=36,
                                  ten_crop=ten_crop)
    np.testing.assert_array_equal(np.asarray(batches[0][0])[0], first)


def test_mean_image_of_centre_crops(folder):
    split = imagenet.open_split(f"folder:{folder}", "train")
    mean = imagenet.mean_image(split.source, count=6, size=SIZE, resize=36, threads=2)
    pick = np.random.default_rng(0).choice(12, 6, replace=False)
    crops = [augment.imagenet_eval(jpeg.decode(split.source[int(i)]["image"]), size=SIZE, resize=36)
             for i in pick]
    np.testing.assert_allclose(mean, np.mean(crops, 0) / 255.0, atol=1e-6)


@pytest.mark.parametrize("mode,fmt", [("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG")])
def test_grey_cmyk_and_png_images_decode_to_rgb_crops(mode, fmt):
    """ImageNet holds a few grey and CMYK JPEGs (libjpeg-turbo cannot make RGB of CMYK: PIL
    does); an image folder may hold PNGs."""
    buf = io.BytesIO()
    Image.fromarray(_photo(50, 70)).convert(mode).save(buf, fmt)
    encoded = buf.getvalue()
    image = jpeg.decode(encoded)
    assert image.shape == (50, 70, 3) and image.dtype == np.uint8
    ours = augment.imagenet_train_crop(encoded, np.random.default_rng(0), size=SIZE, scale=SCALE)
    ref = _reference_crop(image, np.random.default_rng(0), SIZE, SCALE)
    assert np.abs(ours.astype(int) - ref).mean() < 0.5


# ---------------------------------------------------------------------------------------------
# evaluate and analyze on ImageNet-style data

NET_SIZE = 64  # the smallest image_size that evaluate/analyze treat as ImageNet-style


@pytest.fixture(scope="module")
def imagenet_net():
    """A ResNet-18 on 64x64 crops, 3 classes, random weights with trained-like BN statistics."""
    import resnet_jax
    from resnet_jax import checkpoint
    model = resnet_jax.create_model("resnet18", num_classes=3)
    variables = model.init(jax.random.key(0), np.zeros((1, NET_SIZE, NET_SIZE, 3), np.float32))
    norm = checkpoint.Normalization(np.full((NET_SIZE, NET_SIZE, 3), 0.5, np.float32), 0.25)
    return checkpoint.LoadedModel(model, variables, norm,
                                  {"model": "resnet18", "model_options": {"num_classes": 3},
                                   "image_size": NET_SIZE}, 0)


def _crops(split, ten_crop=False):
    resize = imagenet.eval_resize(NET_SIZE)
    return np.stack([augment.imagenet_eval(jpeg.decode(split.source[i]["image"]), size=NET_SIZE,
                                           resize=resize, ten_crop=ten_crop)
                     for i in range(len(split))])


def test_eval_resize_follows_the_checkpoint():
    assert imagenet.eval_resize(224) == 256 and imagenet.eval_resize(64) == 73
    assert imagenet.eval_resize(224, {"config": {"data": {"eval_resize": 288}}}) == 288
    assert not imagenet.is_imagenet_input(32) and imagenet.is_imagenet_input(224)


@pytest.mark.slow
@pytest.mark.parametrize("ten_crop", [False, True])
def test_evaluate_streamed_scores_every_image_of_a_folder_once(folder, imagenet_net, ten_crop):
    from resnet_jax import evaluate
    split = imagenet.open_split(f"folder:{folder}", "validation")
    net = imagenet_net
    x = net.normalization(_crops(split, ten_crop))
    if ten_crop:
        probs = jax.nn.softmax(net.model.apply(net.variables, x.reshape((-1,) + x.shape[2:]),
                                               train=False))
        logits = np.log(np.asarray(probs).reshape(len(split), 10, -1).mean(1))
    else:
        logits = np.asarray(net.model.apply(net.variables, x, train=False))
    want = int((logits.argmax(1) == split.source.labels).sum())
    # 5 rounds up to the 8 devices: one batch of 8 and one padded with 4 masked rows
    r = evaluate.evaluate_streamed(net, split, batch_size=5, ten_crop=ten_crop, progress=None,
                                   threads=2)
    assert r["count"] == 12 and r["correct_top1"] == want and r["correct_top5"] == 12


def test_eval_batches_decode_lazily(folder):
    """Memory flat in the split's size: the stream reads a batch ahead, never the split."""
    split = imagenet.open_split(f"folder:{folder}", "validation")
    reads = []

    class Counting:
        def __len__(self):
            return len(split.source)

        def __getitem__(self, i):
            reads.append(i)
            return split.source[i]

    batches = imagenet.eval_batches(Counting(), 4, parallel.make_mesh(jax.devices()[:1]),
                                    size=SIZE, resize=36, threads=2)
    next(batches)
    assert len(reads) <= 8  # this batch and the next, of 12 images
    assert len(list(batches)) == 2 and len(reads) == 12


def test_decoded_crops_stream_analysis_like_the_array(folder, imagenet_net):
    from resnet_jax import analyze
    split = imagenet.open_split(f"folder:{folder}", "validation")
    lazy = imagenet.DecodedCrops(split.source, size=NET_SIZE, resize=imagenet.eval_resize(NET_SIZE),
                                 count=10, threads=2)
    assert len(lazy) == 10 and lazy.shape == (10, NET_SIZE, NET_SIZE, 3)
    whole = _crops(split)[:10]
    np.testing.assert_array_equal(lazy[2:5], whole[2:5])
    np.testing.assert_array_equal(lazy[np.array([9, 0])], whole[[9, 0]])
    settings = analyze.Settings(batch_size=4)
    fn = analyze.batch_moments_fn(imagenet_net.model, imagenet_net.normalization, settings)
    streamed = analyze.stream_moments(fn, imagenet_net.variables, lazy, settings)
    in_memory = analyze.stream_moments(fn, imagenet_net.variables, whole, settings)
    assert streamed.keys() == in_memory.keys()
    for layer in streamed:
        for a, b in zip(streamed[layer], in_memory[layer]):
            np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.slow
def test_evaluate_on_two_processes_gives_the_one_result(folder, imagenet_net, tmp_path):
    """A pod slice on one machine: two JAX processes of two CPU devices each, each decoding its
    own rows, score the folder as one process does."""
    from resnet_jax import checkpoint, evaluate
    net = imagenet_net
    ckpt = str(tmp_path / "ckpt")
    checkpoint.save_model(ckpt, net.variables, model_name="resnet18",
                          model_options={"num_classes": 3}, normalization=net.normalization,
                          extra={"image_size": NET_SIZE})
    out = tmp_path / "result.json"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    stdout = _two_processes(repo, "resnet_jax.evaluate", "--checkpoint", ckpt, "--data",
                            f"folder:{folder}", "--split", "validation", "--batch_size", "8",
                            "--json", str(out))
    assert stdout.count("top-1") == 1  # one result, printed by process 0
    got = json.loads(out.read_text())
    split = imagenet.open_split(f"folder:{folder}", "validation")
    want = evaluate.evaluate_streamed(net, split, batch_size=8, progress=None, threads=2)
    assert (got["count"], got["correct_top1"], got["correct_top5"]) == \
        (12, want["correct_top1"], want["correct_top5"])
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)


def _two_processes(repo, *args):
    """`python -m resnet_jax.<args>` as a pod slice on one machine: two JAX processes of two CPU
    devices each (launch/local_multiprocess.sh)."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", PYTHONPATH=repo)
    proc = subprocess.run(
        ["bash", os.path.join(repo, "launch", "local_multiprocess.sh"), "-n", "2", "-d", "2",
         "--cmd", sys.executable, "-m", *args], cwd=repo, env=env, capture_output=True,
        text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_analyze_on_two_processes_gives_the_one_result(folder, imagenet_net, tmp_path):
    """Each process analyses every other batch (3 batches: two and one), the moments merge
    across processes, process 0 writes: the numbers of one process."""
    from resnet_jax import analyze, checkpoint
    ckpt = str(tmp_path / "ckpt")
    checkpoint.save_model(ckpt, imagenet_net.variables, model_name="resnet18",
                          model_options={"num_classes": 3}, normalization=imagenet_net.normalization,
                          extra={"image_size": NET_SIZE})
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = ["--data", f"folder:{folder}", "--split", "validation", "--batch_size", "4"]
    stdout = _two_processes(repo, "resnet_jax.analyze", f"{ckpt}=net", *args,
                            "--out", str(tmp_path / "two"))
    assert stdout.count("wrote ") == 1  # process 0 alone writes and prints
    analyze.analyze([f"{ckpt}=net"], data=f"folder:{folder}", split="validation",
                    out=str(tmp_path / "one"), settings=analyze.Settings(batch_size=4))
    two, one = (json.loads((tmp_path / d / "net.json").read_text()) for d in ("two", "one"))
    assert two["num_images"] == one["num_images"] == 12
    np.testing.assert_allclose([r["std"] for r in two["layers"]],
                               [r["std"] for r in one["layers"]], rtol=1e-5)


@pytest.mark.slow
def test_training_on_a_folder_logs_input_wait(folder, tmp_path):
    """The trainer's host pipeline end to end: folder:PATH, grain, the device half, input_wait."""
    from resnet_jax import train
    from resnet_jax import config as config_lib
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = config_lib.load_config(os.path.join(repo, "configs", "imagenet.py:resnet18"))
    config.data.source = f"folder:{folder}"
    config.data.update(dict(image_size=NET_SIZE, scale=(72, 96), eval_resize=73, mean_images=6,
                            workers=0, threads=2))
    config.batch_size = config.eval_batch_size = 8
    config.num_steps, config.log_every, config.checkpoint_every = 2, 1, 2
    result = train.train_and_evaluate(config, str(tmp_path / "run"),
                                      parallel.make_mesh(jax.devices()[:1]))
    assert result["step"] == 2 and result["val_count"] == 12
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    waits = [l["input_wait"] for l in lines if "input_wait" in l]
    assert len(waits) == 2 and all(w >= 0 for w in waits)


def test_a_bad_file_is_named_in_one_line(tmp_path):
    d = tmp_path / "train" / "a"
    d.mkdir(parents=True)
    for i in range(4):
        (d / f"{i}.JPEG").write_bytes(_jpeg(_photo(40, 50, seed=i)) if i else b"not a jpeg")
    split = imagenet.open_split(f"folder:{tmp_path}", "train")
    host = imagenet.HostInput(split.source, 4, parallel.make_mesh(jax.devices()[:1]), size=SIZE,
                              scale=SCALE, workers=0)
    with pytest.raises(UserError, match=r"cannot decode '.*0\.JPEG'.*remove or replace it"):
        host.batch(0)
    assert host._producer is None  # stopped: no thread or worker left behind


# ---------------------------------------------------------------------------------------------
# benchmarks/imagenet_input.py's inputs


def test_benchmark_jpegs_are_imagenet_like(tmp_path):
    from benchmarks import imagenet_jpegs
    paths = imagenet_jpegs.write_folder(str(tmp_path), 40, splits=("train",))
    assert len(paths) == 40 and len(imagenet.open_split(f"folder:{tmp_path}", "train")) == 40
    sizes = [Image.open(p).size for p in paths]
    assert all(200 <= min(s) and max(s) <= 1000 for s in sizes)
    assert sum(max(s) == 500 and 330 <= min(s) <= 375 for s in sizes) >= 20  # mostly ~500x375


def test_benchmark_requirement_is_the_scaling_documents(tmp_path):
    import re
    from benchmarks import imagenet_input
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(repo, "docs", "scaling.md")) as f:
        doc = f.read()
    need = imagenet_input.required_per_host()
    for hw in ("v5e-8 (8 chips)", "8x H100 SXM"):  # the hosts docs/scaling.md tabulates
        row = re.search(rf"\| resnet50 \| {re.escape(hw)} \| ([\d,]+) \|", doc)
        assert abs(need[hw] - int(row.group(1).replace(",", ""))) < 1
    assert set(need) == set(imagenet_input.HOST_VCPUS)


@pytest.mark.slow
def test_benchmark_workers_row_pins_to_as_many_cores_and_restores(folder):
    from benchmarks import imagenet_input
    before = os.sched_getaffinity(0)
    rate, cores = imagenet_input.workers_rate(os.path.join(folder), 1, 4, 8, seconds=0.1)
    assert rate > 0 and cores == 1 and os.sched_getaffinity(0) == before


def test_benchmark_peak_rss_of_a_module_run_in_its_own_process(tmp_path):
    from benchmarks import imagenet_input
    script = tmp_path / "hold.py"
    script.write_text("import numpy as np\nx = np.ones(64 << 20, np.uint8)\n")  # 64 MiB
    held = imagenet_input.peak_rss_mib("hold", cwd=str(tmp_path))
    script.write_text("x = 1\n")
    small = imagenet_input.peak_rss_mib("hold", cwd=str(tmp_path))
    assert held - small > 60
