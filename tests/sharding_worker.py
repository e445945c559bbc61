"""Runs in a subprocess with 8 fake CPU devices (``test_sharding.py`` starts it): sharded Hessians, sharded GPTQ
solves and tensor-parallel inference against one device. Prints one JSON object of measurements on its last line;
the test asserts on them. Usage: ``python tests/sharding_worker.py`` (sets XLA_FLAGS itself before importing jax).
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gptq_jax import QuantConfig, accumulate_hessian, init_hessian, quantize_weight, rtn_quantize  # noqa: E402
from gptq_jax.engine import sharding as S  # noqa: E402

MESHES = {"1": "data=1,model=1", "2x1": "data=2,model=1", "1x2": "data=1,model=2", "4x2": "data=4,model=2"}
# The hardest config (act-order with groups fitted during the solve) on every mesh; the rest on 4x2.
GRID_CONFIG = QuantConfig(bits=4, group_size=32, act_order=True)
CONFIGS = {
    "g32_act": GRID_CONFIG,
    "g32_sym": QuantConfig(bits=4, group_size=32),
    "perchannel_asym": QuantConfig(bits=3, group_size=-1, sym=False),
    "g32_act_static": QuantConfig(bits=4, group_size=32, act_order=True, static_groups=True),
}


def compare(q, ref) -> dict:
    codes, ref_codes = np.asarray(q.codes), np.asarray(ref.codes)
    return {
        "equal_codes": float(np.mean(codes == ref_codes)),
        "loss_ratio": float(q.loss) / float(ref.loss),
        "shape": list(codes.shape),
        "scales_close": bool(np.allclose(np.asarray(q.scales), np.asarray(ref.scales), rtol=1e-2)),
        "g_idx_equal": bool(np.array_equal(np.asarray(q.g_idx), np.asarray(ref.g_idx))),
    }


def _count_all_reduces(lowered) -> int:
    text = lowered.compile().as_text()
    return sum(1 for line in text.splitlines() if " all-reduce(" in line or " all-reduce-start(" in line)


def solves() -> dict:
    rng = np.random.default_rng(0)
    n, k = 96, 128
    # Correlated activations, as real ones are, so that act-order and the feedback matter.
    mix = rng.standard_normal((k, k)).astype(np.float32) / np.sqrt(k) + np.eye(k, dtype=np.float32)
    x = (rng.standard_normal((8, 16, k)).astype(np.float32) * rng.uniform(0.2, 2.0, k).astype(np.float32)) @ mix
    mask = (rng.uniform(size=(8, 16)) > 0.1).astype(np.int32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    h1, n1 = accumulate_hessian(*init_hessian(k), x, mask)  # one device, the reference
    refs = {name: quantize_weight(w, h1, cfg) for name, cfg in CONFIGS.items()}
    out = {"hessian": {}, "solve": {}}
    for label, spec in MESHES.items():
        sizes = S.parse_mesh_spec(spec)
        mesh = S.make_mesh(spec, jax.devices()[: sizes["data"] * sizes["model"]])
        h, cnt = S.accumulate_hessian_sharded(*S.init_hessian_sharded(k, mesh), x, mask, mesh=mesh)
        out["hessian"][label] = {
            "max_rel_diff": float(jnp.max(jnp.abs(h - h1)) / jnp.max(jnp.abs(h1))),
            "tokens": int(cnt),
            "tokens_ref": int(n1),
            "replicated": bool(h.sharding.is_fully_replicated),
        }
        names = list(CONFIGS) if label == "4x2" else ["g32_act"]
        for name in names:
            q = S.quantize_weight_sharded(w, h, CONFIGS[name], mesh=mesh)
            out["solve"][f"{label}/{name}"] = {**compare(q, refs[name]), "codes_spec": str(q.codes.sharding.spec)}
    # No mask, and the all-reduces in the compiled folds (one per call, the token count riding along).
    h_nomask, _ = S.accumulate_hessian_sharded(*S.init_hessian_sharded(k, mesh), x, mesh=mesh)
    h_ref_nomask, _ = accumulate_hessian(*init_hessian(k), x)
    out["hessian"]["4x2/nomask"] = {
        "max_rel_diff": float(jnp.max(jnp.abs(h_nomask - h_ref_nomask)) / jnp.max(jnp.abs(h_ref_nomask)))
    }
    zeros = S.init_hessian_sharded(k, mesh)
    out["hessian"]["4x2/all_reduces"] = {
        "mask": _count_all_reduces(S._hessian_fold(mesh, True).lower(*zeros, x, mask)),
        "nomask": _count_all_reduces(S._hessian_fold(mesh, False).lower(*zeros, x)),
    }
    try:  # 6 windows on a data axis of 4
        S.accumulate_hessian_sharded(*zeros, x[:6], mask[:6], mesh=mesh)
        out["hessian"]["4x2/batch6_error"] = None
    except ValueError as e:
        out["hessian"]["4x2/batch6_error"] = str(e)
    # The same H on one device and on the mesh: only the row split differs.
    q = S.quantize_weight_sharded(w, h1, GRID_CONFIG, mesh=mesh)
    out["solve"]["4x2/g32_act/same_h"] = compare(q, refs["g32_act"])
    # Rows that do not divide the model axis: padded and cut off.
    mesh = S.make_mesh("data=2,model=4")
    w90 = w[:90]
    q = S.quantize_weight_sharded(w90, h1, GRID_CONFIG, mesh=mesh)
    out["solve"]["2x4/pad90"] = compare(q, quantize_weight(w90, h1, GRID_CONFIG))
    # Rows over every device: 96 rows on 8 devices.
    q = S.quantize_weight_sharded(w, h1, CONFIGS["g32_sym"], mesh=mesh, axes=("data", "model"))
    out["solve"]["2x4/all_axes"] = compare(q, refs["g32_sym"])
    return out


def inference() -> dict:
    from flax import nnx
    from helpers_models import random_tokens, tiny_config

    from gptq_jax.models import LlamaForCausalLM, ModelConfig, make_forward
    from gptq_jax.models.qlinear import pack_model
    from gptq_jax.models.sharded_inference import shard_packed_model

    config = ModelConfig.from_hf_dict(tiny_config("llama_bias"))
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(1)
    weights = {}
    for i, layer in enumerate(model.layers):
        for sub in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            mod = layer
            for part in sub.split("."):
                mod = getattr(mod, part)
            w = np.asarray(mod.kernel[...]).T  # (N, K)
            if sub in ("self_attn.o_proj", "mlp.down_proj"):
                # Act-order GPTQ on the row-parallel linears, so their packed weights carry a permutation.
                x = rng.standard_normal((64, w.shape[1])).astype(np.float32) * rng.uniform(0.1, 3, w.shape[1])
                h, _ = accumulate_hessian(*init_hessian(w.shape[1]), x)
                weights[f"layers.{i}.{sub}.kernel"] = quantize_weight(w, h, QuantConfig(group_size=16, act_order=True))
            else:
                weights[f"layers.{i}.{sub}.kernel"] = rtn_quantize(w, QuantConfig(group_size=16, sym=False))
    pack_model(model, weights)
    tokens = random_tokens(2, 12, config.vocab_size, seed=4)
    ref = np.asarray(make_forward(model)(tokens)[0])  # one device

    mesh = S.make_mesh("data=2,model=4")
    report = shard_packed_model(model, mesh)
    sharded_tokens = jax.device_put(jnp.asarray(tokens, jnp.int32), S.data_sharding(mesh, 2))
    logits = np.asarray(make_forward(model)(sharded_tokens)[0])
    q_proj = model.layers[0].self_attn.q_proj.packed.qweight
    graphdef, state = nnx.split(model)
    hlo = (
        jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0]).lower(state, sharded_tokens).compile().as_text()
    )
    return {
        "max_abs_diff": float(np.max(np.abs(logits - ref))),
        "max_abs_ref": float(np.max(np.abs(ref))),
        "report": report,
        "q_proj_shard_shape": list(q_proj.addressable_shards[0].data.shape),
        "q_proj_shape": list(q_proj.shape),
        "all_reduces": sum(1 for line in hlo.splitlines() if " all-reduce(" in line or " all-reduce-start(" in line),
    }


def main() -> None:
    t0 = time.perf_counter()
    out = {"devices": jax.device_count()}
    out.update(solves())
    out["solve_seconds"] = time.perf_counter() - t0
    out["inference"] = inference()
    out["seconds"] = time.perf_counter() - t0
    print(json.dumps(out))


if __name__ == "__main__":
    main()
