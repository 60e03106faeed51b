"""Record readers for every supported layout, and their errors."""

import gzip
import json

import pytest
from conftest import CF_EVAL, CF_ROME, CF_TRAIN, KNOWEDIT, ZSRE_EVAL, ZSRE_TRAIN

from horse_pl.data.records import RecordError, load_requests


def test_zsre_train_reports_the_35_empty_targets():
    with pytest.raises(RecordError, match=r"zsre_train_10k.json.gz: record \d+: field 'alt' is empty"):
        load_requests(ZSRE_TRAIN, "zsre")
    requests, report = load_requests(ZSRE_TRAIN, "zsre", skip_invalid=True)
    assert report.n_records == 10_000 and report.n_invalid == 35 and len(requests) == 9_965
    assert report.invalid == {"'alt' is empty": 35}
    first = requests[0]
    assert (first.prompt, first.target, first.ground_truth) == (
        "What is the native language of Christiane Cohendy?", "German", "French")
    raw = json.load(gzip.open(ZSRE_TRAIN))[0]
    assert first.locality_prompt == raw["loc"] + "?" and first.locality_prompt.startswith("nq question: ")
    assert first.locality_answer == raw["loc_ans"]


def test_zsre_eval_has_portability():
    requests, report = load_requests(ZSRE_EVAL, "zsre")
    assert len(requests) == 1037 and report.n_invalid == 0
    assert requests[0].portability_prompt and requests[0].portability_answer == "Athletics"


@pytest.mark.parametrize("path", [CF_TRAIN, CF_EVAL])
def test_counterfact_target_is_target_new(path):
    requests, _ = load_requests(path, "counterfact")
    raw = json.load(gzip.open(path))[0]
    assert requests[0].target == raw["target_new"] and requests[0].ground_truth == raw["ground_truth"]
    assert requests[0].rephrase == raw["rephrase_prompt"]
    assert requests[0].locality_answer == raw["locality_ground_truth"]


def test_counterfact_rome_layout_and_auto_detection():
    requests, _ = load_requests(CF_ROME)  # auto
    assert requests[0].prompt == "The mother tongue of Danielle Darrieux is"
    assert (requests[0].target, requests[0].ground_truth) == ("English", "French")
    assert requests[0].locality_answer == "French"  # neighbours share the true object


@pytest.mark.parametrize("name", ["wiki_counterfact_test_cf", "wiki_recent_recent_train", "wikibio-test-all"])
def test_knowedit_files(name):
    requests, report = load_requests(KNOWEDIT / f"{name}.json.gz", "knowedit")
    assert requests and report.n_invalid == 0
    assert all(r.prompt and r.target for r in requests)
    assert any(r.locality_prompt for r in requests)


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_plain_requests_json_and_jsonl(tmp_path):
    record = {"prompt": "The capital of Freedonia is", "target": "Paris", "rephrase": "Freedonia's capital is"}
    for path in (_write(tmp_path, "r.json", json.dumps([record])), _write(tmp_path, "r.jsonl", json.dumps(record))):
        requests, _ = load_requests(path, "requests")
        assert requests[0].target == "Paris" and requests[0].locality_prompt is None


@pytest.mark.parametrize("text,match", [
    ('[{"prompt": "x"}]', r"r.json: record 0: field 'target' is missing"),
    ('[{"prompt": "x", "target": "  "}]', r"record 0: field 'target' is empty"),
    ('[{"prompt": "x", "target": 3}]', r"record 0: field 'target' must be a string, not int"),
    ('[{"prompt": "x", "target": "y"}, "oops"]', r"record 1: field '\(record\)' must be a JSON object"),
    ('[{"prompt": "x", "target": "y"', r"r.json' is not valid JSON \(line 1"),
    ('{"prompt": "x", "target": "y", "locality_prompt": "z"}', r"field 'locality_answer' is needed"),
    ('', r"is empty"),
])
def test_malformed_request_files_fail_with_one_sentence(tmp_path, text, match):
    path = _write(tmp_path, "r.json", text)
    with pytest.raises(RecordError, match=match) as info:
        load_requests(path, "requests")
    assert "\n" not in str(info.value)


def test_missing_file_and_required_fields(tmp_path):
    with pytest.raises(RecordError, match="does not exist"):
        load_requests(tmp_path / "nope.json")
    path = _write(tmp_path, "r.jsonl", '{"prompt": "a", "target": "b"}')
    with pytest.raises(RecordError, match="field 'rephrase' is needed here"):
        load_requests(path, require=("rephrase",))


def test_inspect_command(capsys):
    from horse_pl.data.__main__ import main

    assert main(["inspect", "--dataset", "zsre", "--path", str(ZSRE_TRAIN), "--model", "embedded:smollm2-135m"]) == 0
    out = capsys.readouterr().out
    assert "records: 10000" in out and "invalid: 35" in out and "35 x 'alt' is empty" in out
    assert "labels=' German'" in out and "median=" in out
    assert main(["inspect", "--dataset", "counterfact", "--path", str(CF_TRAIN)]) == 0
    assert "records: 10000" in capsys.readouterr().out


def test_inspect_reports_bad_file_without_traceback(tmp_path, capsys):
    from horse_pl.data.__main__ import main

    path = _write(tmp_path, "bad.json", "not json at all")
    assert main(["inspect", "--path", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_a_limit_below_one_is_refused():
    for limit in (0, -1):
        with pytest.raises(RecordError, match="positive number"):
            load_requests(ZSRE_EVAL, "zsre", limit=limit)
