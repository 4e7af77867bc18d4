import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ember.engine.detokenizer import IncrementalDetokenizer
from ember.sampling_params import SamplingParams

TEXT = "Hello world! Grüße aus Köln 🙂 — 日本語 text. STOP here and more"


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # A tiny vocabulary: multi-byte characters stay split into byte tokens.
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Hello world", "text here and more"] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def _stream(tokenizer, ids, params, delta=True):
    d = IncrementalDetokenizer(tokenizer, params)
    pieces, stop = [], None
    for i, t in enumerate(ids):
        stop = d.update([t])
        last = stop is not None or i == len(ids) - 1
        pieces.append(d.get_next_output_text(last, delta))
        if stop:
            break
    return pieces, stop, d


def test_streamed_text_equals_full_decode_and_never_breaks_utf8(tokenizer):
    ids = tokenizer.encode(TEXT)
    assert len(ids) > len(TEXT.encode()) // 2  # multi-byte chars span several tokens
    pieces, stop, _ = _stream(tokenizer, ids, SamplingParams())
    assert stop is None
    assert "".join(pieces) == tokenizer.decode(ids) == TEXT
    for p in pieces:
        assert "\ufffd" not in p
        p.encode("utf-8")  # every piece is valid on its own


def test_stop_string_never_leaks(tokenizer):
    ids = tokenizer.encode(TEXT)
    pieces, stop, d = _stream(tokenizer, ids, SamplingParams(stop=["STOP", "zzz"]))
    assert stop == "STOP"
    assert "".join(pieces) == TEXT[: TEXT.index("STOP")]
    assert all("S" not in p or "STOP" not in "".join(pieces) for p in pieces)
    assert d.output_text == TEXT[: TEXT.index("STOP")]


def test_stop_string_spanning_tokens_in_cumulative_mode(tokenizer):
    ids = tokenizer.encode(TEXT)
    pieces, stop, _ = _stream(tokenizer, ids, SamplingParams(stop=["日本"]), delta=False)
    assert stop == "日本"
    assert pieces[-1] == TEXT[: TEXT.index("日本")]
    # Held-back text is never shown before it is known not to start a stop string.
    assert all(TEXT.startswith(p) for p in pieces)


def test_special_tokens_skipped(tokenizer):
    ids = tokenizer.encode("Hello") + [tokenizer.eos_token_id] + tokenizer.encode(" world")
    pieces, _, _ = _stream(tokenizer, ids, SamplingParams())
    assert "".join(pieces) == "Hello world"
