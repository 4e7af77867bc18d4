"""The detokenizer's vLLM options: ``include_stop_str_in_output``, stop strings
after ``min_tokens``, and ``spaces_between_special_tokens`` (on a WordPiece
tokenizer, whose decoder puts spaces between special tokens), with the
tokenizer's own ``decode`` as the reference."""

from __future__ import annotations

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ember.sampling_params import SamplingParams
from tests.engine.test_detokenizer import _stream


@pytest.fixture(scope="module")
def wordpiece():
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "##s": 3, "stop": 4, "here": 5, ".": 6}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens([AddedToken("[CLS]", special=True), AddedToken("[SEP]", special=True)])
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _run(tokenizer, ids, params, delta=True):
    pieces, stop, _ = _stream(tokenizer, ids, params, delta)
    return pieces, stop


def test_spaces_between_special_tokens(wordpiece):
    ids = wordpiece.encode("[CLS][SEP]hello worlds[SEP][CLS]")
    assert [wordpiece.convert_ids_to_tokens(i) for i in ids] == ["[CLS]", "[SEP]", "hello", "world", "##s",
                                                                 "[SEP]", "[CLS]"]
    spaced = "".join(_run(wordpiece, ids, SamplingParams(skip_special_tokens=False))[0])
    assert spaced == wordpiece.decode(ids, skip_special_tokens=False) == "[CLS] [SEP] hello worlds [SEP] [CLS]"
    joined = "".join(_run(wordpiece, ids, SamplingParams(skip_special_tokens=False,
                                                         spaces_between_special_tokens=False))[0])
    # A special token right after another loses its space; text keeps the decoder's spacing.
    assert joined == "[CLS][SEP] hello worlds [SEP][CLS]"
    # Skipping special tokens makes the option moot.
    for spaces in (True, False):
        text = "".join(_run(wordpiece, ids, SamplingParams(spaces_between_special_tokens=spaces))[0])
        assert text == wordpiece.decode(ids, skip_special_tokens=True) == "hello worlds"


def test_include_stop_str_in_output(wordpiece):
    ids = wordpiece.encode("hello stop here hello", add_special_tokens=False)
    pieces, stop = _run(wordpiece, ids, SamplingParams(stop=["stop"]))
    assert stop == "stop" and "".join(pieces) == "hello "
    for delta in (True, False):
        pieces, stop = _run(wordpiece, ids, SamplingParams(stop=["stop"], include_stop_str_in_output=True), delta)
        assert stop == "stop"
        assert ("".join(pieces) if delta else pieces[-1]) == "hello stop"
    # Nothing is held back while streaming: each piece comes with its own token.
    pieces, _ = _run(wordpiece, ids, SamplingParams(stop=["stop here"], include_stop_str_in_output=True))
    assert pieces == ["hello", " stop", " here"]
    held, _ = _run(wordpiece, ids, SamplingParams(stop=["stop here"]))
    assert held[:2] == ["", "he"]  # the last 8 characters wait for a possible "stop here"


def test_stop_strings_only_after_min_tokens(wordpiece):
    ids = wordpiece.encode("stop hello stop here", add_special_tokens=False)
    _, stop = _run(wordpiece, ids, SamplingParams(stop=["stop"]))
    pieces, stop = _run(wordpiece, ids, SamplingParams(stop=["stop"], min_tokens=1, max_tokens=8))
    assert stop == "stop" and "".join(pieces) == "stop hello "
    pieces, stop = _run(wordpiece, ids, SamplingParams(stop=["stop"], min_tokens=3, max_tokens=8))
    assert stop is None and "".join(pieces) == "stop hello stop here"
    # A stop string may begin in the first min_tokens tokens' text and end after it.
    pieces, stop = _run(wordpiece, ids, SamplingParams(stop=["hello stop"], min_tokens=2, max_tokens=8))
    assert stop == "hello stop" and "".join(pieces) == "stop "
