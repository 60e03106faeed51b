"""Read edit requests from zsRE, CounterFact (simplified and ROME layouts), KnowEdit and a plain format.

Every layout becomes the same :class:`EditRequest`: (edit prompt, target), (rephrase, target),
(unrelated prompt, its answer), plus the overwritten fact and a portability question where present.
Invalid records raise :class:`RecordError` naming the file, the record index and the field, or, with
``skip_invalid=True``, are counted with their reasons; nothing is dropped silently.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from horse_pl.io import first_line

FORMATS = ("zsre", "counterfact", "knowedit", "requests")


class RecordError(ValueError):
    """A data file or one of its records is unusable; the message names the file, record and field."""


@dataclass(frozen=True)
class EditRequest:
    """One edit: make ``prompt`` continue with ``target``; ``rephrase`` tests generalisation and
    ``locality_prompt``/``locality_answer`` an unrelated fact that must not change."""

    prompt: str
    target: str
    rephrase: str | None = None
    locality_prompt: str | None = None
    locality_answer: str | None = None
    ground_truth: str | None = None  # the fact being overwritten (CounterFact scores)
    portability_prompt: str | None = None
    portability_answer: str | None = None
    subject: str | None = None


@dataclass
class LoadReport:
    """What a reader kept and what it rejected, with reasons."""

    path: str
    n_records: int = 0
    format: str = ""
    kept: list[int] = field(default_factory=list)  # file index of each valid record
    invalid: Counter = field(default_factory=Counter)

    @property
    def n_invalid(self) -> int:
        return sum(self.invalid.values())

    def summary(self) -> str:
        reasons = ", ".join(f"{n} x {why}" for why, n in self.invalid.most_common())
        return f"{self.path}: {self.n_records} records, {self.n_invalid} invalid" + (f" ({reasons})" if reasons else "")


def read_json_records(path: str | Path) -> list[Any]:
    """Read a JSON array or JSONL file (optionally gzip-compressed), or a Hugging Face dataset id, into records."""
    path = Path(path)
    if not path.exists() and _looks_like_hub_id(str(path)):
        return _hub_records(str(path))
    if path.is_dir():
        raise RecordError(f"Data path '{path}' is a folder; give one JSON or JSONL(.gz) file inside it.")
    if not path.is_file():
        raise RecordError(f"Data file '{path}' does not exist; check the path (shared data lives in ../shared/data).")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as err:
        kind = "gzip-compressed UTF-8 text" if path.suffix == ".gz" else "UTF-8 text"
        raise RecordError(f"Data file '{path}' cannot be read as {kind} ({type(err).__name__}: {err}); it is "
                          "truncated or of another kind: pass a JSON or JSONL file (optionally .gz).") from None
    stripped = text.lstrip()
    if not stripped:
        raise RecordError(f"Data file '{path}' is empty; it needs a JSON list of records or one JSON record per line.")
    if stripped[0] == "[":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise RecordError(f"Data file '{path}' is not valid JSON (line {err.lineno}, column {err.colno}: "
                              f"{err.msg}); fix the file or write one record per line (JSONL).") from None
        return records
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise RecordError(f"Data file '{path}' line {line_no} is not valid JSON ({err.msg}); "
                              "expected a JSON list or one JSON object per line.") from None
    return records


def _hub_records(name: str) -> list[Any]:
    """A Hugging Face dataset's train split as records (needs the hub, or the dataset in the local cache)."""
    import datasets

    try:
        return datasets.load_dataset(name, split="train").to_list()
    except (ConnectionError, OSError, ValueError) as err:  # offline, unknown id, no train split...
        raise RecordError(f"'{name}' is neither a file here nor a Hugging Face dataset that can be loaded "
                          f"({type(err).__name__}: {first_line(err, 120)}); check "
                          "the path, or download the dataset to a JSON file where the hub is reachable.") from None


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and "." not in name.split("/")[1][-6:]


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (recorded with checkpoints and editors for provenance)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _Invalid(Exception):
    def __init__(self, field_name: str, problem: str):
        super().__init__(f"field '{field_name}' {problem}")
        self.reason = f"'{field_name}' {problem}"


def _text(record: dict, key: str, required: bool = True) -> str | None:
    if key not in record or record[key] is None:
        if required:
            raise _Invalid(key, "is missing")
        return None
    value = record[key]
    if not isinstance(value, str):
        raise _Invalid(key, f"must be a string, not {type(value).__name__}")
    if not value.strip():
        if required:
            raise _Invalid(key, "is empty")
        return None
    return value


def _first_text(value: Any) -> str | None:
    """First string in a str / list[str] / list[list[str]] answer field (KnowEdit stores all three)."""
    while isinstance(value, list) and value:
        value = value[0]
    return value if isinstance(value, str) and value.strip() else None


