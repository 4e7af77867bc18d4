"""The verification CUDA graphs' host logic on CPU: which steps they take,
the batch ladder, the staging and unpacking of a step into the graph buffers
(padding requests included), and a replay (run eagerly on the buffers, the
Triton kernels in the interpreter) against the plain-PyTorch backend on the
step's own packed inputs. The captured graphs themselves are checked on a GPU
(tests/spec_decode/test_verify_graphs_gpu.py)."""

from __future__ import annotations

from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
from torch import nn

from ember.layers.attention import Attention, AttentionMetadata, ForwardContext
from ember.layers.attention.torch_backend import TorchAttentionBackend
from ember.worker.common import HostInputs
from ember.worker.cuda_graph import VerifyCUDAGraphRunner, stage_verify_inputs, uniform_query_len
from tests.kernels.interpret import DEVICE, ON_GPU

pytest.importorskip("triton")
BLOCK = 4
HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 4, 2, 16, 64


def _host(counts: list[int], computed: list[int], seed: int = 0, in_flight: bool = False) -> HostInputs:
    """A packed step: request i has ``computed[i]`` cached tokens and ``counts[i]`` new ones."""
    rng = np.random.default_rng(seed)
    n = len(counts)
    qsl = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    seq_lens = np.array(computed, dtype=np.int64) + counts
    width = int(max(-(-seq_lens // BLOCK)))
    perm = rng.permutation(n * width + 4)
    table = perm[: n * width].reshape(n, width).astype(np.int32)
    req_of = np.repeat(np.arange(n), counts)
    pos = np.array(computed)[req_of] + np.arange(qsl[-1]) - qsl[:-1][req_of]
    slots = table[req_of, pos // BLOCK].astype(np.int64) * BLOCK + pos % BLOCK
    ids = rng.integers(0, 50, int(qsl[-1]))
    return HostInputs(ids, pos.astype(np.int64), slots, qsl, seq_lens.astype(np.int32), table, max(counts), [], [],
                      counts.count(1), [f"r{i}" for i in range(n)], [0] if in_flight else [],
                      [0] if in_flight else [])


def _config(budget: int = 64, max_model_len: int = 64):
    return SimpleNamespace(scheduler_config=SimpleNamespace(max_num_batched_tokens=budget),
                           model_config=SimpleNamespace(num_kv_heads=KV_HEADS, max_model_len=max_model_len),
                           cache_config=SimpleNamespace(block_size=BLOCK))


def test_uniform_query_len() -> None:
    assert uniform_query_len(_host([3, 3, 3], [5, 9, 2])) == 3
    assert uniform_query_len(_host([5], [1])) == 5
    assert uniform_query_len(_host([1, 1], [4, 4])) == 0  # plain decode: the decode graphs' step
    assert uniform_query_len(_host([3, 2], [5, 5])) == 0  # fewer drafts for one request
    assert uniform_query_len(_host([1, 3], [5, 5])) == 0
    assert uniform_query_len(_host([3, 3], [5, 5], in_flight=True)) == 3  # ids still on the device are staged too


def test_ladder_and_choice_of_graph() -> None:
    runner = VerifyCUDAGraphRunner(None, [], _config(budget=64), [2, 3, 5], 24, torch.device(DEVICE), 8)
    assert runner.sizes == {2: [1, 2, 4, 8, 16, 24], 3: [1, 2, 4, 8, 16], 5: [1, 2, 4, 8]}  # batch * q <= 64
    assert runner.keys[0] == (16, 3) and runner.keys[-1] == (1, 2) and len(runner.keys) == 15  # most tokens first
    assert runner.batch_size(_host([3] * 5, [4] * 5)) == 8
    assert runner.batch_size(_host([5, 5, 5], [4] * 3)) == 4
    assert runner.batch_size(_host([3] * 17, [2] * 17)) == 0  # past the largest batch of q = 3
    assert runner.batch_size(_host([4, 4], [2, 2])) == 0  # q = 4 not captured
    assert runner.batch_size(_host([3, 2], [2, 2])) == 0
    assert not runner.can_run(_host([1, 1], [3, 3]))
    assert runner.input_ids.shape[0] == 48 and runner.seq_lens.shape[0] == 24  # 24 x 2 tokens at most


def test_staging_and_unpacking_with_padding() -> None:
    from ember.kernels.triton_inputs import unpack_verify_inputs

    host = _host([3, 3, 3], [5, 9, 2], seed=1)
    # Two drafts only the device holds: entries 2 and 0 of a proposal table.
    host.in_flight_dst, host.in_flight_src = [1, 5], [2, 0]
    host.in_flight_source = torch.tensor([500, 501, 502], dtype=torch.int64, device=DEVICE)
    expected = host.input_ids.tolist()
    expected[1], expected[5] = 502, 500
    stage = np.zeros(200, dtype=np.int64)
    total = stage_verify_inputs(host, stage)
    width = host.block_table.shape[1]
    assert total == 9 * 3 + 3 + 3 * width
    bs, q, max_blocks = 4, 3, 8
    full = dict(dtype=torch.int64, device=DEVICE)
    ids, pos, slots = torch.full((bs * q,), 77, **full), torch.full((bs * q,), 7, **full), torch.full((bs * q,), 99, **full)
    lens = torch.full((bs,), 55, dtype=torch.int32, device=DEVICE)
    table = torch.full((bs, max_blocks), 33, dtype=torch.int32, device=DEVICE)
    unpack_verify_inputs(torch.from_numpy(stage[:total].copy()).to(DEVICE), 3, q, width, host.in_flight_source, ids,
                         pos, slots, lens, table, bs)
    ids, pos, slots, lens, table = (t.cpu() for t in (ids, pos, slots, lens, table))
    assert ids[:9].tolist() == expected and ids[9:].tolist() == [77] * 3
    assert pos[:9].tolist() == host.positions.tolist() and pos[9:].tolist() == [7] * 3
    assert slots[:9].tolist() == host.slot_mapping.tolist() and slots[9:].tolist() == [-1] * 3  # padding: no write
    assert lens.tolist() == host.seq_lens.tolist() + [0]  # padding: no read
    assert table[:3, :width].tolist() == host.block_table.tolist()
    assert (table[:3, width:] == 33).all() and (table[3] == 33).all()  # columns past the step's are not read


class _ToyModel(nn.Module):
    """Embedding -> q/k/v -> one paged Attention -> + residual: what the
    runner needs of a model (``model(input_ids, positions, ctx)``)."""

    def __init__(self, backend_cls) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = nn.Parameter(torch.randn(64, HIDDEN, generator=g).to(DEVICE))
        self.qkv = nn.Parameter((torch.randn((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN, generator=g) * 0.3).to(DEVICE))
        self.attn = Attention(HEADS, HEAD_DIM, HEAD_DIM ** -0.5, KV_HEADS, 0, backend_cls)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = self.embed[input_ids] + 0.01 * positions[:, None].float()
        q, k, v = (x @ self.qkv.T).split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
        ctx.positions = positions
        return self.attn(q.contiguous(), k.contiguous(), v.contiguous(), ctx) + x


def _triton_backend_cls():
    from ember.layers.attention.triton_backend import TritonAttentionBackend

    if ON_GPU:
        return TritonAttentionBackend
    small_gpu = SimpleNamespace(multi_processor_count=8)

    class Backend(TritonAttentionBackend):
        def __init__(self, *args) -> None:
            with mock.patch.object(torch.cuda, "current_device", return_value=0), \
                    mock.patch.object(torch.cuda, "get_device_properties", return_value=small_gpu):
                super().__init__(*args)

    return Backend


class _EagerGraph:
    """Stands for a captured graph on CPU: a replay runs the model on the buffers."""

    def __init__(self, runner: VerifyCUDAGraphRunner, key: tuple[int, int]) -> None:
        self.runner, self.key = runner, key

    def replay(self) -> None:
        self.runner.outputs[self.key] = self.runner.model(*self.runner.args(*self.key))


@pytest.mark.parametrize("counts,computed", [([3, 3, 3], [5, 9, 2]), ([5], [13]), ([2, 2], [1, 30])])
def test_replay_matches_eager_step(counts, computed, one_torch_thread) -> None:
    """A uniform step through the runner (staged, unpacked into a padded
    batch, attention by the verification kernel) equals the same step on its
    packed inputs through the plain-PyTorch backend, hidden states and KV
    cache (padding requests write nothing)."""
    host = _host(counts, computed, seed=2)
    num_blocks = host.block_table.size + 4
    g = torch.Generator().manual_seed(3)
    cache = torch.randn(2, num_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=g).to(DEVICE)
    ref_cache = cache.clone()

    model = _ToyModel(_triton_backend_cls())
    runner = VerifyCUDAGraphRunner(model, [cache], _config(budget=64), [2, 3, 5], 8, torch.device(DEVICE), 8)
    for key in runner.keys:
        runner.graphs[key] = _EagerGraph(runner, key)
    assert runner.can_run(host)
    import ember.layers.attention.triton_backend as tb

    with torch.inference_mode(), mock.patch.object(tb, "verify_attention", wraps=tb.verify_attention) as kernel:
        out = runner.run(host)
        assert kernel.call_count == 1  # the verification kernel, not the extend kernel

        ref_model = _ToyModel(TorchAttentionBackend)
        def dev(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(DEVICE)

        meta = AttentionMetadata(
            slot_mapping=dev(host.slot_mapping), query_start_loc=dev(host.query_start_loc),
            seq_lens=dev(host.seq_lens), block_table=dev(host.block_table),
            max_query_len=host.max_query_len, max_seq_len=int(host.seq_lens.max()),
            query_start_loc_cpu=host.query_start_loc.tolist(), seq_lens_cpu=host.seq_lens.tolist())
        ref = ref_model(dev(host.input_ids), dev(host.positions), ForwardContext(meta, [ref_cache]))
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cache, ref_cache, rtol=0, atol=0)
