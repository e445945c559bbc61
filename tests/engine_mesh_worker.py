"""Run by tests/test_engine_mesh.py in a subprocess with 8 CPU devices: the engine on meshes against one device."""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from helpers_models import tiny_config  # noqa: E402

from gptq_jax import QuantConfig, quantize  # noqa: E402
from gptq_jax.core.calibration import Calibration  # noqa: E402
from gptq_jax.engine.sharding import make_mesh, parse_mesh_spec  # noqa: E402
from gptq_jax.models import LlamaForCausalLM, ModelConfig, make_forward  # noqa: E402


def _mesh(spec: str):
    n = int(np.prod(list(parse_mesh_spec(spec).values())))
    return make_mesh(spec, devices=jax.devices()[:n])


def _perplexity(logits: np.ndarray, tok: np.ndarray) -> float:
    """Next-token perplexity of ``tok`` under ``logits`` (the calibration windows themselves)."""
    lp = jax.nn.log_softmax(logits[:, :-1].astype(np.float32), axis=-1)
    nll = -np.take_along_axis(np.asarray(lp), tok[:, 1:, None], axis=-1)
    return float(np.exp(nll.mean()))


def main() -> None:
    assert len(jax.devices()) == 8
    config = ModelConfig.from_hf_dict(tiny_config("llama"))
    tok = np.random.default_rng(0).integers(0, 128, (8, 16))
    calib = Calibration.from_tokens(tok)
    qc = QuantConfig(bits=4, group_size=32, act_order=True)
    ref = quantize(LlamaForCausalLM(config, rngs=nnx.Rngs(0)), calib, quant_config=qc, batch_size=4)
    ref_logits = np.asarray(make_forward(ref.model)(tok)[0])
    ref_ppl = _perplexity(ref_logits, tok)
    out = {}
    for spec in sys.argv[1:]:
        res = quantize(LlamaForCausalLM(config, rngs=nnx.Rngs(0)), calib, quant_config=qc, batch_size=4,
                       mesh=_mesh(spec))
        equal = [float(np.mean(np.asarray(res.weights[n].codes) == np.asarray(q.codes)))
                 for n, q in ref.weights.items()]
        ratio = [float(res.weights[n].loss) / float(q.loss) for n, q in ref.weights.items()]
        logits = np.asarray(make_forward(res.model)(tok)[0])
        up = res.model.layers[0].mlp.up_proj.kernel.get_value()  # (64, 128) with a model axis: split over it
        up_spec = tuple(up.sharding.spec)
        out[spec] = {"min_equal": min(equal), "mean_equal": float(np.mean(equal)), "max_loss_ratio": max(ratio),
                     "min_loss_ratio": min(ratio), "logit_diff": float(np.abs(logits - ref_logits).max()),
                     "up_proj_spec": [str(a) for a in up_spec],
                     "ppl_ratio": _perplexity(logits, tok) / ref_ppl}
    try:
        quantize(LlamaForCausalLM(config, rngs=nnx.Rngs(0)), calib, quant_config=qc, batch_size=3,
                 mesh=_mesh("data=2,model=4"))
        out["bad_batch"] = "accepted"
    except ValueError as e:
        out["bad_batch"] = str(e)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
