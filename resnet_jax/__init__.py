"""resnet-jax: "Deep Residual Learning for Image Recognition" (He et al., 2016) in JAX/Flax.

    import resnet_jax
    model = resnet_jax.create_model("resnet56")
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    x = resnet_jax.preprocessing("resnet56")(uint8_images)       # (pixels / 255 - mean) / std
    logits = model.apply(variables, x, train=False)
    responses = resnet_jax.capture_responses(model, variables, x)
    trained = resnet_jax.load("runs/resnet56")  # .model, .variables, .normalization (Preprocessing)
"""
import importlib

# Imported on first use (PEP 562), so that `resnet_jax.preload` can restart a command line tool
# before JAX is imported.
_EXPORTS = {"create_model": "resnet_jax.models", "list_models": "resnet_jax.models",
            "model_options": "resnet_jax.models", "UnknownModelError": "resnet_jax.models",
            "preprocessing": "resnet_jax.models", "Preprocessing": "resnet_jax.models",
            "ModelUsageError": "resnet_jax.models", "load": "resnet_jax.pretrained",
            "capture_responses": "resnet_jax.responses", "is_response": "resnet_jax.responses",
            "in_depth_order": "resnet_jax.responses"}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'resnet_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__():
    return sorted(list(globals()) + __all__)
