"""Speed of resnet-jax against the PyTorch reference in the same run: `python -m benchmarks.run`."""
