"""resnet-jax: "Deep Residual Learning for Image Recognition" (He et al., 2016) in JAX/Flax.

    import resnet_jax
    model = resnet_jax.create_model("resnet56")
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    logits = model.apply(variables, images, train=False)
    responses = resnet_jax.capture_responses(model, variables, images)
"""
from resnet_jax.models import create_model, list_models, model_options, UnknownModelError
from resnet_jax.responses import capture_responses, is_response

__all__ = ["create_model", "list_models", "model_options", "capture_responses", "is_response",
           "UnknownModelError"]
__version__ = "0.1.0"
