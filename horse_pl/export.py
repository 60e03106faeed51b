"""Exported editors: a folder with ``config.json`` and ``model.safetensors``, loadable without Lightning.

``python train.py export --ckpt_path CKPT --out DIR`` writes it; :func:`load_editor` reads it back.
Exports are reproducible: the same checkpoint gives the same bytes.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
from dataclasses import MISSING, asdict, dataclass, field, fields
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from horse_pl.cards import editor_card
from horse_pl.editing.editor import Editor
from horse_pl.io import first_line, write_atomic_dir
from horse_pl.methods import SPREADS, UPDATES, method_of
from horse_pl.models import parse_dtype

FORMAT_VERSION = 1


class EditorLoadError(ValueError):
    """An editor folder is missing, incomplete or does not fit the model it is used with."""


@dataclass
class EditorConfig:
    """Everything needed to rebuild an editor and check it against a base model."""

    method: str
    spread: str
    update: str
    positions: str
    learn_lambda: bool
    rank: int
    n_blocks: int
    lr: float
    chunk_size: int
    cache_dtype: str
    edit_modules: list[str]
    shapes: list[list[int]]
    base_model: str
    base_fingerprint: str
    training: dict = field(default_factory=dict)
    update_args: dict = field(default_factory=dict)  # the update stage's options (e.g. ClosedFormUpdate.preserve)
    versions: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION


def build_editor(config: EditorConfig) -> Editor:
    """An :class:`Editor` with the architecture and stages named in ``config`` (weights untouched)."""
    if config.spread not in SPREADS or config.update not in UPDATES:
        raise EditorLoadError(f"Unknown stage in editor config: spread '{config.spread}', update '{config.update}'.")
    try:
        update = UPDATES[config.update](**config.update_args)
    except (TypeError, ValueError) as err:
        raise EditorLoadError(f"The editor config's update_args {config.update_args} do not fit the '{config.update}' "
                              f"stage ({err}); export the editor again.") from None
    return Editor([tuple(s) for s in config.shapes], config.rank, config.n_blocks, config.lr,
                  SPREADS[config.spread](), update, config.positions, config.learn_lambda,
                  config.chunk_size, parse_dtype(config.cache_dtype))


def save_editor(editor: Editor, config: EditorConfig, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``out`` atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in sorted(editor.state_dict().items())}

    def write(folder: Path) -> None:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "horse_pl-editor"})
        (folder / "config.json").write_text(json.dumps(asdict(config), indent=2, sort_keys=True) + "\n")
        (folder / "README.md").write_text(editor_card(config))

    write_atomic_dir(out, write, "replace" if overwrite else "error")
    return Path(out)


_JSON_TYPES = {"str": (str,), "bool": (bool,), "int": (int,), "float": (int, float), "list": (list,), "dict": (dict,)}


def _read_config(config_path: Path) -> EditorConfig:
    """``config.json`` as an :class:`EditorConfig`, with one sentence naming the file and field when it is wrong."""
    fix = "export the editor again with 'python train.py export'"
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EditorLoadError(f"'{config_path}' is not valid JSON ({err}); {fix}.") from None
    if not isinstance(raw, dict):
        raise EditorLoadError(f"'{config_path}' holds a JSON {type(raw).__name__}, not an object of editor settings; "
                              f"{fix}.")
    if raw.get("format_version") != FORMAT_VERSION:
        raise EditorLoadError(f"'{config_path}' has format_version {raw.get('format_version')}, this horse_pl reads "
                              f"{FORMAT_VERSION}; {fix} with this version.")
    known = {f.name: f for f in fields(EditorConfig)}
    required = [name for name, f in known.items() if f.default is MISSING and f.default_factory is MISSING]
    missing, extra = [n for n in required if n not in raw], sorted(set(raw) - set(known))
    if missing or extra:
        what = "; ".join(part for part in (f"missing {missing}" if missing else "",
                                           f"unknown {extra}" if extra else "") if part)
        raise EditorLoadError(f"'{config_path}' does not have the editor fields ({what}); {fix}.")
    for name, value in raw.items():
        expected = _JSON_TYPES[str(known[name].type).split("[")[0]]
        if not isinstance(value, expected) or (bool not in expected and isinstance(value, bool)):
            raise EditorLoadError(f"'{config_path}' field '{name}' is {type(value).__name__} {value!r:.40}, not "
                                  f"{str(known[name].type)}; {fix}.")
    return EditorConfig(**raw)


def load_editor(folder: str | Path, update_args: dict | None = None,
                update: str | None = None) -> tuple[Editor, EditorConfig]:
    """Load an exported editor folder (no checkpoint, trainer or pickle needed); ``update_args`` override the
    update stage's saved options and ``update`` (a name in :data:`UPDATES`) the stage itself, keeping the saved
    options it accepts (both are recorded in the returned config)."""
    folder = Path(folder)
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise EditorLoadError(f"'{folder}' is not an exported editor (needs config.json and model.safetensors); "
                              "create one with 'python train.py export'.")
    config = _read_config(config_path)
    if update and update != config.update:
        if update not in UPDATES:
            raise EditorLoadError(f"Unknown update stage '{update}'; use one of {sorted(UPDATES)}.")
        accepted = inspect.signature(UPDATES[update]).parameters
        config.update, config.update_args = update, {k: v for k, v in config.update_args.items() if k in accepted}
    if update_args:
        config.update_args = {**config.update_args, **update_args}
    editor = build_editor(config)
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise EditorLoadError(f"'{weights_path}' is not a readable safetensors file "
                              f"({first_line(err, 120)}); it is truncated or of another "
                              "kind: export the editor again with 'python train.py export'.") from None
    try:
        editor.load_state_dict(state)
    except RuntimeError as err:
        first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))[:160]
        raise EditorLoadError(f"'{weights_path}' does not fit the editor that '{config_path}' describes ({first}); "
                              "keep the two files of one export together, or export the editor again.") from None
    editor.eval()
    return editor, config


def _stage(value, default: type):
    """A stage as saved in a checkpoint: an instance, None (the default) or the CLI's class_path dict."""
    if value is None:
        return default()
    if isinstance(value, dict):
        module_name, _, class_name = value["class_path"].rpartition(".")
        return getattr(importlib.import_module(module_name), class_name)(**(value.get("init_args") or {}))
    return value


