"""Tokenisation: labels are the answer's in-context tokens, decode back to the answer, and align."""

import pytest

from horse_pl.data.tokenize import IGNORE_INDEX, TokenizationError, collate, join, tokenize_pairs
from horse_pl.models import load_tokenizer

PAIRS = [("What is the native language of Christiane Cohendy?", "German"),
         ("The mother tongue of Danielle Darrieux is", "English"),
         ("Toko Yasuda, the", "piano"),
         ("nq question: who played donna in 2 pints of lager", "Natalie Casey"),
         ("When was the inception of IAAF Combined Events Challenge?", "2006"),
         ("Q: what is 1+1? A:", " two")]


def _check(tokenizer):
    prompts, answers = zip(*PAIRS)
    for (prompt, answer), tok in zip(PAIRS, tokenize_pairs(tokenizer, prompts, answers)):
        full_text, answer_in_context = join(prompt, answer)
        full = tokenizer(full_text).input_ids
        assert tok.input_ids == full[:-1]
        assert len(tok.labels) == len(tok.input_ids)
        n_answer = len(tok.answer_ids)
        # the label tokens are exactly the last tokens of the in-context tokenisation
        assert tok.answer_ids == full[-n_answer:]
        assert tokenizer.decode(tok.answer_ids) == answer_in_context
        assert answer_in_context.startswith(" ")
        # next-token alignment: the label at position t is the input token at t + 1
        for t, label in enumerate(tok.labels):
            if label != IGNORE_INDEX:
                assert label == full[t + 1]
        # the prompt part is untouched by the answer
        assert tokenizer.decode(full[:-n_answer], skip_special_tokens=True) == prompt


def test_tiny_byte_level_bpe(tiny_llama):
    _check(load_tokenizer(tiny_llama))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["embedded:smollm2-135m", "embedded:gemma3-270m"])
def test_real_tokenizers(name):
    tokenizer = load_tokenizer(name)
    _check(tokenizer)
    if name.endswith("gemma3-270m"):
        assert tokenize_pairs(tokenizer, ["a"], ["b"])[0].input_ids[0] == tokenizer.bos_token_id


def test_too_long_is_an_error_not_a_truncation(tiny_llama):
    tokenizer = load_tokenizer(tiny_llama)
    with pytest.raises(TokenizationError, match=r"record 1: prompt \+ answer is \d+ tokens, over max_length=8"):
        tokenize_pairs(tokenizer, ["a b", "one two three four five six seven eight nine"], ["c", "ten"], max_length=8)


def test_empty_answer_is_an_error(tiny_llama):
    with pytest.raises(TokenizationError, match="tokenises to nothing"):
        tokenize_pairs(load_tokenizer(tiny_llama), ["a prompt"], [""])


def test_collate_right_pads(tiny_llama):
    tokenizer = load_tokenizer(tiny_llama)
    toks = tokenize_pairs(tokenizer, ["short?", "a much longer prompt than that?"], ["yes", "no"])
    batch = collate(toks, tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][0].tolist() == [1] * len(toks[0].input_ids) + [0] * (
        batch["input_ids"].shape[1] - len(toks[0].input_ids))
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
