"""Real third-party Flax models through ``gptq_jax.quantize``: google-tunix 0.1.7's Qwen3 and Gemma3 (NNX) and
recurrentgemma 1.0.1's Griffin (Linen), tiny random configs. The engine was not written for them: their
projections are einsum weights (``[D, N, H]`` q/k/v, ``[N, H, D]`` o_proj contracting two axes, Gemma's stacked
``[2, K, D, H]`` kv weight), and their forward takes positions and a mask.

tunix's package ``__init__`` imports its trainers (and with them a large dependency set), so the wheel is fetched
with ``pip download --no-deps`` (``make test`` does it), unpacked, and only ``tunix.models`` is imported, through a
package stub whose path is the unpacked wheel; its models need ``einops`` and ``jaxtyping`` (test extras).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import types
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gptq_jax
from gptq_jax import QuantConfig
from gptq_jax.engine.packed import load_packed, pack, save_packed

WHEELS = Path(__file__).resolve().parent.parent / ".cache" / "wheels"


def _unpacked(requirement: str, glob: str) -> Path:
    """The wheel of ``requirement`` (``make test`` downloads it with --no-deps), unpacked once."""
    wheel = next(iter(WHEELS.glob(glob)), None)
    if wheel is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", requirement, "-d", str(WHEELS)],
                       check=True)
        wheel = next(WHEELS.glob(glob))
    root = WHEELS / wheel.stem
    if not (root / "tunix").is_dir():
        tmp = Path(tempfile.mkdtemp(dir=WHEELS))
        with zipfile.ZipFile(wheel) as z:
            z.extractall(tmp)
        try:
            tmp.rename(root)
        except OSError:  # another test worker unpacked it first
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _stub(name: str, path: Path) -> None:
    """A package whose submodules import from ``path`` while its own ``__init__`` never runs."""
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(path)]
        sys.modules[name] = pkg


@pytest.fixture(scope="module")
def tunix():
    _stub("tunix", _unpacked("google-tunix==0.1.7", "google_tunix-0.1.7-*.whl") / "tunix")
    from tunix.models.gemma3 import model as gemma3
    from tunix.models.qwen3 import model as qwen3

    return types.SimpleNamespace(qwen3=qwen3, gemma3=gemma3)


def _inputs(tokens):
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    return positions, mask


def _forward(model, tokens):
    positions, mask = _inputs(tokens)
    return model(tokens, positions, None, mask)[0]


def _models(tunix):
    q = tunix.qwen3.ModelConfig(num_layers=2, vocab_size=64, embed_dim=32, hidden_dim=64, num_heads=4, head_dim=8,
                                num_kv_heads=2, rope_theta=10000, norm_eps=1e-6)
    g = tunix.gemma3.ModelConfig(num_layers=2, num_embed=64, embed_dim=32, hidden_dim=64, num_heads=4, head_dim=8,
                                 num_kv_heads=2, sliding_window_size=4, param_dtype=jnp.float32)
    return {"qwen3": lambda: tunix.qwen3.Qwen3(q, rngs=nnx.Rngs(0)),
            "gemma3": lambda: tunix.gemma3.Gemma3(g, rngs=nnx.Rngs(0))}


def _expected_weights(model, blocks="layers"):
    """Every projection in the blocks: each float parameter of rank >= 2 under them (norm scales are rank 1)."""
    out = set()
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        p = ".".join(str(k) for k in path)
        if p.startswith(blocks + ".") and var[...].ndim >= 2:
            out.add(p)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_tunix_model_quantizes_packs_and_saves(tunix, name, tmp_path):
    make = _models(tunix)[name]
    rng = np.random.default_rng(0)
    calib = rng.integers(0, 64, (8, 16)).astype(np.int32)
    held = jnp.asarray(rng.integers(0, 64, (4, 16)).astype(np.int32))
    qc = QuantConfig(bits=3, group_size=16)
    ref = _forward(make(), held)

    g = make()
    res = gptq_jax.quantize(g, calib, forward=_forward, quant_config=qc)
    assert res.report.mode == "blocks" and len(res.report.layers) == 2
    assert set(res.weights) == _expected_weights(g)
    assert any(len(a) == 2 for a in res.axes.values())  # o_proj contracts two axes
    r = make()
    gptq_jax.quantize(r, calib, forward=_forward, quant_config=qc, method="rtn")
    err = lambda m: float(jnp.mean((_forward(m, held) - ref) ** 2))  # noqa: E731
    assert err(g) < err(r)

    packed = pack(g, res)
    positions, mask = _inputs(held)
    logits = packed(held, positions, None, mask)[0]
    np.testing.assert_allclose(np.asarray(logits), np.asarray(_forward(g, held)), rtol=1e-4, atol=1e-5)
    save_packed(packed, tmp_path / name)
    again = load_packed(make(), tmp_path / name)
    np.testing.assert_array_equal(np.asarray(again(held, positions, None, mask)[0]), np.asarray(logits))
    jax.clear_caches()


@pytest.mark.slow
def test_recurrentgemma_griffin_linen_block_by_block(tmp_path):
    """A Linen model from PyPI, quantized block by block (its ``blocks_0``, ``blocks_1`` parameter subtrees, a
    recurrent block then an attention block): Griffin's dense projections are quantized; its block-diagonal gates
    (a matmul with a batch axis), its conv and the tied embedding are reported and kept float."""
    root = _unpacked("recurrentgemma==1.0.1", "recurrentgemma-1.0.1-*.whl") / "recurrentgemma"
    _stub("recurrentgemma", root)  # its __init__ pulls in torch and sentencepiece; the model needs neither
    _stub("recurrentgemma.jax", root / "jax")
    from recurrentgemma import common
    from recurrentgemma.jax import griffin

    config = common.GriffinConfig(
        vocab_size=64, width=32, mlp_expanded_width=64, num_heads=2,
        block_types=(common.TemporalBlockType.RECURRENT, common.TemporalBlockType.ATTENTION),
        embeddings_scale_by_sqrt_dim=True, attention_window_size=8, logits_soft_cap=30.0, lru_width=32,
        scan_type=common.ScanType.LINEAR_NATIVE,
    )
    net = griffin.Griffin(config)
    rng = np.random.default_rng(0)
    calib = rng.integers(0, 64, (8, 16)).astype(np.int32)
    held = jnp.asarray(rng.integers(0, 64, (4, 16)).astype(np.int32))
    positions = jnp.broadcast_to(jnp.arange(16), (4, 16))
    params = net.init(jax.random.key(0), held, positions)["params"]

    def forward(p, tokens):
        return net.apply({"params": p}, tokens, jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape))[0]

    ref = forward(params, held)
    qc = QuantConfig(bits=3, group_size=16)
    res = gptq_jax.quantize(params, calib, apply_fn=net.apply, forward=forward, quant_config=qc)
    rtn = gptq_jax.quantize(params, calib, apply_fn=net.apply, forward=forward, quant_config=qc, method="rtn")
    assert res.report.mode == "blocks"
    assert [r["path"] for r in res.report.blocks] == ["blocks.0", "blocks.1"]
    assert "blocks.1.attention_block.proj_q.kernel" in res.weights
    assert "blocks.0.recurrent_block.linear_x.kernel" in res.weights
    reasons = {r["path"]: r["reason"] for r in res.report.unquantized}
    # The gates are block-diagonal (a weight per head, [H, i, j] read by a batched einsum): a stack, slice by slice.
    assert "blocks.0.recurrent_block.rg_lru.a_gate.w[0]" in res.weights
    assert "blocks.0.recurrent_block.rg_lru.a_gate.w" not in reasons
    assert reasons["embedder.input_embedding"] == "outside the repeated blocks"
    err = lambda p: float(jnp.mean((forward(p, held) - ref) ** 2))  # noqa: E731
    assert err(res.model) < err(rtn.model)
    packed = pack(res.model, res, apply_fn=net.apply)
    np.testing.assert_allclose(np.asarray(packed(held, positions)[0]), np.asarray(forward(res.model, held)),
                               rtol=1e-4, atol=1e-4)
