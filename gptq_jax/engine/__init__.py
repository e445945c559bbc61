"""The model-agnostic engine: operation-level capture (``trace``), stages (``plan``), the block-by-block driver
(``driver.quantize``), per-weight rules (``rules``), and packed inference of any model (``packed``)."""
