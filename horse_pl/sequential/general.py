"""General-ability checks before and after a sequence of edits: zero-shot choice tasks and perplexity.

Each task example is a prompt with candidate continuations; the model's answer is the candidate with the
highest mean per-token log-probability (the same teacher-forced pass as the edit scores). A task counts
only where the unedited model is clearly above chance (accuracy above chance by more than two binomial
standard errors); the others are reported as dropped, with their numbers.
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from horse_pl.data.batch import View
from horse_pl.data.records import RecordError
from horse_pl.data.tokenize import IGNORE_INDEX, collate, tokenize_pairs
from horse_pl.metrics import score_view
from horse_pl.progress import task


@dataclass(frozen=True)
class ChoiceExample:
    prompt: str
    choices: tuple[str, ...]
    label: int


def _binary(template: str, choices: tuple[str, str], positive: Callable[[dict], bool]):
    def build(record: dict) -> ChoiceExample:
        return ChoiceExample(template.format(**record), choices, int(positive(record)))
    return build


# name -> (file under the general data folder, record -> example). RTE is left out: its integer labels follow
# no convention stated with the data; NLI covers the same task with named labels.
TASKS: dict[str, tuple[str, Callable[[dict], ChoiceExample]]] = {
    "sst2": ("glue_eval/sst2.json.gz", _binary(
        "Review: {sentence}\nIs this review positive or negative? Answer:", ("negative", "positive"),
        lambda r: int(r["label"]) == 1)),
    "sentiment_analysis": ("glue_eval/sentiment_analysis.json.gz", _binary(
        "Review: {sentence}\nIs this review positive or negative? Answer:", ("negative", "positive"),
        lambda r: int(r["label"]) == 1)),
    "cola": ("glue_eval/cola.json.gz", _binary(
        "Sentence: {sentence}\nIs this sentence grammatically correct? Answer yes or no:", ("no", "yes"),
        lambda r: int(r["label"]) == 1)),
    "mrpc": ("glue_eval/mrpc.json.gz", _binary(
        "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nDo both sentences mean the same thing? Answer yes or no:",
        ("no", "yes"), lambda r: int(r["label"]) == 1)),
    "nli": ("glue_eval/nli.json.gz", _binary(
        "{sentence1}\nQuestion: does this imply that \"{sentence2}\"? Answer yes or no:", ("no", "yes"),
        lambda r: r["label"] == "entailment")),
    "dialogue": ("glue_eval/dialogue.json.gz",
                 lambda r: ChoiceExample(r["article"], tuple(r["options"]), "ABCD".index(r["answers"]))),
    "mmlu": ("glue_eval/mmlu.json.gz",
             lambda r: ChoiceExample(f"Question: {r['question']}\nAnswer:", tuple(r["choices"]), int(r["answer"]))),
}


# name -> (file, record -> (question prompt, answer)): short-answer QA scored by teacher-forced token accuracy
# (the ES/GS/LS measure); chance is one over the vocabulary.
QA_TASKS: dict[str, tuple[str, Callable[[dict], tuple[str, str]]]] = {
    "open_domain_qa": ("model_editing_hurt/test-OpenDomainQA.jsonl.gz",
                       lambda r: (f"Question: {r['question'].rstrip('?')}?\nAnswer:", r["answer"][0])),
}


def _read(root: str | Path, relative: str, limit: int | None) -> list[dict]:
    path = Path(root) / relative
    if not path.exists():
        raise FileNotFoundError(f"General-ability data '{path}' is missing; point --general-data at the folder "
                                "that holds glue_eval/ and model_editing_hurt/ (../shared/data/general).")
    with gzip.open(path, "rt") as handle:
        if path.name.endswith(".jsonl.gz"):
            records = [json.loads(line) for _, line in zip(range(limit or 10**9), handle)]
        else:
            records = json.load(handle)
    return records[:limit]


def load_task(root: str | Path, name: str, limit: int | None) -> list:
    """The first ``limit`` examples of a task, in file order (the choice tasks' labels are balanced)."""
    if name in TASKS:
        return [TASKS[name][1](r) for r in _read(root, TASKS[name][0], limit)]
    if name in QA_TASKS:
        return [QA_TASKS[name][1](r) for r in _read(root, QA_TASKS[name][0], limit)]
    raise RecordError(f"Unknown general task '{name}'; choose from {sorted(TASKS) + sorted(QA_TASKS)}.")


@torch.no_grad()
def qa_accuracy(model: nn.Module, tokenizer, examples: Sequence[tuple[str, str]], batch_size: int = 16,
                max_length: int = 512) -> float:
    """Mean over questions of the fraction of answer tokens predicted right (teacher-forced)."""
    pairs = tokenize_pairs(tokenizer, [q for q, _ in examples], [a for _, a in examples], max_length,
                           where="general QA example")
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].input_ids))
    total = 0.0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        scores = score_view(model, View([collate([pairs[i] for i in idx], tokenizer.pad_token_id)], torch.tensor(idx)))
        total += float(scores.accuracy.sum())
    return total / max(1, len(pairs))


