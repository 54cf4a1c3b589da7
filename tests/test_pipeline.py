"""Training batches as a function of (seed, step): every image once per epoch, the same batch after
a restart, evaluation batches that cover a split; the throughput probe the benchmark calls."""
import jax
import numpy as np
import pytest

from resnet_jax import parallel
from resnet_jax.data import pipeline, sources
from resnet_jax.errors import UserError


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh(jax.devices()[:1])


def test_order_is_a_function_of_seed_and_step(mesh):
    ds = sources.load("synthetic:100", "train")
    a = pipeline.DeviceInput(ds, 32, mesh, seed=1)
    assert a.steps_per_epoch == 3
    epoch0 = np.concatenate([a.indices(s) for s in range(3)])
    assert len(set(epoch0)) == 96  # each image at most once; 4 left over, differing by epoch
    epoch1 = np.concatenate([a.indices(s) for s in range(3, 6)])
    assert len(set(epoch1)) == 96 and not np.array_equal(epoch0, epoch1)
    fresh = pipeline.DeviceInput(ds, 32, mesh, seed=1)  # a restarted run
    np.testing.assert_array_equal(fresh.indices(4), a.indices(4))
    assert not np.array_equal(pipeline.DeviceInput(ds, 32, mesh, seed=2).indices(4), a.indices(4))
    images, labels = a.batch(4)
    again_images, again_labels = fresh.batch(4)
    np.testing.assert_array_equal(np.asarray(images), np.asarray(again_images))
    np.testing.assert_array_equal(np.asarray(labels), ds.labels[a.indices(4)])
    assert not np.array_equal(np.asarray(images), ds.images[a.indices(4)])  # augmented


def test_eval_batches_cover_the_split_once(mesh):
    ds = sources.load("synthetic:70", "test")
    seen = []
    for images, labels, mask in pipeline.eval_batches(ds, 32, mesh):
        assert images.shape == (32, 32, 32, 3)
        seen.append(np.asarray(labels)[np.asarray(mask)])
    np.testing.assert_array_equal(np.concatenate(seen), ds.labels)


def test_too_small_a_split_and_the_throughput_probe(mesh):
    with pytest.raises(UserError, match="fewer than one batch of 64"):
        pipeline.DeviceInput(sources.load("synthetic:40", "train"), 64, mesh)
    rate = pipeline.input_throughput(sources.load("synthetic:64", "train"), 32, mesh, steps=2, warmup=1)
    assert rate > 0
