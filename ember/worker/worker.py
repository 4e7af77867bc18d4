"""Worker: one device: its model runner, memory profile and KV cache size."""

from __future__ import annotations

import itertools
import time
from collections import deque

import torch

from ember.config import ConfigError, EngineConfig
from ember.core.sched_output import GrammarBitmask, ModelRunnerOutput, SchedulerOutput
from ember.distributed.parallel_state import (get_tp_group, init_distributed_environment, init_tensor_parallel,
                                             set_dp_attention, set_expert_parallel)
from ember.worker.model_runner import ModelRunner, PendingOutput


class Worker:
    """Owns one device and its :class:`ModelRunner`.

    Args:
        config: the engine config.
        rank: global rank of this worker (``ParallelConfig.world_size`` ranks;
            rank r is tensor-parallel rank ``r % tp`` of pipeline stage
            ``r // tp``); on CUDA it runs on device ``cuda:(rank mod ranks per
            node)``.
        distributed_init_method: where the ranks meet (``"tcp://host:port"``,
            see :func:`~ember.distributed.parallel_state.init_distributed_environment`);
            needed with several ranks, which join their process groups here
            (NCCL on CUDA, gloo on CPU).

    Raises:
        ValueError: several ranks without ``distributed_init_method``.
    """

    def __init__(self, config: EngineConfig, rank: int = 0, distributed_init_method: str | None = None) -> None:
        self.config = config
        pc = config.parallel_config
        cuda = config.device_config.device == "cuda"
        if pc.world_size == 1:
            init_tensor_parallel(0, 1)
            if cuda:
                torch.cuda.set_device(rank % pc.local_world_size)
        else:
            if distributed_init_method is None:
                raise ValueError(f"a worker of {pc.world_size} ranks needs a distributed_init_method")
            init_distributed_environment(rank, pc.world_size, backend="nccl" if cuda else "gloo",
                                         init_method=distributed_init_method,
                                         tensor_parallel_size=pc.tensor_parallel_size,
                                         local_rank=rank % pc.local_world_size if cuda else None)
            if cuda and not pc.disable_custom_all_reduce:
                get_tp_group().init_custom_all_reduce(torch.device("cuda", torch.cuda.current_device()))
        set_expert_parallel(pc.enable_expert_parallel, pc.expert_parallel_dispatch)
        set_dp_attention(pc.enable_dp_attention)
        self.rank = rank
        self.model_runner = ModelRunner(config)
        # Launched steps, oldest first, until collected.
        self._in_flight: deque[PendingOutput] = deque()

    def kv_cache_bytes_per_block(self) -> int:
        return self.model_runner.kv_cache_bytes_per_block()

    def load_model(self) -> None:
        self.model_runner.load_model()
        self.model_runner.load_draft_model()

    def rank_report(self, num_tokens: int) -> dict:
        """This rank's memory and communication, for ``ember bench``: its
        weights' and KV cache's bytes as stored, the device's peak allocation
        (CUDA; None on CPU) — weights are the parameters plus buffers such as
        rotary tables —, and one eager forward of a ``num_tokens``-token
        prompt (on scratch KV blocks; the engine must be idle) with its
        tensor-parallel collectives counted and timed: ``comm_share`` is their
        time over the forward's. Every rank must be called (collectives).
        """
        runner = self.model_runner
        model = runner.model
        weight_bytes = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(),
                                                                                  model.buffers()))
        kv_bytes = sum(t.numel() * t.element_size() for t in runner.kv_caches)
        cuda = runner.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(runner.device)
        start = time.perf_counter()
        with get_tp_group().measure() as comm:
            runner.compute_prompt_logits([0] * num_tokens)
        if cuda:
            torch.cuda.synchronize(runner.device)
        forward_s = time.perf_counter() - start
        return {"rank": self.rank, "weight_bytes": weight_bytes, "kv_cache_bytes": kv_bytes,
                "peak_bytes": torch.cuda.max_memory_allocated(runner.device) if cuda else None,
                "forward_tokens": num_tokens, "forward_ms": forward_s * 1e3, "collectives": comm.calls,
                "collective_bytes": comm.bytes, "comm_ms": comm.seconds * 1e3,
                "comm_share": comm.seconds / forward_s if forward_s > 0 else 0.0}

    def determine_num_blocks(self) -> int:
        """Number of KV blocks that fit in the memory Ember may use.

        ``kv_cache_memory`` bytes if given; on CUDA otherwise
        ``memory_utilization * total memory - memory in use after loading the
        weights and running a forward pass of max_num_batched_tokens tokens``.

        Raises:
            ConfigError: not even ``max_model_len`` tokens fit.
        """
        cc = self.config.cache_config
        per_block = self.model_runner.kv_cache_bytes_per_block()
        if cc.num_gpu_blocks_override is not None:
            num_blocks = cc.num_gpu_blocks_override
        else:
            if cc.kv_cache_memory is not None:
                budget = cc.kv_cache_memory
            else:
                budget = self._profile_free_cuda_memory()
            num_blocks = budget // per_block
        max_len = self.config.model_config.max_model_len
        needed = -(-max_len // cc.block_size)
        if num_blocks < needed:
            raise ConfigError(
                f"the KV cache holds {num_blocks * cc.block_size} tokens ({num_blocks} blocks), fewer than "
                f"max_model_len={max_len}: raise --kv-cache-memory or lower --max-model-len")
        return int(num_blocks)

    def _profile_free_cuda_memory(self) -> int:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self.model_runner.profile_run()
        free, total = torch.cuda.mem_get_info()
        used_by_others = total - free - torch.cuda.memory_reserved()
        peak = torch.cuda.max_memory_allocated()
        return int(total * self.config.cache_config.memory_utilization - used_by_others - peak)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocate the KV cache, then compile the Triton kernel variants and
        capture CUDA graphs over it (CUDA only)."""
        self.model_runner.initialize_kv_cache(num_blocks)
        self.model_runner.warm_up_kernels()
        self.model_runner.capture_cuda_graphs()

    def initialize_host_kv_cache(self, num_blocks: int) -> None:
        """Allocate ``num_blocks`` blocks of host swap space."""
        self.model_runner.initialize_host_kv_cache(num_blocks)

    @property
    def num_in_flight(self) -> int:
        """Steps launched and not yet collected."""
        return len(self._in_flight)

    def launch(self, sched: SchedulerOutput) -> None:
        """Start a step on the device (see :meth:`ModelRunner.launch`); its
        output waits in a FIFO for :meth:`collect`."""
        self._in_flight.append(self.model_runner.launch(sched))

    def sample_with_bitmask(self, bitmask: GrammarBitmask) -> None:
        """Sample the last launched step with its constrained requests' masks
        (see :meth:`ModelRunner.sample_with_bitmask`)."""
        self.model_runner.sample_with_bitmask(bitmask)

    def collect(self) -> ModelRunnerOutput:
        """The oldest launched step's output (see :meth:`ModelRunner.collect`).

        Raises:
            RuntimeError: no step is in flight.
        """
        if not self._in_flight:
            raise RuntimeError("collect() with no step in flight")
        return self.model_runner.collect(self._in_flight.popleft())

    def collect_tokens(self, sampled_token_ids: dict[str, list[int]]) -> None:
        """On a pipeline stage before the last: retire the oldest launched step
        and append the tokens the last stage sampled in it (its
        ``ModelRunnerOutput.sampled_token_ids``), which the next steps' inputs
        continue from.

        Raises:
            RuntimeError: no step is in flight.
        """
        self.collect()
        self.model_runner.append_sampled_tokens(sampled_token_ids)
