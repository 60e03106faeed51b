"""Python API for applying edits with an exported editor (the objects ``edit.py`` uses).

    from horse_pl.api import KnowledgeEditor
    ke = KnowledgeEditor.from_pretrained("editors/zsre-smollm2")
    requests, _ = load_requests("my_edits.json")
    shifts, report = ke.edit(requests)          # computes, scores before/after, merges into ke.model
    ke.save("edited-model/")                    # plain transformers folder
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from horse_pl.data.batch import EVAL_VIEWS, EditBatch, View, edit_batch, text_batches
from horse_pl.data.paraphrases import ParaphraseBank
from horse_pl.data.prefixes import context_prefixes, with_prefixes
from horse_pl.data.records import EditRequest, RecordError, load_requests
from horse_pl.edit_modules import get_modules, resolve_edit_modules, weight_in_out
from horse_pl.editing.editor import Refinement, RefinementBatches
from horse_pl.editing.evaluate import REPLAY_BYTES, edit_and_score
from horse_pl.editing.key_stats import DEFAULT_GENERAL_DATA, bind_preservation, cached_key_moments, preservation_texts
from horse_pl.editing.shifts import applied, merge, restore_entries, revert_exactly
from horse_pl.export import EditorLoadError, load_editor
from horse_pl.generation import greedy_answers
from horse_pl.io import first_line, write_atomic_dir, write_atomic_file
from horse_pl.lm import lowest_layer, replayed_below
from horse_pl.metrics import SCORE_NAMES
from horse_pl.models import load_model, model_fingerprint
from horse_pl.progress import task
from horse_pl.sequential.general import GeneralCheck
from horse_pl.timing import StageTimer

DELTA_FORMAT = "horse_pl-delta"
SCORE_MODES = {"all": EVAL_VIEWS, "edit": ("edit", "rephrase"), "none": ()}  # views scored by KnowledgeEditor.edit
RESTORE_INDEX, RESTORE_VALUE = "{}::restore_index", "{}::restore_value"


def save_model(model, tokenizer, out: str | Path, overwrite: bool = False, files: dict[str, str] | None = None) -> Path:
    """Save a model and its tokenizer with ``save_pretrained`` (safetensors) and text ``files`` beside them (name ->
    content) as one folder, atomically: ``out`` holds the old folder or the whole new one, never a part; an
    existing ``out`` is replaced only with ``overwrite``."""
    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        for name, text in (files or {}).items():
            (folder / name).write_text(text)
    with task("save", None):
        write_atomic_dir(out, write, "replace" if overwrite else "error")
    return Path(out)


def weights_sha256(weights: Sequence[torch.Tensor]) -> str:
    """sha256 of every bit of these (d_in, d_out) weights: the exact check a delta makes before it is applied or
    reverted (the model fingerprint only samples the weights)."""
    digest = hashlib.sha256()
    for weight in weights:
        digest.update(weight.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class KnowledgeEditor:
    """An exported editor bound to a base model.

    Args:
        editor_dir: folder written by ``python train.py export``.
        model: base model (defaults to the one the editor was trained on).
        dtype, device: how to load the base model.
    """

    def __init__(self, editor, config, model, tokenizer, model_name: str):
        self.editor, self.config, self.model_name = editor, config, model_name
        self.model, self.tokenizer = model, tokenizer
        self.modules = get_modules(model, config.edit_modules)
        self.timings: dict[str, float] = {}
        self.fingerprints: tuple[str | None, str | None] = (None, None)  # (before, after) the last merge
        self._originals: list[torch.Tensor] | None = None  # edit modules' weights before the last merge
        self.general_data = DEFAULT_GENERAL_DATA  # the folder of the preservation texts (C0, the refinement's texts)
        self._banks: dict[tuple[str, int], ParaphraseBank] = {}  # paraphrase banks read, by (file, first n records)

    @classmethod
    def from_pretrained(cls, editor_dir: str | Path, model: str | None = None, dtype: str = "float32",
                        device: str = "cpu", update_args: dict | None = None,
                        general_data: str = DEFAULT_GENERAL_DATA, update: str | None = None,
                        preserve_facts_data: str | None = None) -> KnowledgeEditor:
        """Load an exported editor and its base model. ``update_args`` override the update stage's saved options
        (e.g. ``{"preserve": 1e4}``), ``update`` the stage (e.g. ``"joint_closed_form"``); ``general_data`` holds
        the texts of a preservation term's key moments, ``preserve_facts_data`` the records file of a
        ``preserve_facts`` term (default: the one the editor was trained with)."""
        start = time.perf_counter()
        editor, config = load_editor(editor_dir, update_args, update)
        name = model or config.base_model
        lm, tokenizer = load_model(name, dtype=dtype, device=device)
        resolve_edit_modules(lm, config.edit_modules)  # clear error if a module is missing
        fingerprint = model_fingerprint(lm)
        if fingerprint != config.base_fingerprint:
            raise EditorLoadError(f"The editor in '{editor_dir}' was trained on '{config.base_model}' (fingerprint "
                                  f"{config.base_fingerprint}), not on '{name}' (fingerprint {fingerprint}); "
                                  "use the editor's base model or train an editor for this one.")
        bind_preservation(editor, lm, tokenizer, config.edit_modules, general_data,
                          preserve_facts_data or config.training.get("preserve_facts_data"))
        instance = cls(editor.to(device), config, lm, tokenizer, name)
        instance.general_data = general_data
        instance.timings["load"] = time.perf_counter() - start
        return instance

    @property
    def device(self) -> torch.device:
        """Where the model (and with it every edit batch) is."""
        return next(self.model.parameters()).device

    def batches(self, requests: Sequence[EditRequest], batch_size: int = 32, max_length: int = 256) -> EditBatch:
        """All requests as one edit batch of micro-batches (the unit the closed-form solve needs)."""
        batch = edit_batch(self.tokenizer, requests, EVAL_VIEWS, batch_size, max_length)
        return batch.to(self.device)

    def _view_batches(self, requests: Sequence[EditRequest], view: str, batch_size: int, max_length: int) -> list:
        """One view of ``requests`` as micro-batches on the model's device."""
        return edit_batch(self.tokenizer, requests, (view,), batch_size, max_length).to(self.device)[view].micro_batches

    def context_batches(self, requests: Sequence[EditRequest], refinement: Refinement | None, batch_size: int = 32,
                        max_length: int = 256, paraphrase_data: str | Path | None = None,
                        n_paraphrase_records: int = 8192) -> list:
        """The edit prompts behind ``refinement.prefixes`` context prefixes the model writes (seeded) and asked in up
        to ``refinement.paraphrases`` other words (:meth:`paraphrase_bank` of the first ``n_paraphrase_records``
        records of ``paraphrase_data``), as micro-batches for the refinement to read beside the prompts themselves;
        none without either."""
        if not refinement or not (refinement.prefixes or refinement.paraphrases):
            return []
        contexts = []
        if refinement.prefixes:
            contexts += with_prefixes(requests, context_prefixes(self.model, self.tokenizer, refinement.prefixes))
        if refinement.paraphrases:
            path = paraphrase_data or self.config.training.get("train_path")
            rephrased = self.paraphrase_bank(path, n_paraphrase_records).rephrased(requests, refinement.paraphrases)
            if not rephrased:
                raise RecordError(f"The paraphrase bank of '{path}' knows none of these {len(requests)} requests' "
                                  "question templates (or they name no subject); pass a records file that asks them "
                                  "(--refine-paraphrase-data FILE) or refine without rephrasings.")
            contexts += rephrased
        return self._view_batches(contexts, "edit", batch_size, max_length)

    def paraphrase_bank(self, path: str | Path | None, n: int = 8192) -> ParaphraseBank:
        """The rephrasings the valid records among the first ``n`` of ``path`` (default the file the editor was trained
        on) pair with each question template (:class:`ParaphraseBank`). Tune on records the bank does not hold (the
        development split is the training file's end). Read once per file and ``n``."""
        if (str(path), n) in self._banks:
            return self._banks[str(path), n]
        if not path:
            raise ValueError("Rephrasing the edit prompts needs a records file of prompts and their rephrasings; this "
                             "editor names no training file, so pass one (--refine-paraphrase-data FILE).")
        records, _ = load_requests(path, skip_invalid=True, limit=n)
        bank = ParaphraseBank(records)
        if not len(bank):
            raise RecordError(f"'{path}' holds no records with a subject named in both the prompt and its rephrase "
                              "prompt, so it rephrases nothing; pass a records file that has them "
                              "(--refine-paraphrase-data FILE).")
        self._banks[str(path), n] = bank
        return bank

    def anchor_batches(self, refinement: Refinement | None, path: str | Path | None = None, n: int = 512,
                       batch_size: int = 32, max_length: int = 256) -> list:
        """The locality questions of the valid records among the first ``n`` of ``path`` (default the file the editor
        was trained on) with their answers, as micro-batches whose answers ``refinement.locality`` keeps; none
        without it. Tune on records the anchors do not hold (the development split is the training file's end)."""
        if not refinement or not refinement.locality:
            return []
        path = path or self.config.training.get("train_path")
        if not path:
            raise ValueError("The refinement's locality term needs a records file of unrelated questions; this "
                             "editor names no training file, so pass one (--refine-locality-data FILE).")
        records, _ = load_requests(path, skip_invalid=True, limit=n)
        records = [r for r in records if r.locality_prompt and r.locality_answer]
        if not records:
            raise RecordError(f"'{path}' holds no records with a locality question and answer to keep; pass a "
                              "records file that has them (--refine-locality-data FILE).")
        return self._view_batches(records, "locality", batch_size, max_length)

    def text_batches(self, refinement: Refinement | None, n: int = 64, batch_size: int = 16,
                     max_length: int = 128) -> list:
        """The first ``n`` preservation texts (dialogue summaries and answered questions from the general data,
        none of them among the texts perplexity is measured on) as micro-batches labelled at every token, whose
        next-token distributions ``refinement.general`` keeps; none without it."""
        if not refinement or not refinement.general:
            return []
        if not self.general_data:
            raise ValueError("The refinement's general term reads the general data's preservation texts, but no "
                             "general data folder was given; pass --general-data FOLDER (the folder with "
                             "model_editing_hurt/, default ../shared/data/general).")
        texts = preservation_texts(self.general_data, n)
        return View(text_batches(self.tokenizer, texts, batch_size, max_length)).to(self.device).micro_batches

    def refinement_batches(self, requests: Sequence[EditRequest], refinement: Refinement | None,
                           anchors: str | Path | None = None, n_anchors: int = 512, n_texts: int = 64,
                           batch_size: int = 32, max_length: int = 256, paraphrase_data: str | Path | None = None,
                           n_paraphrase_records: int = 8192) -> RefinementBatches:
        """Everything ``refinement`` reads beside the edit prompts of ``requests``: :meth:`context_batches` (the
        rephrasings from the first ``n_paraphrase_records`` records of ``paraphrase_data``), :meth:`anchor_batches`
        (the first ``n_anchors`` records of ``anchors``) and :meth:`text_batches` (``n_texts`` texts); empty without
        a refinement. A refinement whose charge or budget measures the output change on unrelated text needs each
        edit module's ``C0``: it is bound here where the editor's own solve did not need it."""
        if refinement and (refinement.preserve or refinement.budget) and self.editor.key_moments is None:
            if not self.general_data:
                raise ValueError("The refinement's preserve and budget measure the output change on the general "
                                 "data's preservation texts, but no general data folder was given; pass "
                                 "--general-data FOLDER (the folder with model_editing_hurt/, default "
                                 "../shared/data/general).")
            moments = cached_key_moments(self.model, self.tokenizer, self.config.edit_modules, self.general_data)
            self.editor.bind_key_moments([m.to(self.device) for m in moments])
        return RefinementBatches(self.context_batches(requests, refinement, batch_size, max_length, paraphrase_data,
                                                      n_paraphrase_records),
                                 self.anchor_batches(refinement, anchors, n_anchors, batch_size, max_length),
                                 self.text_batches(refinement, n_texts, batch_size))

    def edit(self, requests: Sequence[EditRequest], batch_size: int = 32, max_length: int = 256,
             merge_shifts: bool = True, general: GeneralCheck | None = None,
             examples: int = 3, score: str = "all", rounds: int = 1,
             refinement: Refinement | None = None, anchors: str | Path | None = None,
             n_anchors: int = 512, n_texts: int = 64, paraphrase_data: str | Path | None = None,
             n_paraphrase_records: int = 8192) -> tuple[list[torch.Tensor], dict]:
        """Compute the shifts of all requests at once, score before/after, and (by default) merge them. The report's
        ``examples`` hold the greedy continuations of the first ``examples`` prompts after the edit and, with ``score``
        ``all``, before it (else ``before`` is None).
        ``score``: ``all`` (every view before and after), ``edit`` (the edit and rephrase prompts after the edit:
        ES, GS, EM) or ``none`` (no scoring, the edit alone). ``rounds > 1`` edits again on the edited model, each round
        about as strong as the first (:meth:`horse_pl.editing.editor.Editor.edit_in_rounds`). A ``refinement``
        (:class:`horse_pl.editing.editor.Refinement`) refines the residuals by Adam steps on the edit prompts' loss
        through the editor's own solve, each one forward + backward of the edit prompts (:meth:`Editor.refine`);
        its locality term keeps the answers of the first ``n_anchors`` locality questions of ``anchors``, its general
        term the next-token distributions of ``n_texts`` texts, its rephrasings come from the first
        ``n_paraphrase_records`` records of ``paraphrase_data`` (:meth:`refinement_batches`).
        With ``general`` the report also holds general abilities (perplexity, QA and choice tasks) of the
        model before and after the edit, and their retention (after / before)."""
        if not requests:
            raise RecordError("There are no valid edit requests to apply.")
        start = time.perf_counter()
        batch = self.batches(requests, batch_size, max_length)
        extra = self.refinement_batches(requests, refinement, anchors, n_anchors, n_texts, batch_size, max_length,
                                        paraphrase_data, n_paraphrase_records)
        self.timings["tokenize"] = time.perf_counter() - start
        if score not in SCORE_MODES:
            raise ValueError(f"score must be one of {list(SCORE_MODES)}, not '{score}'.")
        result = edit_and_score(self.editor, self.model, self.modules, batch, SCORE_MODES[score],
                                score_before=score == "all",
                                timer=StageTimer(self.device, self.timings), rounds=rounds,
                                refinement=refinement, refinement_batches=extra)
        general_report = self._general(general, result.state.param_shifts) if general is not None else None
        start = time.perf_counter()
        shown = list(requests[:examples])
        # the unedited continuations belong to the scores before the edit, which only score "all" computes
        before = (greedy_answers(self.model, self.tokenizer, shown, max_length=max_length) if score == "all"
                  else [None] * len(shown))
        with applied(self.modules, result.state.param_shifts):
            after = greedy_answers(self.model, self.tokenizer, shown, max_length=max_length)
        self.timings["examples"] = time.perf_counter() - start
        if merge_shifts:
            start = time.perf_counter()
            self.fingerprints = (model_fingerprint(self.model), None)
            self._originals = [weight_in_out(m).detach().clone() for m in self.modules]
            merge(self.modules, result.state.param_shifts)
            self.fingerprints = (self.fingerprints[0], model_fingerprint(self.model))
            self.timings["merge"] = time.perf_counter() - start
        report = self._report(requests, result)
        report["settings"] = {"score": score, "rounds": rounds,
                              "refinement": asdict(refinement) if refinement else None}
        report["examples"] = [{"prompt": r.prompt, "target": r.target, "before": b, "after": a}
                              for r, b, a in zip(shown, before, after)]
        if general_report is not None:
            report["general"] = general_report
        return result.state.param_shifts, report

    def _general(self, general: GeneralCheck, shifts: Sequence[torch.Tensor]) -> dict:
        start = time.perf_counter()
        # a baseline scored here records the layers below the edit modules, which the edited pass then replays
        with replayed_below(self.model, lowest_layer(self.model, self.modules), REPLAY_BYTES):
            if general.before is None:
                general.baseline(self.model)
            with applied(self.modules, shifts):
                after = general.score(self.model)
        self.timings["general"] = time.perf_counter() - start
        return {"before": general.before, "after": after, "retention": general.retention(after),
                "tasks": general.task_table()}

    def _report(self, requests, result) -> dict:
        per_request = [{"prompt": r.prompt, "target": r.target, "before": {}, "after": {}} for r in requests]
        for when, scores in (("before", result.before or {}), ("after", result.after)):
            for name, view in (("ES", "edit"), ("GS", "rephrase"), ("LS", "locality"), ("portability", "portability")):
                if view in scores:
                    for row, acc in zip(scores[view].rows.tolist(), scores[view].accuracy.tolist()):
                        per_request[row][when][name] = acc
            for name, view in (("EM_edit", "edit"), ("EM_rephrase", "rephrase")):
                if view in scores:
                    for row, ok in zip(scores[view].rows.tolist(), scores[view].exact.tolist()):
                        per_request[row][when][name] = bool(ok)
        summary = {}
        for when, values in (("before", result.values_before or {}), ("after", result.values_after)):
            summary[when] = {n: float(values[n].mean()) for n in SCORE_NAMES if n in values and values[n].numel()}
        return {"n_requests": len(requests), "summary": summary, "requests": per_request}

    def save(self, out: str | Path, overwrite: bool = False, files: dict[str, str] | None = None) -> Path:
        """Save the (edited) model and tokenizer (see :func:`save_model`)."""
        return save_model(self.model, self.tokenizer, out, overwrite, files)

    def save_delta(self, shifts: Sequence[torch.Tensor], out: str | Path, requests_sha256: str = "",
                   overwrite: bool = False) -> Path:
        """Write only the merged shifts of the edit modules (safetensors, with provenance metadata), and the
        original values of the few entries where subtracting a shift would not restore them bit for bit."""
        if self.fingerprints[1] is None or self._originals is None:
            raise RuntimeError("save_delta needs edit(..., merge_shifts=True) first.")
        tensors = {}
        for name, shift, module, original in zip(self.config.edit_modules, shifts, self.modules, self._originals):
            tensors[name] = shift.detach().cpu().contiguous()
            index, values = restore_entries(original, weight_in_out(module).detach(), shift.detach())
            tensors[RESTORE_INDEX.format(name)] = index.cpu()
            tensors[RESTORE_VALUE.format(name)] = values.cpu()
        meta = {"format": DELTA_FORMAT, "base_model": self.model_name, "base_fingerprint": self.fingerprints[0],
                "result_fingerprint": self.fingerprints[1],
                "base_weights_sha256": weights_sha256(self._originals),
                "result_weights_sha256": weights_sha256([weight_in_out(m) for m in self.modules]),
                "modules": json.dumps(self.config.edit_modules), "dtype": str(next(self.model.parameters()).dtype),
                "orientation": "d_in x d_out", "requests_sha256": requests_sha256}
        return write_atomic_file(out, lambda tmp: save_file(tensors, str(tmp), metadata=meta), overwrite)