def _question(text: str | None) -> str | None:
    """A Natural Questions query as a question: zsRE stores them without the question mark."""
    return text if text is None or text.rstrip().endswith("?") else text.rstrip() + "?"


def _zsre(r: dict) -> EditRequest:
    answers = r.get("answers")
    port = r.get("portability") if isinstance(r.get("portability"), dict) else {}
    return EditRequest(
        prompt=_text(r, "src"), target=_text(r, "alt"), rephrase=_text(r, "rephrase"),
        # "nq question: who ..." + "?", as the released MALMEN/HORSE loaders feed the unrelated prompt
        locality_prompt=_question(_text(r, "loc")), locality_answer=_text(r, "loc_ans"),
        ground_truth=_first_text(answers), subject=_text(r, "subject", False),
        portability_prompt=_first_text(port.get("New Question")),
        portability_answer=_first_text(port.get("New Answer")),
    )


def _counterfact(r: dict) -> EditRequest:
    if "requested_rewrite" in r:  # the original ROME / MEMIT layout
        rw = r["requested_rewrite"]
        if not isinstance(rw, dict):
            raise _Invalid("requested_rewrite", "must be an object")
        subject, template = _text(rw, "subject"), _text(rw, "prompt")
        if "{}" not in template:
            raise _Invalid("requested_rewrite.prompt", "has no '{}' placeholder for the subject")
        new, true = rw.get("target_new"), rw.get("target_true")
        paraphrases, neighbours = r.get("paraphrase_prompts") or [], r.get("neighborhood_prompts") or []
        target = _first_text(new.get("str") if isinstance(new, dict) else None)
        if target is None:
            raise _Invalid("requested_rewrite.target_new.str", "is missing or empty")
        truth = _first_text(true.get("str") if isinstance(true, dict) else None)
        return EditRequest(
            prompt=template.format(subject), target=target, rephrase=_first_text(paraphrases),
            locality_prompt=_first_text(neighbours), locality_answer=truth if neighbours else None,
            ground_truth=truth, subject=subject,
        )
    return EditRequest(
        prompt=_text(r, "prompt"), target=_text(r, "target_new"), rephrase=_text(r, "rephrase_prompt"),
        locality_prompt=_text(r, "locality_prompt"), locality_answer=_text(r, "locality_ground_truth"),
        ground_truth=_text(r, "ground_truth", False), subject=_text(r, "subject", False),
    )


def _first_probe(groups: Any) -> tuple[str | None, str | None]:
    """First (prompt, answer) of a KnowEdit ``locality``/``portability`` dict of lists."""
    if not isinstance(groups, dict):
        return None, None
    for probes in groups.values():
        for probe in probes if isinstance(probes, list) else []:
            if isinstance(probe, dict) and _first_text(probe.get("prompt")) and _first_text(probe.get("ground_truth")):
                return probe["prompt"], _first_text(probe["ground_truth"])
    return None, None


def _knowedit(r: dict) -> EditRequest:
    loc_prompt, loc_answer = _first_probe(r.get("locality"))
    port_prompt, port_answer = _first_probe(r.get("portability"))
    if "text" in r and "labels" in r:  # WikiBio: continue a passage
        prompt, target = _text(r, "text"), _text(r, "labels")
        subject = _text(r, "concept", False)
    else:
        prompt, target, subject = _text(r, "prompt"), _text(r, "target_new"), _text(r, "subject", False)
    return EditRequest(
        prompt=prompt, target=target,
        rephrase=_text(r, "rephrase", False) or _text(r, "rephrase_prompt", False),  # zsRE files: rephrase_prompt
        locality_prompt=loc_prompt, locality_answer=loc_answer, ground_truth=_first_text(r.get("ground_truth")),
        portability_prompt=port_prompt, portability_answer=port_answer, subject=subject,
    )


def _requests(r: dict) -> EditRequest:
    loc_prompt, loc_answer = _text(r, "locality_prompt", False), _text(r, "locality_answer", False)
    if (loc_prompt is None) != (loc_answer is None):
        raise _Invalid("locality_answer" if loc_answer is None else "locality_prompt",
                       "is needed when the other locality field is given")
    return EditRequest(
        prompt=_text(r, "prompt"), target=_text(r, "target"), rephrase=_text(r, "rephrase", False),
        locality_prompt=loc_prompt, locality_answer=loc_answer, ground_truth=_text(r, "ground_truth", False),
        subject=_text(r, "subject", False),
    )


