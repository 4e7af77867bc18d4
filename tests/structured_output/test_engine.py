"""Constrained decoding through the engine on the bundled Qwen2.5-Coder-0.5B-Instruct:
every output matches its regex, choice or EBNF grammar exactly, JSON outputs
parse and validate, with synchronous and asynchronous scheduling, n > 1,
penalties and preemption; unconstrained requests batched with constrained
ones generate exactly what they generate alone (greedy)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from ember import LLM, SamplingParams
from ember.engine.step_stats import StepRecord
from ember.sampling_params import StructuredOutputsParams as SO

pytestmark = pytest.mark.slow

REGEX = r"[A-Z][a-z]{2,8} (19|20)[0-9]{2}"
CHOICES = ["Paris", "London", "Berlin", "Madrid"]
# Sums of small numbers; the regex is the same language.
EBNF = 'root ::= num (" + " num)+ " = " num\nnum ::= [1-9] [0-9]?'
EBNF_REGEX = r"[1-9][0-9]?( \+ [1-9][0-9]?)+ = [1-9][0-9]?"
SCHEMA = {"type": "object",
          "properties": {"city": {"type": "string", "maxLength": 20},
                         "population": {"type": "integer", "minimum": 0, "maximum": 50000000},
                         "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 20},
                                       "minItems": 1, "maxItems": 3}},
          "required": ["city", "population", "landmarks"]}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs with one torch thread (see tests/conftest.py)."""


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def llm(request, qwen_path):
    engine = LLM(qwen_path, max_model_len=384, kv_cache_memory=48 << 20, async_scheduling=request.param)
    yield engine
    engine.llm_engine.shutdown()


def chat(llm, question: str) -> str:
    return llm.get_tokenizer().apply_chat_template([{"role": "user", "content": question}],
                                                   add_generation_prompt=True, tokenize=False)


def test_regex_choice_and_grammar_constrain_exactly(llm) -> None:
    prompts = [chat(llm, "Name a scientist and a year."), chat(llm, "What is the capital of Germany?"),
               chat(llm, "Write an addition."), chat(llm, "Tell me a date."), chat(llm, "Which city?")]
    params = [SamplingParams(temperature=0, max_tokens=24, structured_outputs=SO(regex=REGEX)),
              SamplingParams(temperature=0, max_tokens=8, structured_outputs=SO(choice=CHOICES)),
              SamplingParams(temperature=0.9, seed=3, max_tokens=30, structured_outputs=SO(grammar=EBNF)),
              SamplingParams(temperature=1.0, seed=7, max_tokens=24, structured_outputs=SO(regex=REGEX), n=2),
              SamplingParams(temperature=1.0, seed=1, max_tokens=8, structured_outputs=SO(choice=CHOICES), n=3)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    checks = [REGEX, "|".join(CHOICES), EBNF_REGEX, REGEX, "|".join(CHOICES)]
    for out, pattern in zip(outs, checks):
        for c in out.outputs:
            assert c.finish_reason == "stop", c
            assert re.fullmatch(pattern, c.text), (pattern, c.text)
    assert outs[1].outputs[0].text == "Berlin"
    stats = llm.get_stats()
    assert stats.num_structured_output_requests >= 8  # n > 1: one matcher per sequence


def test_json_schema_and_json_object_with_penalties(llm) -> None:
    prompts = [chat(llm, "Describe Rome as JSON."), chat(llm, "Give me a JSON object about a cat."),
               chat(llm, "Describe Tokyo as JSON.")]
    params = [SamplingParams(temperature=0, max_tokens=80, structured_outputs=SO(json=SCHEMA)),
              SamplingParams(temperature=0.8, seed=11, max_tokens=60, structured_outputs=SO(json_object=True), n=2,
                             presence_penalty=0.5),
              SamplingParams(temperature=0, max_tokens=80, repetition_penalty=1.2,
                             structured_outputs=SO(json=json.dumps(SCHEMA)))]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for i in (0, 2):
        c = outs[i].outputs[0]
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), SCHEMA)
    for c in outs[1].outputs:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text), dict)
        else:  # cut by max_tokens: still a prefix of a JSON object
            assert c.text.startswith("{")


def test_unconstrained_requests_are_unchanged_by_constrained_neighbours(llm) -> None:
    free = [chat(llm, "Count to five."), chat(llm, "Say something about the sea.")]
    greedy = SamplingParams(temperature=0, max_tokens=20)
    alone = [o.outputs[0].token_ids for o in llm.generate(free, [greedy] * 2, use_tqdm=False)]
    core = llm.llm_engine.engine_core
    records: list[StepRecord] = []
    core.add_step_observer(records.append)
    mixed = llm.generate([free[0], chat(llm, "Pick a city."), free[1], chat(llm, "A scientist?")],
                         [greedy, SamplingParams(temperature=0, max_tokens=8, structured_outputs=SO(choice=CHOICES)),
                          greedy, SamplingParams(temperature=0.5, seed=2, max_tokens=20,
                                                 structured_outputs=SO(regex=REGEX))], use_tqdm=False)
    core.remove_step_observer(records.append)
    assert [mixed[0].outputs[0].token_ids, mixed[2].outputs[0].token_ids] == alone
    constrained = [r for r in records if r.sched.structured_output_req_ids]
    assert constrained and sum(r.mask_s for r in records) > 0
    if core.async_scheduling:  # constrained requests keep being scheduled ahead
        assert any(r.launched_ahead for r in constrained)
    assert mixed[1].outputs[0].text in CHOICES and re.fullmatch(REGEX, mixed[3].outputs[0].text)


def test_invalid_constraint_is_a_value_error(llm) -> None:
    with pytest.raises(ValueError, match="structured_outputs.regex"):
        llm.generate(["hi"], SamplingParams(structured_outputs=SO(regex="(")), use_tqdm=False)


def test_preemption_recomputes_constrained_requests(qwen_path) -> None:
    """A KV cache too small for the batch: preempted constrained requests
    resume with their grammar state and end exactly as without preemption."""
    prompts = [f"<|im_start|>user\nDescribe city number {i} as JSON.<|im_end|>\n<|im_start|>assistant\n"
               for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=60, structured_outputs=SO(json=SCHEMA))
    small = LLM(qwen_path, max_model_len=128, kv_cache_memory=(128 + 48) * 24576, block_size=16)
    try:
        outs = small.generate(prompts, params, use_tqdm=False)
        assert small.get_stats().num_preemptions > 0
    finally:
        small.llm_engine.shutdown()
    roomy = LLM(qwen_path, max_model_len=128, kv_cache_memory=32 << 20, block_size=16)
    try:
        want = roomy.generate(prompts, params, use_tqdm=False)
    finally:
        roomy.llm_engine.shutdown()
    for o, w in zip(outs, want):
        assert o.outputs[0].token_ids == w.outputs[0].token_ids
        if o.outputs[0].finish_reason == "stop":
            jsonschema.validate(json.loads(o.outputs[0].text), SCHEMA)
