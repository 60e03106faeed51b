"""Scores against hand computations and against real greedy generation."""

import torch

from horse_pl.data.batch import View
from horse_pl.data.tokenize import collate, tokenize_pairs
from horse_pl.metrics import SequenceScores, compute_scores, make_metrics, score_view, update_metrics
from horse_pl.models import load_model

PROMPTS = ["What is the native language of Christiane Cohendy?", "nq question: who played donna", "a b c?",
           "What is the final year of Atlanta Flames?"]
ANSWERS = ["German", "Natalie Casey", "d", "1931"]


def _batch(tokenizer):
    return collate(tokenize_pairs(tokenizer, PROMPTS, ANSWERS, max_length=1024), tokenizer.pad_token_id)


def test_token_accuracy_and_exact_match_by_hand(tiny_llama):
    model, tok = load_model(tiny_llama)
    mb = _batch(tok)
    scores = score_view(model, View([mb], torch.arange(len(PROMPTS))))
    logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
    for i in range(len(PROMPTS)):
        mask = mb["labels"][i] != -100
        right = (logits[i][mask].argmax(-1) == mb["labels"][i][mask]).float()
        assert abs(float(scores.accuracy[i]) - float(right.mean())) < 1e-6
        assert bool(scores.exact[i]) == bool(right.all())
        lp = torch.log_softmax(logits[i][mask], -1).gather(-1, mb["labels"][i][mask][:, None]).mean()
        assert abs(float(scores.mean_logprob[i]) - float(lp)) < 1e-4


def test_exact_match_equals_greedy_generation(tiny_llama):
    """Greedy decoding reproduces the answer exactly when every teacher-forced argmax is right."""
    from horse_pl.data.tokenize import IGNORE_INDEX, Tokenized

    model, tok = load_model(tiny_llama)
    toks = tokenize_pairs(tok, PROMPTS, ANSWERS, max_length=1024)
    for prompt in PROMPTS:  # the model's own greedy continuations: exact match must be True for these
        ids = tok(prompt).input_ids
        gen = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False,
                             pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        toks.append(Tokenized(input_ids=ids + gen[:-1], labels=[IGNORE_INDEX] * (len(ids) - 1) + gen))
    scores = score_view(model, View([collate(toks, tok.pad_token_id)], torch.arange(len(toks))))
    seen = set()
    for i, t in enumerate(toks):
        n_prompt = len(t.input_ids) + 1 - len(t.answer_ids)
        gen = model.generate(torch.tensor([t.input_ids[:n_prompt]]), max_new_tokens=len(t.answer_ids),
                             do_sample=False, pad_token_id=tok.pad_token_id)[0, n_prompt:].tolist()
        assert bool(scores.exact[i]) == (gen == t.answer_ids), i
        seen.add(bool(scores.exact[i]))
    assert seen == {True, False}


def test_counterfact_scores_and_ls_agree():
    def seq(rows, logprob, argmax=None):
        rows = torch.tensor(rows)
        ones = torch.ones(len(rows))
        return SequenceScores(rows, ones, ones, torch.tensor(logprob), argmax or [])

    scores = {
        "edit": seq([0, 1, 2], [-1.0, -5.0, -2.0]), "edit_true": seq([0, 1, 2], [-3.0, -1.0, -2.5]),
        "rephrase": seq([0, 2], [-1.0, -4.0]), "rephrase_true": seq([0, 1, 2], [-2.0, -1.0, -1.0]),
        "locality": seq([0, 1, 2], [-1.0, -1.0, -9.0], [torch.tensor([1, 2, 3, 4])]),
        "locality_new": seq([0, 1, 2], [-2.0, -3.0, -1.0]),
    }
    before = seq([0, 1, 2], [0.0] * 3, [torch.tensor([1, 2, 0, 4])])
    values = compute_scores(scores, before)
    assert values["efficacy"].tolist() == [1.0, 0.0, 1.0]
    assert values["paraphrase"].tolist() == [1.0, 0.0]  # only requests present in both views
    assert values["neighborhood"].tolist() == [1.0, 1.0, 0.0]
    assert values["LS_agree"].tolist() == [1.0, 1.0, 0.0, 1.0]
    metrics = make_metrics()
    update_metrics(metrics, values)
    assert abs(float(metrics["efficacy"].compute()) - 2 / 3) < 1e-6
