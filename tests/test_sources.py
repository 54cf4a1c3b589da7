"""Data sources: tfds's own download path is importable, and its failures are one clear line."""
import pytest
import tensorflow_datasets as tfds

from resnet_jax.data import sources
from resnet_jax.errors import UserError


def test_tfds_cifar10_builder_resolves_its_code(tmp_path):
    """tfds imports importlib_resources lazily, only when preparing a data set, and does not
    declare it: without our dependency on it, the default `cifar10` source fails on a fresh
    machine before downloading anything."""
    builder = tfds.builder("cifar10", data_dir=str(tmp_path))
    assert builder.code_path is not None and builder.code_path.name == "cifar.py"


def test_tfds_failure_is_one_line_naming_the_folder_alternative(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Max retries exceeded\nwith a long second line")

    monkeypatch.setattr(tfds, "builder", offline)
    with pytest.raises(UserError) as e:
        sources.load("cifar10", "train")
    message = str(e.value)
    assert "\n" not in message
    assert "cifar10" in message and "ConnectionError" in message and "folder:PATH" in message


def _jpeg():
    import io
    import numpy as np
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _folder(root, layout):
    """{'train/cat': 2, 'test/dog': 0, ...}: class folders with that many images."""
    for path, count in layout.items():
        (root / path).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            (root / path / f"{i}.jpg").write_bytes(_jpeg())
    return f"folder:{root}"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RESNET_JAX_CACHE", str(tmp_path / "cache"))


def test_an_empty_class_folder_is_refused_by_name(tmp_path):
    """It would shift every later label by one (validation 56.7 % -> 6.7 % in the issue)."""
    source = _folder(tmp_path / "d", {"train/ant": 2, "train/bee": 0, "train/cat": 2})
    with pytest.raises(UserError, match=r"no images in class folder '.*train/bee'") as e:
        sources.load(source, "train")
    assert "\n" not in str(e.value)


def test_splits_are_numbered_by_the_training_classes_and_checked_by_name(tmp_path):
    source = _folder(tmp_path / "d", {"train/ant": 1, "train/bee": 1, "train/cat": 1,
                                      "test/ant": 1, "test/cat": 2, "test/bee": 1})
    train = sources.load(source, "train")
    assert train.classes == ("ant", "bee", "cat")
    test = sources.load(source, "test", classes=train.classes)
    assert sorted(test.labels.tolist()) == [0, 1, 2, 2]
    _folder(tmp_path / "d", {"test/dog": 1})  # an extra class folder in test/
    with pytest.raises(UserError, match=r"test' has classes that the model's list lacks: dog"):
        sources.load(source, "test", classes=train.classes)
    with pytest.raises(UserError, match=r"lacks the model's classes dog"):
        sources.load(source, "train", classes=("ant", "bee", "cat", "dog"), whose="the model's")


def test_offline_tfds_says_so_at_once(monkeypatch, tmp_path):
    """Without internet tfds retried its download for minutes before failing."""
    monkeypatch.setattr(sources, "_online", lambda *a, **k: False)
    with pytest.raises(UserError) as e:
        sources.load("cifar10", "train", data_dir=str(tmp_path))
    message = str(e.value)
    assert "\n" not in message and "cannot download it (no internet)" in message
    assert "--config.data.source=folder:PATH" in message


def test_replaced_images_with_kept_mtimes_are_decoded_again(tmp_path):
    """`cp -p`, `rsync -a` and `tar` keep modification times: the cache served the old pixels."""
    import os
    import numpy as np
    from PIL import Image
    source = _folder(tmp_path / "d", {"train/ant": 1, "train/bee": 1})
    before = sources.load(source, "train")
    path = tmp_path / "d" / "train" / "ant" / "0.jpg"
    stat = path.stat()
    Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(path, "JPEG")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = sources.load(source, "train")
    assert before.images[0].max() < 10 and after.images[0].min() > 245


def test_a_broken_link_in_a_class_folder_is_one_line(tmp_path):
    source = _folder(tmp_path / "d", {"train/ant": 1, "train/bee": 1})
    (tmp_path / "d" / "train" / "bee" / "1.jpg").symlink_to(tmp_path / "gone.jpg")
    with pytest.raises(UserError, match=r"cannot read image '.*bee/1.jpg' \(No such file"):
        sources.load(source, "train")


def test_class_names_compare_in_one_unicode_form_and_every_pil_format_counts(tmp_path):
    """`café` decomposed on disk (NFD) against `café` composed (NFC) was reported as
    "lacks: café ... classes café"; .gif/.webp/.tif images were skipped without a word."""
    import unicodedata
    import numpy as np
    from PIL import Image
    nfd = unicodedata.normalize("NFD", "café")
    source = _folder(tmp_path / "d", {f"train/{nfd}": 1, "train/bar": 1})
    for suffix in ("gif", "webp", "tif"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(
            tmp_path / "d" / "train" / "bar" / f"x.{suffix}")
    data = sources.load(source, "train", classes=("bar", unicodedata.normalize("NFC", "café")))
    assert sorted(data.labels.tolist()) == [0, 0, 0, 0, 1]


def test_a_jpeg_with_overwritten_bytes_is_named_not_decoded_silently(tmp_path, caplog):
    import io
    import numpy as np
    from PIL import Image
    from resnet_jax.data import jpeg
    rng = np.random.default_rng(0)
    smooth = np.linspace(0, 255, 96 * 96 * 3).reshape(96, 96, 3).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(smooth).save(buf, "JPEG", quality=95)
    good = buf.getvalue()
    bad = bytearray(good)
    middle = len(bad) // 2
    bad[middle:middle + 200] = rng.integers(0, 256, 200, dtype=np.uint8).tobytes()
    assert jpeg.damage(good) is None and jpeg.damage(bytes(bad))
    source = _folder(tmp_path / "d", {"train/ant": 1, "train/bee": 1})
    (tmp_path / "d" / "train" / "ant" / "0.jpg").write_bytes(good)
    (tmp_path / "d" / "train" / "bee" / "0.jpg").write_bytes(bytes(bad))
    sources.load(source, "train")
    assert not any("ant/0.jpg" in r.getMessage() for r in caplog.records)
    assert any("bee/0.jpg is damaged (libjpeg: " in r.getMessage() for r in caplog.records)
    caplog.clear()
    jpeg.decode(bytes(bad), name="x.jpg")
    assert any("x.jpg is damaged" in r.getMessage() for r in caplog.records)


def test_a_cached_split_is_found_without_reading_its_images(tmp_path, monkeypatch):
    """The cache key hashed every image's bytes: a cache hit still read the whole split (one GET
    per image on gs://)."""
    import numpy as np
    source = _folder(tmp_path / "d", {"train/ant": 2, "train/bee": 1})
    first = sources.load(source, "train")
    monkeypatch.setattr(sources.storage, "read_bytes", lambda p: pytest.fail(f"read {p}"))
    again = sources.load(source, "train")
    np.testing.assert_array_equal(first.images, again.images)
    assert again.labels.tolist() == [0, 0, 1]


def test_a_bucket_folder_is_its_url_not_a_path_under_the_working_directory(tmp_path,
                                                                            monkeypatch):
    """os.path.realpath made folder:gs://b/data the local path ./gs:/b/data."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "data").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a")
    seen = set()
    for cwd in (tmp_path, tmp_path / "a"):
        monkeypatch.chdir(cwd)
        seen.add(sources.identity("folder:gs://b/data/"))
        seen.add(sources.identity("folder:gs://b/data"))
    assert seen == {"folder:gs://b/data"}
    assert sources.identity(f"folder:{tmp_path}/link/data/") == f"folder:{tmp_path}/a/data"