def _recorded_validation(ckpt_path: str | Path, step: int | None) -> dict | None:
    """The validation scores of the run's result record (:class:`horse_pl.records.ResultsRecorder`) beside the
    checkpoint, at the checkpoint's step: a ``last.ckpt`` is written just before the final validation runs."""
    for path in sorted(Path(ckpt_path).parent.glob("*-fit-*.json"), reverse=True):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        metrics = {k: v for k, v in record.get("metrics", {}).items() if k.startswith("val/")}
        if record.get("global_step") == step and metrics:
            return {"metrics": metrics, "step": step, "record": path.name}
    return None


def config_from_checkpoint(checkpoint: dict, ckpt_path: str | Path | None = None) -> EditorConfig:
    """The editor config of a Lightning checkpoint written by :class:`~horse_pl.module.EditorModule` (with the
    checkpoint's path, validation scores missing from it are taken from the run's result record beside it)."""
    hp = checkpoint["hyper_parameters"]
    meta = checkpoint.get("horse_pl")
    if meta is None:
        raise EditorLoadError("This checkpoint was not written by horse_pl's EditorModule (no 'horse_pl' entry).")
    spread = _stage(hp.get("spread"), SPREADS["gram_schmidt"])
    update = _stage(hp.get("update"), UPDATES["closed_form"])
    data = checkpoint.get("datamodule_hyper_parameters", {})
    training = {k: data.get(k) for k in ("train_path", "dataset", "n_edits", "batch_size", "seed")}
    if data.get("train_path") and Path(data["train_path"]).is_file():
        from horse_pl.data.records import file_sha256

        training["train_sha256"] = file_sha256(data["train_path"])
    training["global_step"] = checkpoint.get("global_step")
    if hp.get("preserve_facts_data"):
        training["preserve_facts_data"] = hp["preserve_facts_data"]
    validation = meta.get("validation") or (_recorded_validation(ckpt_path, checkpoint.get("global_step"))
                                           if ckpt_path else None)
    if validation:
        split = data.get("val_split") or "eval"
        training["validation"] = {
            **validation, "split": split, "n_edits": data.get("val_n_edits") or data.get("n_edits"),
            "path": data.get("train_path") if split == "dev" else data.get("val_path")}
    return EditorConfig(
        method=method_of(spread.name, update.name, hp["learn_lambda"]), spread=spread.name, update=update.name,
        positions=hp["positions"], learn_lambda=hp["learn_lambda"], rank=hp["rank"], n_blocks=hp["n_blocks"],
        lr=hp["lr"], chunk_size=hp["chunk_size"], cache_dtype=hp["cache_dtype"], edit_modules=meta["edit_modules"],
        shapes=[list(s) for s in meta["shapes"]], base_model=hp["model"], base_fingerprint=meta["fingerprint"],
        training=training, update_args=update.init_args(),
        versions={p: version(p) for p in ("horse_pl", "torch", "transformers", "lightning")},
    )


def read_checkpoint(ckpt_path: str | Path) -> dict:
    """A Lightning checkpoint's contents (tensors and plain data only: nothing in it is executed), or one sentence
    saying why it cannot be read."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise EditorLoadError(f"Checkpoint '{path}' does not exist{' (it is a folder)' if path.is_dir() else ''}; "
                              "pass a .ckpt file from checkpoints/.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: a resume check reads little
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, zipfile errors...
        raise EditorLoadError(f"Checkpoint '{path}' cannot be read ({type(err).__name__}: {first_line(err, 120)}); "
                              "it is truncated, not a Lightning checkpoint, or holds Python objects beyond tensors: "
                              "use another .ckpt (e.g. an earlier one in the same folder).") from None


def export_checkpoint(ckpt_path: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Turn a training checkpoint into an editor folder."""
    checkpoint = read_checkpoint(ckpt_path)
    config = config_from_checkpoint(checkpoint, ckpt_path)
    editor = build_editor(config)
    prefix = "editor."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    editor.load_state_dict(state)
    if not int(editor.micro_batch_rows) and config.training.get("batch_size"):
        # trained before the editor recorded its micro-batch size: the data module's is the same number
        editor.micro_batch_rows.fill_(int(config.training["batch_size"]))
    return save_editor(editor, config, out, overwrite)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python train.py export",
                                     description="Write a trained hypernetwork as a self-contained editor folder.")
    parser.add_argument("--ckpt_path", "--ckpt-path", required=True, help="Lightning checkpoint (.ckpt)")
    parser.add_argument("--out", required=True, help="editor folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.ckpt_path, args.out, args.overwrite)
    except (EditorLoadError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported editor to {out}")
    return 0
