"""Linear and vocabulary layers: the quant_method hook, and the tensor-parallel
shards their weight_loaders take, checked by building every rank's layer in
one process (a world whose collectives are identities) and putting the
shards' outputs back together against the full float32 product."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ember.distributed import parallel_state
from ember.distributed.communicator import Communicator
from ember.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                                 ReplicatedLinear, RowParallelLinear, UnquantizedLinearMethod)
from ember.layers.quantization.base import LinearMethodBase, QuantizationConfig
from ember.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding


class _LocalWorld(Communicator):
    """Rank ``rank`` of ``world_size`` whose collectives return their input
    (each rank's output is inspected on its own)."""

    def all_reduce(self, x):
        return x

    def all_gather(self, x, dim=-1):
        return x


def _on_rank(monkeypatch, rank: int, world: int, build):
    monkeypatch.setattr(parallel_state, "_TP", _LocalWorld(rank, world, group=object()))
    return build()


def test_column_and_merged_shards_concatenate_to_the_full_output(monkeypatch):
    torch.manual_seed(0)
    w_gate, w_up, b = torch.randn(8, 6), torch.randn(8, 6), torch.randn(16)
    x = torch.randn(3, 6)
    outs = []
    for rank in range(2):
        layer = _on_rank(monkeypatch, rank, 2, lambda: MergedColumnParallelLinear(6, [8, 8], bias=True))
        assert layer.weight.shape == (8, 6) and layer.output_partition_sizes == [4, 4]
        layer.weight_loader(layer.weight, w_gate, 0)
        layer.weight_loader(layer.weight, w_up, 1)
        layer.weight_loader(layer.bias, b[:8], 0)
        layer.weight_loader(layer.bias, b[8:], 1)
        outs.append(layer(x))
    gate = torch.cat([o[:, :4] for o in outs], 1)
    up = torch.cat([o[:, 4:] for o in outs], 1)
    torch.testing.assert_close(gate, x @ w_gate.T + b[:8])
    torch.testing.assert_close(up, x @ w_up.T + b[8:])
    with pytest.raises(ValueError, match="not divisible"):
        _on_rank(monkeypatch, 0, 2, lambda: ColumnParallelLinear(6, 7))


def test_row_shards_sum_to_the_full_output_with_the_bias_once(monkeypatch):
    torch.manual_seed(1)
    w, b, x = torch.randn(5, 8), torch.randn(5), torch.randn(2, 8)
    total = 0
    for rank in range(2):
        layer = _on_rank(monkeypatch, rank, 2, lambda: RowParallelLinear(8, 5, bias=True, reduce_results=False))
        layer.weight_loader(layer.weight, w)
        layer.weight_loader(layer.bias, b)
        total = total + layer(x[:, rank * 4:(rank + 1) * 4])
    torch.testing.assert_close(total, x @ w.T + b)
    # With the reduction (an identity here) each rank adds the bias after it;
    # given the full input, a rank takes its slice.
    layer = _on_rank(monkeypatch, 1, 2, lambda: RowParallelLinear(8, 5, bias=True))
    layer.weight_loader(layer.weight, w)
    layer.weight_loader(layer.bias, b)
    torch.testing.assert_close(layer(x[:, 4:]), x[:, 4:] @ w[:, 4:].T + b)
    layer.input_is_parallel = False
    torch.testing.assert_close(layer(x), x[:, 4:] @ w[:, 4:].T + b)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_qkv_shards_split_or_replicate_the_kv_heads(monkeypatch, world):
    # 4 query heads, 2 KV heads of size 3: at tp 4 each KV head lives on two ranks.
    torch.manual_seed(2)
    q, k, v = torch.randn(12, 5), torch.randn(6, 5), torch.randn(6, 5)
    for rank in range(world):
        layer = _on_rank(monkeypatch, rank, world, lambda: QKVParallelLinear(5, 3, 4, 2, prefix="attn.qkv_proj"))
        for sid, t in (("q", q), ("k", k), ("v", v)):
            layer.weight_loader(layer.weight, t, sid)
        nq, nkv = 4 // world, max(1, 2 // world)
        kv_head = rank * nkv if world <= 2 else rank // (world // 2)
        assert torch.equal(layer.weight[: nq * 3], q[rank * nq * 3:(rank + 1) * nq * 3])
        assert torch.equal(layer.weight[nq * 3: nq * 3 + nkv * 3], k[kv_head * 3:(kv_head + nkv) * 3])
        assert torch.equal(layer.weight[nq * 3 + nkv * 3:], v[kv_head * 3:(kv_head + nkv) * 3])
    with pytest.raises(ValueError, match="do not split"):
        _on_rank(monkeypatch, 0, 3, lambda: QKVParallelLinear(5, 3, 6, 2))


def test_vocab_shards_pad_the_vocabulary_and_mask_foreign_ids(monkeypatch):
    torch.manual_seed(3)
    table = torch.randn(7, 4)  # 7 rows over 2 ranks: padded to 8
    ids = torch.tensor([0, 3, 4, 6, 2])
    h = torch.randn(2, 4)
    embedded, logits = 0, []
    for rank in range(2):
        emb = _on_rank(monkeypatch, rank, 2, lambda: VocabParallelEmbedding(7, 4))
        head = _on_rank(monkeypatch, rank, 2, lambda: ParallelLMHead(7, 4))
        assert emb.weight.shape == (4, 4)
        emb.weight_loader(emb.weight, table)
        head.weight_loader(head.weight, table)
        embedded = embedded + emb(ids)
        logits.append(head.quant_method.apply(head, h))
    torch.testing.assert_close(embedded, F.embedding(ids, table))
    full = torch.cat(logits, 1)
    assert torch.equal(full[:, 7], torch.zeros(2))  # the padding row
    torch.testing.assert_close(full[:, :7], h @ table.T)


class _Scaled(LinearMethodBase):
    """A method of its own layout: weight stored transposed, an output scale."""

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype):
        n = sum(output_partition_sizes)
        layer.weight_t = torch.nn.Parameter(torch.empty(input_size_per_partition, n), requires_grad=False)
        layer.scale = torch.nn.Parameter(torch.ones(n), requires_grad=False)
        self.seen = (input_size_per_partition, list(output_partition_sizes), input_size, output_size, params_dtype)

    def process_weights_after_loading(self, layer):
        layer.scale.data.fill_(2.0)

    def apply(self, layer, x, bias=None):
        y = (x @ layer.weight_t) * layer.scale
        return y if bias is None else y + bias


