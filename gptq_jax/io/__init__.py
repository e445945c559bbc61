"""Files in and out: HF GPTQ checkpoints and Orbax (checkpoint), GGUF import (gguf), the default model
(default_model), calibration and evaluation text (text)."""
