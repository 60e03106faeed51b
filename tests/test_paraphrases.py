"""The paraphrase bank: question templates and the rephrasings a records file pairs with them."""

import pytest
from conftest import ZSRE_EVAL, ZSRE_TRAIN

from horse_pl.data.paraphrases import ParaphraseBank, template
from horse_pl.data.records import EditRequest, load_requests


def _asked(prompt, rephrase, subject="Ada Lovelace", target="Paris"):
    return EditRequest(prompt=prompt, target=target, rephrase=rephrase, subject=subject)


def test_a_template_is_the_prompt_with_its_subject_as_a_slot_and_single_spaces():
    assert template("What  is the birthplace of Ada Lovelace?", "Ada Lovelace") == "What is the birthplace of {}?"
    assert template("Where was she born?", "Ada Lovelace") is None  # the prompt does not name the subject
    assert template("Where was Ada Lovelace born?", None) is None
    assert template("Where was {Ada Lovelace} born?", "Ada Lovelace") is None  # braces would blur the slot


def test_the_bank_rephrases_a_known_template_with_the_request_s_subject_most_frequent_first():
    bank = ParaphraseBank([
        _asked("What is the birthplace of Ada Lovelace?", "Where was Ada Lovelace born?"),
        _asked("What is the birthplace of Alan Turing?", "Where was Alan Turing born?", "Alan Turing"),
        _asked("What is the birthplace of Grace Hopper?", "Which city is Grace Hopper from?", "Grace Hopper"),
        _asked("What is the birthplace of Kurt Gödel?", "What is the birthplace of Kurt Gödel?", "Kurt Gödel"),
        _asked("Who employed Ada Lovelace?", "Which is the employer of Ada?"),  # rephrase drops the subject
    ])
    assert len(bank) == 1  # identical and subject-less rephrasings teach nothing
    request = EditRequest(prompt="What is the birthplace of Emmy Noether?", target="Rome", subject="Emmy Noether")
    rephrased = bank.rephrased([request], 5)
    assert [r.prompt for r in rephrased] == ["Where was Emmy Noether born?", "Which city is Emmy Noether from?"]
    assert all(r.target == "Rome" and r.subject == "Emmy Noether" for r in rephrased)
    assert [r.prompt for r in bank.rephrased([request], 1)] == ["Where was Emmy Noether born?"]
    unknown = EditRequest(prompt="Who founded Emmy Noether?", target="Rome", subject="Emmy Noether")
    assert bank.rephrased([unknown, EditRequest(prompt="What is the birthplace of X?", target="Y")], 3) == []
    with pytest.raises(ValueError, match="at least 0"):
        bank.templates_for(request, -1)


def test_coverage_counts_the_requests_rephrased_and_those_whose_own_rephrase_the_bank_holds():
    bank = ParaphraseBank([_asked("What is the birthplace of Ada Lovelace?", "Where was Ada Lovelace born?")])
    requests = [_asked("What is the birthplace of Alan Turing?", "Where was Alan Turing born?", "Alan Turing"),
                _asked("What is the birthplace of Grace Hopper?", "Grace Hopper was born where?", "Grace Hopper"),
                _asked("Who employed Grace Hopper?", "Grace Hopper worked for?", "Grace Hopper"),
                _asked("What is the birthplace of Kurt Gödel?", "Where was Kurt Gödel born?", "Kurt Gödel")]
    assert bank.coverage(requests, 2) == {"rephrased": 0.75, "own_rephrase_in_bank": 0.5}


def test_the_zsre_training_file_s_bank_rephrases_nearly_every_evaluation_request():
    """The templates of zsRE's evaluation questions are the training file's; their own rephrase prompts mostly are
    not among the bank's first two rephrasings (what the refinement then reads is other words, not the test)."""
    train, _ = load_requests(ZSRE_TRAIN, skip_invalid=True, limit=8192)
    evaluation, _ = load_requests(ZSRE_EVAL, skip_invalid=True)
    coverage = ParaphraseBank(train).coverage(evaluation, 2)
    assert coverage["rephrased"] > 0.98 and coverage["own_rephrase_in_bank"] < 0.15
