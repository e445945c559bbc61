"""Packed low-bit weights and the dequant-matmul: Pallas GPU kernels and a pure-jnp reference."""