@torch.no_grad()
def choice_accuracy(model: nn.Module, tokenizer, examples: Sequence[ChoiceExample], batch_size: int = 16,
                    max_length: int = 1024, calibrate: bool = True) -> float:
    """Fraction of examples whose labelled choice has the highest mean token log-probability (for a fixed
    label set, after subtracting each label's mean over the examples)."""
    prompts = [e.prompt for e in examples for _ in e.choices]
    answers = [c for e in examples for c in e.choices]
    pairs = tokenize_pairs(tokenizer, prompts, answers, max_length, where="general example")
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].input_ids))
    logprob = torch.empty(len(pairs))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        scores = score_view(model, View([collate([pairs[i] for i in idx], tokenizer.pad_token_id)], torch.tensor(idx)))
        logprob[idx] = scores.mean_logprob.cpu()
    choice_sets = {e.choices for e in examples}
    if calibrate and len(choice_sets) == 1:
        # Contextual calibration: a fixed label set is scored relative to each label's mean log-probability
        # over the task, so a small model's prior preference for one label word does not decide the answer.
        logprob = logprob.view(len(examples), -1)
        logprob = (logprob - logprob.mean(0, keepdim=True)).flatten()
    right, pos = 0, 0
    for e in examples:
        right += int(int(logprob[pos:pos + len(e.choices)].argmax()) == e.label)
        pos += len(e.choices)
    return right / max(1, len(examples))


def perplexity_texts(root: str | Path, n: int = 64) -> list[str]:
    """A fixed text sample: the first ``n`` reference summaries of the summarisation task (plain English)."""
    path = Path(root) / "model_editing_hurt" / "test-summarization.json.gz"
    with gzip.open(path, "rt") as handle:
        return [r["summary"].strip() for r in json.load(handle)[:n]]


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 16, max_length: int = 128) -> float:
    """Token-weighted perplexity of ``texts`` (each truncated to ``max_length`` tokens)."""
    nll, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, IGNORE_INDEX)
        logits = model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)).logits
        shift = labels[:, 1:].to(device)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), shift.flatten(),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
        nll += float(loss)
        count += int((shift != IGNORE_INDEX).sum())
    return math.exp(nll / count)


def general_abilities(model: nn.Module, tokenizer, root: str | Path, tasks: Sequence[str], limit: int | None,
                      ppl_texts: int = 64) -> dict[str, float]:
    """Accuracy on each task and perplexity on the fixed sample."""
    with task("general", len(tasks) + 1) as advance:
        scores = {}
        for name in tasks:
            scores[name] = (qa_accuracy if name in QA_TASKS else choice_accuracy)(model, tokenizer,
                                                                                 load_task(root, name, limit))
            advance()
        scores["perplexity"] = perplexity(model, tokenizer, perplexity_texts(root, ppl_texts))
        advance()
    return scores


def chance_level(name: str, examples: Sequence, tokenizer=None) -> float:
    """Accuracy of always answering the most frequent label (QA: of a uniform guess over the vocabulary)."""
    if name in QA_TASKS:
        return 1.0 / len(tokenizer)
    labels = [e.label for e in examples]
    return max(labels.count(v) for v in set(labels)) / len(labels)


def above_chance(accuracy: float, chance: float, n: int) -> bool:
    """Clearly above chance: by more than two binomial standard errors."""
    return accuracy > chance + 2 * math.sqrt(chance * (1 - chance) / n)


