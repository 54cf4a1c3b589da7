"""Progress lines: the ETA arithmetic."""
from resnet_jax import progress


def test_images_line_gives_rate_and_time_left():
    assert progress.images_line(2500, 10000, 500.0) == "2500/10000 images, 500 images/s, ETA 0:00:15"
    assert progress.images_line(0, 100, None) == "0/100 images"  # no rate before the first batch
    assert progress.images_line(100, 100, None) == "100/100 images, ETA 0:00:00"
    assert progress.hms(3725.9) == "1:02:05" and progress.hms(float("inf")) == "?"

