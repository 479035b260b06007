"""flatspec_jax: flatness-filtered training of EAGLE speculative-decoding draft heads in JAX."""

__version__ = "0.1.0"
