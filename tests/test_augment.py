"""The paper's augmentations on small synthetic images: what each crop, flip and colour shift does."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax.data import augment


def _images(n=6, h=8, w=8):
    return np.random.default_rng(0).integers(1, 256, (n, h, w, 3), dtype=np.uint8)


def test_crop_flip_with_chosen_draws():
    images = _images()
    padded = jnp.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
    offsets = jnp.array([[2, 2], [0, 0], [4, 4], [2, 2], [0, 3], [1, 4]])
    flips = jnp.array([False, False, False, True, False, True])
    out = np.asarray(augment.crop_flip(padded, offsets, flips, (8, 8)))
    np.testing.assert_array_equal(out[0], images[0])  # the centre crop is the image
    np.testing.assert_array_equal(out[3], images[3][:, ::-1])  # ... mirrored
    # top-left offset: two black rows and columns of padding, then the image
    assert (out[1][:2] == 0).all() and (out[1][:, :2] == 0).all()
    np.testing.assert_array_equal(out[1][2:, 2:], images[1][:6, :6])
    np.testing.assert_array_equal(out[2][:6, :6], images[2][2:, 2:])
    np.testing.assert_array_equal(out[4], np.asarray(padded[4])[0:8, 3:11])
    np.testing.assert_array_equal(out[5], np.asarray(padded[5])[1:9, 4:12][:, ::-1])


def test_pad_crop_flip_is_a_window_of_the_padded_image_and_deterministic():
    images = _images(32)
    out = np.asarray(augment.pad_crop_flip(jnp.asarray(images), jax.random.key(3), pad=4))
    assert out.shape == images.shape and out.dtype == np.uint8
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    windows = [(r, c, f) for r in range(9) for c in range(9) for f in (False, True)]
    found = []
    for i in range(len(images)):
        hits = [(r, c, f) for r, c, f in windows
                if np.array_equal(out[i], padded[i, r:r + 8, c:c + 8][:, ::-1] if f
                                  else padded[i, r:r + 8, c:c + 8])]
        assert hits, f"image {i} is no crop of its padded image"
        found.append(hits[0])
    assert len(set(found)) > 8, "the draws do not vary"
    assert any(f for _, _, f in found) and not all(f for _, _, f in found)
    again = augment.pad_crop_flip(jnp.asarray(images), jax.random.key(3), pad=4)
    np.testing.assert_array_equal(out, np.asarray(again))
    other = augment.pad_crop_flip(jnp.asarray(images), jax.random.key(4), pad=4)
    assert not np.array_equal(out, np.asarray(other))


def test_resize_shorter_side_keeps_aspect():
    image = np.zeros((20, 30, 3), np.uint8)
    assert augment.resize_shorter_side(image, 10).shape == (10, 15, 3)
    assert augment.resize_shorter_side(image.transpose(1, 0, 2), 40).shape == (60, 40, 3)
    assert augment.resize_shorter_side(image, 20) is image


def test_ten_crops_are_corners_centre_and_their_mirrors():
    image = np.arange(6 * 7 * 3, dtype=np.uint8).reshape(6, 7, 3)
    crops = augment.ten_crops(image, 4)
    assert crops.shape == (10, 4, 4, 3)
    np.testing.assert_array_equal(crops[0], image[:4, :4])
    np.testing.assert_array_equal(crops[3], image[2:, 3:])
    np.testing.assert_array_equal(crops[4], image[1:5, 1:5])
    np.testing.assert_array_equal(crops[5:], crops[:5, :, ::-1])
    with pytest.raises(ValueError, match="crop 8"):
        augment.crop(image, 0, 0, 8)


def test_pca_lighting_moves_pixels_along_the_eigenvectors():
    image = np.full((2, 2, 3), 0.5, np.float32)
    np.testing.assert_array_equal(augment.pca_lighting(image, np.zeros(3)), image)
    shift = augment.pca_lighting(image, np.array([1.0, 0.0, 0.0])) - image
    np.testing.assert_allclose(shift[0, 0], augment.PCA_EIGVEC[:, 0] * augment.PCA_EIGVAL[0], rtol=1e-6)
    assert np.allclose(shift, shift[0, 0])  # the same shift for every pixel


def test_imagenet_train_crop_and_eval_shapes_and_determinism():
    image = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    kw = dict(size=8, scale=(10, 14))
    a = augment.imagenet_train_crop(image, np.random.default_rng(5), **kw)
    b = augment.imagenet_train_crop(image, np.random.default_rng(5), **kw)
    assert a.shape == (8, 8, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    draws = {augment.imagenet_train_crop(image, np.random.default_rng(s), **kw).tobytes()
             for s in range(8)}
    assert len(draws) > 4
    shifted = np.asarray(augment.flip_lighting(a[None], jax.random.key(0), pca_std=0.1))[0]
    plain = np.asarray(augment.flip_lighting(a[None], jax.random.key(0), pca_std=0.0))[0]
    assert 0 < np.abs(shifted.astype(int) - plain).max() < 16  # PCA shifts by a few grey levels
    assert augment.imagenet_eval(image, size=8, resize=10).shape == (8, 8, 3)
    assert augment.imagenet_eval(image, size=8, resize=10, ten_crop=True).shape == (10, 8, 8, 3)