class _Config(QuantizationConfig):
    def __init__(self):
        self.prefixes = []

    @classmethod
    def get_name(cls):
        return "scaled-test"

    @classmethod
    def from_config(cls, config):
        return cls()

    def get_quant_method(self, layer, prefix):
        self.prefixes.append(prefix)
        return _Scaled() if prefix.endswith("proj") else None


def test_quant_config_picks_the_method_by_prefix():
    config = _Config()
    quantized = ReplicatedLinear(4, 3, bias=True, dtype=torch.float32, quant_config=config, prefix="l.proj")
    plain = ReplicatedLinear(4, 3, quant_config=config, prefix="l.other")
    assert config.prefixes == ["l.proj", "l.other"]
    assert isinstance(plain.quant_method, UnquantizedLinearMethod) and plain.weight.shape == (3, 4)
    assert quantized.quant_method.seen == (4, [3], 4, 3, torch.float32)
    assert not hasattr(quantized, "weight")
    x = torch.randn(2, 4)
    quantized.weight_t.data.normal_()
    quantized.bias.data.normal_()
    quantized.quant_method.process_weights_after_loading(quantized)
    torch.testing.assert_close(quantized(x), 2 * (x @ quantized.weight_t) + quantized.bias)
    with pytest.raises(ValueError, match="cannot take"):
        VocabParallelEmbedding(8, 4, quant_config=_Config(), prefix="model.embed_proj")
