"""The pure core, one layer at a time: ``QuantConfig`` (config), the grid and round-to-nearest (quantizer),
Hessian accumulation (hessian), the GPTQ solver (gptq), and calibration windows (calibration). Imports nothing
else of gptq_jax."""
