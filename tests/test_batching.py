import jax
import numpy as np
import pytest

from resnet_jax.data.batching import nonfinite_rows, num_batches, padded_batches, topk_correct


@pytest.mark.parametrize("count,batch_size", [(10, 4), (8, 4), (3, 5), (1, 1)])
def test_padded_batches_cover_every_example_once(count, batch_size):
    images = np.arange(count * 2 * 2 * 3, dtype=np.uint8).reshape(count, 2, 2, 3)
    labels = np.arange(count, dtype=np.int32) + 100
    batches = list(padded_batches(images, labels, batch_size))
    assert len(batches) == num_batches(count, batch_size)
    for x, y, m in batches:
        assert x.shape == (batch_size, 2, 2, 3) and y.shape == m.shape == (batch_size,)
        assert m.dtype == bool
    seen = np.concatenate([y[m] for _, y, m in batches])
    np.testing.assert_array_equal(seen, labels)
    kept = np.concatenate([x[m] for x, _, m in batches])
    np.testing.assert_array_equal(kept, images)
    # the padding holds real images (not zeros) so a forward pass on it stays finite
    x, _, m = batches[-1]
    np.testing.assert_array_equal(x[~m], np.broadcast_to(images[0], x[~m].shape))


def test_padded_batches_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        list(padded_batches(np.zeros((3, 1)), np.zeros(2), 2))
    with pytest.raises(ValueError, match="positive"):
        list(padded_batches(np.zeros((3, 1)), np.zeros(3), 0))


def test_topk_correct_matches_numpy_and_ignores_mask():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 64).astype(np.int32)
    mask = rng.random(64) < 0.7
    got = jax.jit(topk_correct)(logits, labels, mask)
    order = np.argsort(-logits, axis=1)
    for k in (1, 5):
        hit = (order[:, :k] == labels[:, None]).any(1)
        assert int(got[f"top{k}"]) == int((hit & mask).sum())


def test_topk_correct_breaks_ties_like_argmax():
    logits = np.zeros((4, 10), np.float32)  # a constant output: argmax says class 0
    labels = np.array([0, 1, 5, 9], np.int32)
    got = topk_correct(logits, labels, np.ones(4, bool))
    assert int(got["top1"]) == 1  # only the row labelled 0
    assert int(got["top5"]) == 2  # classes 0..4 rank in the top 5


def test_non_finite_logits_and_foreign_labels_are_never_correct():
    """Every comparison with NaN is false, so a NaN row once ranked its label first: the issue's
    checkpoint with flipped bytes scored 100 %. A label outside the classes counted the same way."""
    logits = np.array([[np.nan] * 4,                          # NaN everywhere
                       [0.0, np.nan, 0.0, 0.0],               # NaN beside the label
                       [np.inf, 1.0, 0.0, 0.0],               # infinite
                       [0.0, 3.0, 2.0, 1.0],                  # label 7 of 4 classes
                       [0.0, 3.0, 2.0, 1.0],                  # label -1
                       [0.0, 3.0, 2.0, 1.0]], np.float32)     # label 1: correct
    labels = np.array([0, 0, 0, 7, -1, 1], np.int32)
    counts = jax.device_get(topk_correct(logits, labels, np.ones(6, bool), ks=(1, 4)))
    assert counts == {"top1": 1, "top4": 1}
    bad = nonfinite_rows(logits, np.zeros(6, np.float32), np.array([1, 1, 1, 1, 1, 0], bool))
    assert int(bad) == 3
    assert int(nonfinite_rows(logits, np.zeros(6, np.float32), np.array([0, 0, 0, 1, 1, 1], bool))) == 0
    assert int(nonfinite_rows(logits[3:], np.array([0, np.nan, 0], np.float32), np.ones(3, bool))) == 1


def test_padded_batches_of_one_shard_index_only_theirs():
    indexed = []

    class Lazy(np.ndarray):
        def __getitem__(self, key):
            indexed.append(key)
            return super().__getitem__(key)

    images = np.arange(10).view(Lazy)
    got = [(b.tolist(), m.tolist()) for b, _, m in
           padded_batches(images, np.zeros(10), 4, shard=(1, 2))]
    assert got == [([4, 5, 6, 7], [True] * 4)] and len(indexed) == 1
    got = [b.tolist() for b, _, _ in padded_batches(np.arange(10), np.zeros(10), 4, shard=(0, 2))]
    assert got == [[0, 1, 2, 3], [8, 9, 0, 0]]
