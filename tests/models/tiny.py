"""Tiny random HF models saved as safetensors directories, and the checks that
compare Ember with HF transformers on them (float32, CPU).

A check loads the directory twice in Ember: once with the default token budget
(prefill logits and single requests, one at a time) and once with
``max_num_batched_tokens=8`` and all prompts together (chunked prefill, mixed
prefill/decode batches, batched decode). Blocks of 4 tokens spread every
request over many KV blocks.
"""

from __future__ import annotations

import atexit
import contextlib
import random
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

from ember import LLM, SamplingParams

TOKENIZER_VOCAB = 64  # the model's vocab_size must be at least this
NUM_NEW = 32
BLOCK_SIZE = 4
KV_CACHE_BYTES = 4 << 20


@contextlib.contextmanager
def one_thread():
    """Run torch single-threaded. NOTE: on a small shared machine, tiny matmuls
    run ~10x slower with 2 intra-op threads than with 1 when the cores are busy
    (the OpenMP workers spin-wait)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def make_tokenizer(vocab_size: int = TOKENIZER_VOCAB) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``w0 .. w{n-2}`` plus ``</s>`` (id n-1, EOS)."""
    vocab = {f"w{i}": i for i in range(vocab_size - 1)} | {"</s>": vocab_size - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", eos_token="</s>")


def randomize_norms_(model: PreTrainedModel, seed: int = 0) -> None:
    """RMSNorm weights are ones at init; perturb them so that a norm loaded
    into the wrong place (or not at all) changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))


def random_llama(seed: int = 0, **overrides) -> PreTrainedModel:
    """A random 2-layer HF Llama (hidden 64, 4 heads, 2 KV heads, the test
    tokenizer's vocabulary, untied head, weights of std 0.2 so that errors
    show, norms randomized), in eval mode; ``overrides`` change config fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    fields = dict(vocab_size=TOKENIZER_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2,
                  tie_word_embeddings=False)
    hf = LlamaForCausalLM(LlamaConfig(**(fields | overrides))).eval()
    randomize_norms_(hf)
    return hf


def save_tiny(model: PreTrainedModel, path: Path, max_shard_size: str | None = None) -> str:
    """Save ``model`` (safetensors, sharded when ``max_shard_size``) and a tiny tokenizer into ``path``."""
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    make_tokenizer().save_pretrained(path)
    return str(path)


def make_prompts(lengths: tuple[int, ...] = (5, 13, 22, 31), vocab: int = TOKENIZER_VOCAB,
                 seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab - 1) for _ in range(n)] for n in lengths]


_HF_REFERENCES: dict[str, tuple[str, PretrainedConfig]] = {}


def config_ties(config: PretrainedConfig) -> bool:
    """Whether the model's LM head is its input embedding (one tensor)."""
    return bool(getattr(config, "tie_word_embeddings", False))


def load_hf_gguf(path: str, base_model: bool = False) -> PreTrainedModel:
    """HF transformers' model of a bundled ``.gguf`` file, read and dequantized
    by transformers itself (float32, eval mode): an independent reference.

    The first call for a file in a process has transformers read the GGUF file,
    and keeps the weights it built in a safetensors file in a temporary folder
    (removed at exit); later calls build the model from its config and that
    file. Reading the GGUF metadata is most of the cost: about a minute for
    Qwen2.5-Coder's 151,936-token vocabulary on 2 cores.

    Args:
        base_model: the bare decoder (``AutoModel``: ``last_hidden_state``)
            instead of the causal LM.
    """
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, AutoModelForCausalLM

    if path not in _HF_REFERENCES:
        p = Path(path)
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
        folder = tempfile.mkdtemp(prefix="ember-hf-reference-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        weights = model.state_dict()
        if config_ties(model.config):
            del weights["lm_head.weight"]  # the embedding's storage: restored by tie_weights()
        save_file({k: v.contiguous() for k, v in weights.items()}, f"{folder}/model.safetensors")
        _HF_REFERENCES[path] = (f"{folder}/model.safetensors", model.config)
        if not base_model:
            return model.eval()
        del model
    file, config = _HF_REFERENCES[path]
    auto = AutoModel if base_model else AutoModelForCausalLM
    model = auto.from_config(config, dtype=torch.float32)
    weights = load_file(file)
    if base_model:
        prefix = f"{model.base_model_prefix}."
        weights = {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    model.tie_weights()
    expected_missing = {"lm_head.weight"} if config_ties(config) and not base_model else set()
    assert not unexpected and set(missing) == expected_missing, (missing, unexpected)
    return model.eval()


def hf_greedy(model: PreTrainedModel, prompt_ids: list[int], n: int) -> list[int]:
    """Plain greedy loop over HF's forward with its KV cache, on the model's
    device (no generate() stopping rules, so EOS does not stop it)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    out, past = [], None
    with torch.inference_mode():
        for _ in range(n):
            res = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            tok = int(res.logits[0, -1].argmax())
            out.append(tok)
            ids = torch.tensor([[tok]], device=device)
    return out


def hf_prefill_logits(model: PreTrainedModel, prompt_ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([prompt_ids])).logits[0].float()


def ember_llm(path: str, **kwargs) -> LLM:
    return LLM(path, dtype="float32", block_size=BLOCK_SIZE, kv_cache_memory=KV_CACHE_BYTES, **kwargs)


def runner_of(llm: LLM):
    return llm.llm_engine.engine_core.executor.worker.model_runner


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


@one_thread()
def check_prefill_logits(llm: LLM, hf: PreTrainedModel, prompts: list[list[int]], tol: float = 1e-4) -> None:
    runner = runner_of(llm)
    for i, p in enumerate(prompts):
        rel = relative_error(runner.compute_prompt_logits(p), hf_prefill_logits(hf, p))
        assert rel < tol, f"prompt {i}: relative logit error {rel:.2e}"


def check_greedy(llm: LLM, refs: list[list[int]], prompts: list[list[int]], together: bool) -> None:
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)
    if together:
        outs = llm.generate([list(p) for p in prompts], params, use_tqdm=False)
    else:
        outs = [llm.generate([list(p)], params, use_tqdm=False)[0] for p in prompts]
    for i, (out, ref) in enumerate(zip(outs, refs)):
        assert out.outputs[0].token_ids == ref, f"prompt {i} diverged ({'batched' if together else 'single'})"


@one_thread()
def check_model_vs_hf(hf: PreTrainedModel, path: str, prompts: list[list[int]] | None = None) -> None:
    """Prefill logits within 1e-4 relative and 32 greedy tokens equal to HF's,
    single requests (full prefill) and all together (chunked, budget 8)."""
    prompts = prompts or make_prompts()
    hf = hf.eval()
    refs = [hf_greedy(hf, p, NUM_NEW) for p in prompts]
    # NOTE: a random model with a small init repeats one token forever, which
    # would make the greedy check weak; tiny configs use initializer_range 0.2.
    assert min(len(set(r)) for r in refs) >= 4, f"degenerate reference continuations: {refs}"
    llm = ember_llm(path)
    check_prefill_logits(llm, hf, prompts)
    check_greedy(llm, refs, prompts, together=False)
    del llm
    check_greedy(ember_llm(path, max_num_batched_tokens=8), refs, prompts, together=True)