def read_delta(delta_path: str | Path, tensors: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """A delta file's metadata and (unless ``tensors=False``, a quick check) its tensors; one-sentence errors for a
    missing, foreign or damaged file."""
    from safetensors import SafetensorError, safe_open

    path = Path(delta_path)
    if not path.is_file():
        raise FileNotFoundError(f"Delta file '{path}' does not exist{' (it is a folder)' if path.is_dir() else ''}; "
                                "give the file that 'edit.py --delta' wrote.")
    try:
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
        if meta.get("format") != DELTA_FORMAT:
            raise EditorLoadError(f"'{path}' is not a horse_pl delta file; write one with 'edit.py --delta'.")
        return meta, load_file(str(path)) if tensors else {}
    except (SafetensorError, OSError, ValueError) as err:
        if isinstance(err, EditorLoadError):
            raise
        raise EditorLoadError(f"'{path}' is not a readable safetensors file ({first_line(err)}); give the file "
                              "that 'edit.py --delta' wrote.") from None


def apply_delta(model: torch.nn.Module, delta_path: str | Path, sign: float = 1.0) -> dict:
    """Add (``sign=1``) or remove (``sign=-1``) a delta file's shifts in place; refuse any model but the one the
    delta was made from (apply) or produced (revert). Reverting restores the weights bit for bit."""
    meta, tensors = read_delta(delta_path)
    names = json.loads(meta["modules"])
    modules = get_modules(model, names)
    fingerprint = model_fingerprint(model)
    expected = meta["base_fingerprint"] if sign > 0 else meta["result_fingerprint"]
    exact = meta.get("base_weights_sha256" if sign > 0 else "result_weights_sha256")
    if fingerprint != expected or (exact and weights_sha256([weight_in_out(m) for m in modules]) != exact):
        what = "applied to the model it was made from" if sign > 0 else "reverted from the model it produced"
        found = f"fingerprint is {fingerprint}" if fingerprint != expected else "edit modules' weights differ from it"
        raise EditorLoadError(f"The delta '{delta_path}' can only be {what} (fingerprint {expected}; made from "
                              f"'{meta['base_model']}'), but this model's {found}; apply deltas in order and revert "
                              "them in reverse order.")
    shifts = [tensors[n] for n in names]
    restores = [(tensors.get(RESTORE_INDEX.format(n)), tensors.get(RESTORE_VALUE.format(n))) for n in names]
    if sign < 0 and all(index is not None for index, _ in restores):
        revert_exactly(modules, shifts, restores)
    else:  # apply, or a delta written before exact reverts (its revert is within float rounding)
        merge(modules, shifts, sign=sign)
    return meta