def retention(before: dict[str, float], after: dict[str, float], kept: Sequence[str]) -> dict[str, float | None]:
    """after / before per kept task and their mean; for perplexity before / after (1 = unchanged, lower = worse)."""
    out: dict[str, float | None] = {name: after[name] / before[name] for name in kept}
    out["mean"] = sum(out.values()) / len(out) if out else None  # no task above chance: nothing to average
    out["perplexity"] = before["perplexity"] / after["perplexity"]
    return out


# every task the checks know, QA first (it alone is clearly above chance for SmolLM2-135M)
DEFAULT_TASKS = ("open_domain_qa", "sst2", "sentiment_analysis", "cola", "mrpc", "nli", "mmlu")


class GeneralCheck:
    """General abilities of one model before and after editing: score the unedited model once (which also
    decides which tasks are clearly above chance), then any edited model against it as retention.

    Args:
        tokenizer: the model's tokenizer.
        root: folder with ``glue_eval/`` and ``model_editing_hurt/`` (``../shared/data/general``).
        tasks: task names (:data:`TASKS`, :data:`QA_TASKS`).
        limit: examples per task.
    """

    def __init__(self, tokenizer, root: str | Path, tasks: Sequence[str], limit: int | None):
        self.tokenizer, self.root, self.tasks, self.limit = tokenizer, root, tuple(tasks), limit
        examples = {t: load_task(root, t, limit) for t in self.tasks}
        self.chance = {t: chance_level(t, examples[t], tokenizer) for t in self.tasks}
        self.n = {t: len(examples[t]) for t in self.tasks}
        self.before: dict[str, float] | None = None
        self.kept: list[str] = []

    def score(self, model: nn.Module) -> dict[str, float]:
        """Every task's score and perplexity (the dropped tasks too, so a report can show their numbers)."""
        return general_abilities(model, self.tokenizer, self.root, self.tasks, self.limit)

    def retention_of(self, model: nn.Module) -> dict[str, float | None]:
        """Retention of ``model`` against the baseline, scoring only what it counts: the kept tasks and perplexity
        (the dropped tasks never enter retention; scoring them is most of a full check's time for a small model)."""
        if self.before is None:
            raise RuntimeError("GeneralCheck.retention_of needs the unedited model's scores: call baseline first.")
        return self.retention(general_abilities(model, self.tokenizer, self.root, self.kept, self.limit))

    def baseline(self, model: nn.Module) -> dict[str, float]:
        """Score the unedited model and keep the tasks it does clearly above chance."""
        self.before = self.score(model)
        self.kept = [t for t in self.tasks if above_chance(self.before[t], self.chance[t], self.n[t])]
        return self.before

    def task_table(self) -> dict[str, dict]:
        """Per task: chance level, the unedited model's score, examples, and whether it counts."""
        return {t: {"chance": self.chance[t], "unedited": self.before[t], "n": self.n[t], "kept": t in self.kept}
                for t in self.tasks}

    def retention(self, after: dict[str, float]) -> dict[str, float | None]:
        return retention(self.before, after, self.kept)


class RetentionMeans:
    """General-ability retention of one model under several separate edits, averaged (``train.py validate`` /
    ``test``: one edit per evaluation batch). ``update`` scores the model as it is (edited); the unedited model
    is scored once, by ``baseline``, before the first update."""

    def __init__(self, check: GeneralCheck):
        self.check = check
        self.values: dict[str, list[float]] = {}

    @classmethod
    def asked_by(cls, data, root: str | Path) -> RetentionMeans | None:
        """The retention a data module's ``general_tasks`` ask for (None: not asked), data from ``root``."""
        tasks = getattr(data, "hparams", {}).get("general_tasks")
        if tasks is None:
            return None
        return cls(GeneralCheck(data.tokenizer, root, tasks, data.hparams.general_limit))

    def baseline(self, model: nn.Module) -> None:
        if self.check.before is None:
            self.check.baseline(model)

    def update(self, model: nn.Module) -> None:
        for name, value in self.check.retention_of(model).items():
            if value is not None:  # "mean" is None when no task is clearly above chance
                self.values.setdefault(name, []).append(value)

    def compute(self) -> dict[str, float]:
        """``<task>_retention`` (and ``mean_retention``, ``perplexity_retention``) averaged over the updates, and
        ``unedited_<task>``: the unedited model's scores."""
        out = {f"{name}_retention": sum(v) / len(v) for name, v in self.values.items()}
        out.update({f"unedited_{name}": value for name, value in (self.check.before or {}).items()})
        return out

    def reset(self) -> None:
        self.values = {}
