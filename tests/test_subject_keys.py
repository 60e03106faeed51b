"""Edits keyed on the subject (``positions="subject"``, MEMIT's key): the subject's last prompt token is found through
the tokenizer's offsets, only the edit view marks it, the capture pass records one key and value gradient per request
there, and a request whose prompt lacks its subject is refused in one sentence."""

import pytest
import torch
from conftest import autograd_module_io

from horse_pl.data.batch import EVAL_VIEWS, edit_batch
from horse_pl.data.records import EditRequest, load_requests
from horse_pl.data.tokenize import IGNORE_INDEX, collate, tokenize_pairs
from horse_pl.editing.capture import capture
from horse_pl.models import load_model

CF_TRAIN = "../shared/data/counterfact/counterfact_train_10k.json.gz"


def test_key_position_is_the_last_token_of_the_subjects_last_occurrence(tiny_llama):
    _, tok = load_model(tiny_llama)
    prompts = ["Danielle Darrieux's mother tongue is", "Paris is the capital of Paris,", "Who wrote Hamlet?"]
    pairs = tokenize_pairs(tok, prompts, ["French", "France", "Shakespeare"], subjects=["Danielle Darrieux", "Paris",
                                                                                          "Macbeth"])
    for pair, prompt, subject in zip(pairs[:2], prompts, ["Danielle Darrieux", "Paris"]):
        read = tok.decode(pair.input_ids[: pair.key_pos + 1])
        assert read.endswith(subject) and read.count(subject) == prompt.count(subject)  # the last occurrence
        assert pair.labels[pair.key_pos] == IGNORE_INDEX  # a prompt token, not an answer position
    assert pairs[2].key_pos == -1  # the subject is not in the prompt
    assert all(p.key_pos == -1 for p in tokenize_pairs(tok, prompts, ["a", "b", "c"]))  # no subjects given
    mb = collate(pairs, tok.pad_token_id)
    assert mb["key_mask"].sum(1).tolist() == [1, 1, 0]
    assert mb["key_mask"][0, pairs[0].key_pos] and "key_mask" not in collate(pairs[2:], tok.pad_token_id)


def test_only_the_edit_view_marks_the_subject(tiny_llama):
    _, tok = load_model(tiny_llama)
    requests, _ = load_requests(CF_TRAIN, "counterfact", limit=6)
    batch = edit_batch(tok, requests, EVAL_VIEWS, batch_size=4)
    for mb in batch["edit"]:
        assert mb["key_mask"].sum(1).tolist() == [1] * mb["input_ids"].shape[0]
    for view in EVAL_VIEWS[1:]:
        assert all("key_mask" not in mb for mb in batch[view])


def test_subject_capture_is_the_autograd_gradient_at_the_subject_token(tiny_llama):
    """Keys are the module inputs, value gradients dL/d(output) of the answer tokens' mean CE, both at the subject's
    last token only (one row per request), with the trimmed passes the capture uses."""
    model, tok = load_model(tiny_llama)
    modules = [model.get_submodule(f"model.layers.{i}.mlp.down_proj") for i in (1, 2)]
    mb = collate(tokenize_pairs(tok, ["The capital of Freedonia is", "Hamlet was written by"], ["Paris", "Me and you"],
                                subjects=["Freedonia", "Hamlet"]), tok.pad_token_id)
    cap = capture(model, modules, [mb], positions="subject")
    assert cap.n_rows == 2
    inputs, grads = autograd_module_io(model, modules, mb)
    at = mb["key_mask"]
    for i in range(len(modules)):
        torch.testing.assert_close(cap.keys[i], inputs[i][at])
        torch.testing.assert_close(cap.value_grads[i], grads[i][at], rtol=1e-4, atol=1e-7)
        assert cap.value_grads[i].abs().sum() > 0


def test_subject_capture_refuses_a_prompt_without_its_subject(tiny_llama):
    model, tok = load_model(tiny_llama)
    modules = [model.get_submodule("model.layers.1.mlp.down_proj")]
    requests = [EditRequest(prompt="The capital of Freedonia is", target="Paris", subject="Freedonia"),
                EditRequest(prompt="Who wrote Hamlet?", target="Me", subject="Macbeth")]
    batch = edit_batch(tok, requests, ("edit",))
    with pytest.raises(ValueError, match=r"positions='subject'.*1 of 2 edit prompts.*'subject' that appears"):
        capture(model, modules, batch["edit"].micro_batches, positions="subject")
    with pytest.raises(ValueError, match="must be one of"):
        capture(model, modules, batch["edit"].micro_batches, positions="subjects")
