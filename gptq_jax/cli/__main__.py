"""``python -m gptq_jax.cli``: the same as the ``gptq-jax`` command."""

import sys

from gptq_jax.cli import main

sys.exit(main())
