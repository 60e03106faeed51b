"""Short ``README.md`` model cards for the folders horse_pl writes: an exported editor and an edited model.

Each says what the folder is, what it was made from (base model and fingerprint, method and stages, data and
budget), how well it did (the scores recorded when it was made, with the split they come from) and how to load it.
Cards hold no dates or paths of the machine that wrote them beyond what the user passed, so exports stay
reproducible (the same checkpoint gives the same bytes).
"""

from __future__ import annotations

from collections.abc import Mapping

SCORE_ORDER = ("ES", "GS", "LS", "LS_agree", "EM_edit", "EM_rephrase", "efficacy", "paraphrase", "neighborhood",
               "portability")


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def editor_card(config) -> str:
    """The card of an exported editor folder (:class:`horse_pl.export.EditorConfig`)."""
    training, validation = config.training, config.training.get("validation") or {}
    layers = ", ".join(name.split(".mlp")[0].rsplit(".", 1)[-1] for name in config.edit_modules)
    lines = [f"# horse_pl editor: {config.method} for {config.base_model}", "",
             f"A trained hypernetwork that edits facts in **{config.base_model}** (fingerprint "
             f"`{config.base_fingerprint}`; another base model is refused), many at once in one closed-form step.", "",
             "| | |", "|---|---|",
             f"| method | {config.method} (spread `{config.spread}`, update `{config.update}` "
             f"{config.update_args or ''}, learn_lambda {config.learn_lambda}) |",
             f"| edit modules | {len(config.edit_modules)} (layers {layers}): `{config.edit_modules[0]}`, ... |",
             f"| hypernetwork | rank {config.rank}, {config.n_blocks} blocks, keys at `{config.positions}` tokens |",
             f"| training data | `{training.get('train_path')}` ({training.get('dataset')}, sha256 "
             f"`{str(training.get('train_sha256', ''))[:16]}`) |",
             f"| budget | {training.get('global_step')} steps x {training.get('n_edits')} edits, micro-batch "
             f"{training.get('batch_size')}, seed {training.get('seed')} |",
             "| versions | " + ", ".join(f"{k} {v}" for k, v in sorted(config.versions.items())) + " |", ""]
    scores = validation.get("metrics", {})
    if scores:
        names = [n for n in SCORE_ORDER if f"val/{n}" in scores]
        source = f"; from the run's record `{validation['record']}`" if validation.get("record") else ""
        lines += [f"## Validation scores (step {validation.get('step')}, {validation.get('split', 'eval')} split: "
                  f"`{validation.get('path')}`, {validation.get('n_edits')} edits at once{source})", ""]
        lines += _table([tuple([n, f"{scores[f'val/unedited_{n}']:.3f}" if f"val/unedited_{n}" in scores else "-",
                                f"{scores[f'val/{n}']:.3f}"]) for n in names], ("score", "unedited", "edited"))
        lines.append("")
    else:
        lines += ["No validation scores were recorded with this checkpoint; score it with `python train.py validate` "
                  "or `benchmarks/edit_quality.py`.", ""]
    lines += ["## Use", "", "```bash",
              "python edit.py edit --editor THIS_FOLDER --requests my_edits.json --out edited-model/", "```", "",
              "```python", "from horse_pl.api import KnowledgeEditor",
              'ke = KnowledgeEditor.from_pretrained("THIS_FOLDER")', "```", ""]
    return "\n".join(lines)


def refinement_text(refinement: Mapping) -> str:
    """``Refinement`` settings in words (model cards and the results documents)."""
    parts = [f"{refinement['steps']} steps at relative rate {refinement['lr']:g}"]
    if refinement.get("target", 1.0) < 1:
        parts.append(f"until p {refinement['target']:g}")
    if refinement.get("preserve"):
        parts.append(f"preserve {refinement['preserve']:g}")
    if refinement.get("budget"):
        parts.append(f"output change on unrelated text at most {refinement['budget']:g} of the outputs")
    if refinement.get("at", "all") != "all":
        parts.append(f"shifts seen at the {refinement['at']} positions only")
    if refinement.get("prefixes"):
        parts.append(f"the prompts also behind {refinement['prefixes']} context prefixes")
    if refinement.get("paraphrases"):
        parts.append(f"the prompts also asked in up to {refinement['paraphrases']} other words")
    if refinement.get("locality"):
        parts.append(f"KL locality {refinement['locality']:g} on unrelated questions")
    if refinement.get("general"):
        parts.append(f"KL {refinement['general']:g} on plain text's next tokens")
    return ", ".join(parts)


def edited_model_card(report: Mapping, config, base_model: str, editor_dir: str) -> str:
    """The card of an edited-model folder written by ``edit.py`` (``report`` is its ``edit_report.json``)."""
    summary, requests = report["summary"], report["requests_file"]
    lines = [f"# {base_model}, edited with horse_pl", "",
             f"**{report['n_requests']} edits** applied at once to `{base_model}` (fingerprint "
             f"`{config.base_fingerprint}`) by the {config.method} editor in `{editor_dir}`. A plain transformers "
             "folder: load it with `AutoModelForCausalLM.from_pretrained(THIS_FOLDER)`.", "",
             f"- requests: `{requests['path']}` (sha256 `{requests['sha256']}`)",
             f"- edit modules: {', '.join(config.edit_modules)}",
             f"- update: `{config.update}` {config.update_args or ''}"]
    settings = report.get("settings", {})
    if settings.get("rounds", 1) > 1:
        lines.append(f"- rounds: {settings['rounds']}")
    if settings.get("refinement"):
        lines.append("- residuals refined: " + refinement_text(settings["refinement"]))
    lines += ["", "## Scores on the edited requests (teacher-forced; `edit_report.json` has every request)", ""]
    names = [n for n in SCORE_ORDER if n in summary["after"]]
    if names:
        lines += _table([(n, f"{summary['before'][n]:.3f}" if n in summary["before"] else "-",
                          f"{summary['after'][n]:.3f}") for n in names], ("score", "before", "after"))
    else:
        lines.append("Not scored (`edit.py --score none`).")
    general = report.get("general")
    if general:
        lines += ["", "## General abilities (after / before)", ""]
        lines += _table([(n, f"{general['before'][n]:.3f}", f"{general['after'][n]:.3f}",
                          f"{general['retention'][n]:.3f}") for n in general["retention"]
                         if n in general["before"] and general["retention"][n] is not None],
                        ("task", "before", "after", "retention"))
    if report.get("examples"):
        lines += ["", "## Examples (greedy continuations)", ""]
        lines += _table([(repr(e["prompt"]), repr(e["target"]), "-" if e["before"] is None else repr(e["before"]),
                          repr(e["after"]))
                         for e in report["examples"]], ("prompt", "target", "before", "after"))
    return "\n".join(lines) + "\n"
