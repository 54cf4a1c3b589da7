"""Progress lines and kept work: the ETA arithmetic, and a kept part returned only for its key."""
from resnet_jax import progress


def test_images_line_gives_rate_and_time_left():
    assert progress.images_line(2500, 10000, 500.0) == "2500/10000 images, 500 images/s, ETA 0:00:15"
    assert progress.images_line(0, 100, None) == "0/100 images"  # no rate before the first batch
    assert progress.images_line(100, 100, None) == "100/100 images, ETA 0:00:00"
    assert progress.hms(3725.9) == "1:02:05" and progress.hms(float("inf")) == "?"


def test_kept_parts_come_back_only_for_the_same_key(tmp_path):
    kept = progress.Kept(str(tmp_path / "k"))
    assert kept.get("a/1", {"x": 1}) is None
    kept.put("a/1", {"x": 1, "sums": {"p": 3}}, [{"std": 0.5}])
    assert kept.get("a/1", {"x": 1, "sums": {"p": 3}}) == [{"std": 0.5}]
    assert kept.get("a/1", {"x": 1, "sums": {"p": 4}}) is None  # the checkpoint changed
    (tmp_path / "k" / "a" / "1.json").write_text('{"key": {"x": 1}, "val')  # cut short by a kill
    assert kept.get("a/1", {"x": 1}) is None
    assert not list((tmp_path / "k" / "a").glob("*.tmp"))
