"""One process of a multi-process ``gptq-jax quantize`` (``test_multihost.py`` starts them).

``python tests/multihost_cli_worker.py ARGS...`` runs ``gptq_jax.cli.main(ARGS)``. With ``EXIT_AFTER_BLOCK=i`` in the
environment the process saves block ``i`` of its work and then exits at once (code 3), as a host that dies mid-run.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    if "EXIT_AFTER_BLOCK" in os.environ:
        from gptq_jax.engine.resume import ResumeStore

        real, last = ResumeStore.save, int(os.environ["EXIT_AFTER_BLOCK"])

        def save_then_exit(self, index, *a, **k):
            real(self, index, *a, **k)
            if index == last:
                os._exit(3)

        ResumeStore.save = save_then_exit
    from gptq_jax.cli import main

    sys.exit(main(sys.argv[1:]))