_READERS: dict[str, Callable[[dict], EditRequest]] = {
    "zsre": _zsre, "counterfact": _counterfact, "knowedit": _knowedit, "requests": _requests,
}


def detect_format(records: Any, sample: int = 50) -> str:
    """The layout that reads the most of the first ``sample`` records: for each layout, the fields its reader keeps
    summed over the records it accepts. Shape decides, not single keys, so a record two layouts could read goes to
    the one that keeps more of it (a KnowEdit zsRE record, with ``rephrase_prompt`` beside a ``locality`` dict,
    is KnowEdit, not simplified CounterFact); ties go to the first of :data:`FORMATS`."""
    records = records if isinstance(records, list) else [records]
    scores = dict.fromkeys(FORMATS, 0)
    for record in [r for r in records if isinstance(r, dict)][:sample]:
        for fmt, reader in _READERS.items():
            try:
                request = reader(record)
            except (_Invalid, AttributeError, TypeError):
                continue
            scores[fmt] += 1000 + sum(value is not None for value in asdict(request).values())
    return max(FORMATS, key=lambda fmt: scores[fmt]) if any(scores.values()) else "requests"


def load_requests(
    path: str | Path,
    dataset: str = "auto",
    skip_invalid: bool = False,
    require: tuple[str, ...] = (),
    limit: int | None = None,
) -> tuple[list[EditRequest], LoadReport]:
    """Read and validate a data file into :class:`EditRequest` objects.

    Args:
        path: ``.json``/``.jsonl`` file, optionally ``.gz``.
        dataset: one of ``zsre``, ``counterfact``, ``knowedit``, ``requests`` or ``auto``.
        skip_invalid: count invalid records instead of failing on the first one.
        require: optional fields that must be present for this use (e.g. ``("rephrase", "locality_prompt")``
            for training).
        limit: keep only the first ``limit`` records of the file (before validation).
    """
    if dataset != "auto" and dataset not in FORMATS:
        raise RecordError(f"Unknown dataset format '{dataset}': use one of {FORMATS} or 'auto'.")
    if limit is not None and limit < 1:
        raise RecordError(f"limit={limit} keeps no record of '{path}'; give a positive number of records.")
    records = read_json_records(path)
    if not isinstance(records, list):
        raise RecordError(f"Data file '{path}' holds a JSON {type(records).__name__}; expected a list of records.")
    if limit is not None:
        records = records[:limit]
    fmt = detect_format(records) if dataset == "auto" else dataset
    reader = _READERS[fmt]
    report = LoadReport(str(path), n_records=len(records), format=fmt)
    requests = []
    for index, record in enumerate(records):
        try:
            if not isinstance(record, dict):
                raise _Invalid("(record)", f"must be a JSON object, not {type(record).__name__}")
            request = reader(record)
            for name in require:
                if getattr(request, name) is None:
                    raise _Invalid(name, f"is needed here but the {fmt} record has none")
        except _Invalid as err:
            if not skip_invalid:
                raise RecordError(f"{path}: record {index}: {err} (format '{fmt}'); fix the record or skip invalid "
                                  "records (edit.py --skip-invalid, recipes data.skip_invalid).") from None
            report.invalid[err.reason] += 1
            continue
        requests.append(request)
        report.kept.append(index)
    if not requests:
        raise RecordError(f"{path} holds no valid edit request ({report.summary()}).")
    return requests, report


def hold_out_dev(requests: list[EditRequest], report: LoadReport, dev_size: int) -> tuple[list[EditRequest], list[int],
                                                                                   list[EditRequest], list[int]]:
    """Split a training file's valid requests into (train, train record ids, dev, dev record ids): the last
    ``dev_size`` valid records are the development split, for tuning settings without the evaluation records."""
    if dev_size < 0 or dev_size >= len(requests):
        raise RecordError(f"dev_size={dev_size} must be at least 0 and below the {len(requests)} valid records of "
                          f"'{report.path}'; choose a smaller dev_size.")
    cut = len(requests) - dev_size
    return requests[:cut], report.kept[:cut], requests[cut:], report.kept[cut:]


def find_conflicts(requests: list[EditRequest]) -> tuple[int, dict[str, list[str]]]:
    """(number of exact duplicates, {prompt: its different targets}) of a set of requests: at most one target per
    prompt can hold after one edit."""
    targets: dict[str, list[str]] = {}
    duplicates = 0
    for request in requests:
        seen = targets.setdefault(request.prompt, [])
        if request.target in seen:
            duplicates += 1
        else:
            seen.append(request.target)
    return duplicates, {prompt: found for prompt, found in targets.items() if len(found) > 1}


def request_to_dict(request: EditRequest) -> dict:
    """Plain-dict form (used for reports)."""
    return asdict(request)
