"""GPTQ post-training quantization for JAX."""
