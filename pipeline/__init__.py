"""castlora's ML core: plain Python on torch/diffusers/transformers. Never imports dagster."""

__version__ = "0.1.0"
