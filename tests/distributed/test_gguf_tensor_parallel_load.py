"""A tiny Llama GGUF (every block type the bundled models use, q/k rows in
llama.cpp's rope order, a vocabulary that does not split evenly) loaded on
two gloo ranks: each rank's model, loaded through lazy GGUF views (the
model runner's path), equals bit for bit the same model loaded from whole
dequantized (or whole block) tensors that the weight loaders narrow, while
reading only about half of the file's tensor data, both dequantized at load
and with the ``gguf`` quantization method (blocks kept; the attention output
projection, split inside its Q4_K blocks, falls back to dense).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from transformers import LlamaConfig, LlamaForCausalLM

from tests.distributed.ranks import run_checks_on_rank, run_ranks

pytestmark = pytest.mark.slow
WORLD = 2
_TIMEOUT_S = 240

TYPES = {"token_embd": Q.Q4_K, "output": Q.Q6_K, "attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q5_0,
         "attn_output": Q.Q4_K, "ffn_gate": Q.Q8_0, "ffn_up": Q.Q8_0, "ffn_down": Q.Q6_K}


def _write_tiny_gguf(path: Path) -> None:
    from tests.loader.test_gguf import _tiny_gguf_tensors, write_gguf_data
    from tests.loader.test_gguf_slices import _blocks

    config = LlamaConfig(vocab_size=99, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    state = {k: v.detach() for k, v in LlamaForCausalLM(config).state_dict().items()}
    data = {}
    for i, (name, array) in enumerate(_tiny_gguf_tensors(config, state).items()):
        qtype = TYPES.get(name.split(".")[-2], Q.F32)
        if qtype in (Q.Q4_K, Q.Q6_K):  # gguf-py cannot quantize k-quants: random blocks
            data[name] = (_blocks(qtype, *array.shape, seed=i), qtype)
        else:
            data[name] = (gguf.quants.quantize(array, qtype), qtype)
    write_gguf_data(path, "llama", config, data)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype == torch.float32:
        a, b = a.view(torch.int32), b.view(torch.int32)
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def _check_load(work: str, quantization: str | None) -> None:
    from ember.engine.arg_utils import EngineArgs
    from ember.layers.attention import get_attention_backend
    from ember.layers.quantization import get_quant_config
    from ember.layers.quantization.gguf import GGUFDequantizeAtLoadMethod, GGUFLinearMethod
    from ember.loader import gguf_tensor, iter_weights, resolve_model_source
    from ember.loader.gguf import read_gguf
    from ember.models.registry import ModelRegistry
    from ember.worker.common import default_dtype

    path = str(Path(work, "tiny.gguf"))
    mc = EngineArgs(model=path, device="cpu", dtype="float32", quantization=quantization,
                    skip_tokenizer_init=True).create_engine_config().model_config
    assert mc.quantization == quantization
    read: list[int] = []
    original = gguf_tensor._read
    gguf_tensor._read = lambda view: (read.append(view.nbytes), original(view))[1]
    models, bytes_read = {}, {}
    try:
        for lazy in (True, False):
            quant_config = get_quant_config(mc.quantization, mc.hf_config)
            with default_dtype(mc.dtype):
                model = ModelRegistry.load_class(mc.architecture)(mc.hf_config, get_attention_backend("torch"),
                                                                   quant_config=quant_config)
            read.clear()
            keep = quant_config is not None and quant_config.raw_checkpoint
            model.load_weights(iter_weights(resolve_model_source(path), mc.dtype, keep, lazy=lazy))
            models[lazy], bytes_read[lazy] = model, sum(read)
    finally:
        gguf_tensor._read = original
    whole = sum(int(t.n_bytes) for t in read_gguf(path).tensors.values() if len(t.shape) == 2)
    assert bytes_read[False] == whole  # every 2-D tensor read whole, then narrowed
    # Half of every tensor, except the Q4_K attention output of one block per row, read by both.
    assert 0.45 * whole < bytes_read[True] < 0.56 * whole, (bytes_read[True], whole)
    eager = dict(models[False].named_parameters())
    for name, param in models[True].named_parameters():
        assert _same_bits(param.data, eager[name].data), name
    layer = models[True].model.layers[0]
    if quantization == "gguf":
        qkv = layer.self_attn.qkv_proj.quant_method
        assert isinstance(qkv, GGUFLinearMethod) and not qkv.uniform  # Q4_0 / Q4_1 / Q5_0 per projection
        assert isinstance(layer.self_attn.o_proj.quant_method, GGUFDequantizeAtLoadMethod)  # 128 of 256
        assert isinstance(layer.mlp.down_proj.quant_method, GGUFLinearMethod)  # 256 of 512: one Q6_K block
    else:
        # 2 of 4 query heads and 1 of 2 KV heads of 64; the MLP's half of 512.
        assert layer.self_attn.qkv_proj.weight.shape == ((2 + 1 + 1) * 64, 256)
        assert layer.mlp.down_proj.weight.shape == (256, 256)


def _rank_main(rank: int, init_file: str, work: str) -> None:
    checks = {str(q): partial(_check_load, work, q) for q in (None, "gguf")}
    run_checks_on_rank(rank, WORLD, init_file, work, checks, timeout_s=_TIMEOUT_S)


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict[str, str]]:
    work = tmp_path_factory.mktemp("gguf_tp_load")
    _write_tiny_gguf(work / "tiny.gguf")
    return run_ranks(_rank_main, WORLD, work, timeout_s=_TIMEOUT_S)


@pytest.mark.parametrize("quantization", [None, "gguf"])
def test_each_rank_reads_its_half_and_loads_the_narrowed_weights(rank_results, quantization) -> None:
    for rank, res in enumerate(rank_results):
        assert res.get(str(quantization)) == "ok", f"rank {rank}:\n{res.get(str(quantization))}"
