"""Meta-training through the CLI on a tiny model: steps, validation, checkpoints, exact resume, recipes."""

import json
from pathlib import Path

import pytest
import torch
from conftest import checkpoint_every_step, small_zsre, train_args

from horse_pl.cli import cli, main

# train.py recipes; configs/sequential/ holds edit.py --sequential recipes (parsed in test_sequential.py)
CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def _params(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.editor.state_dict().items()}


def _assert_same_params(got_module, expected_module) -> None:
    expected, got = _params(expected_module), _params(got_module)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("method", ["horse", "horse_reference", "malmen", "mend"])
def test_fit_then_validate_runs_every_method(tiny_llama, tmp_path, method):
    run = cli(["fit"] + train_args(tiny_llama, tmp_path, steps=2, method=method, **{"model.lr": 30.0}))
    module = run.model
    assert run.trainer.global_step == 2
    metrics = run.trainer.callback_metrics
    for name in ("val/ES", "val/GS", "val/LS", "val/LS_agree", "val/unedited_ES", "val/EM_edit", "val/portability"):
        assert name in metrics, name
    # the editor edits: with an initial per-layer lr large enough for the tiny random model's gradients (30; the
    # default 1e-3 leaves its scores unchanged), the edit prompts' answers beat the unedited model's after 2 steps
    assert float(metrics["val/ES"]) > float(metrics["val/unedited_ES"]) + 0.05, (method, metrics["val/ES"])
    # the normaliser saw this run's rows; the LM stayed frozen and out of the checkpoint
    net = next(iter(module.editor.hypernet.nets.values()))
    assert net.normalizer.count > 0
    assert not any(p.requires_grad for p in module.lm.parameters())
    lam = net.lamda.weight
    assert (lam.abs().sum() > 0) == (method == "malmen")  # lambda learned by MALMEN only
    ckpt = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=False)
    assert not any(k.startswith("lm.") for k in ckpt["state_dict"])
    assert ckpt["horse_pl"]["fingerprint"] == module.fingerprint


def test_validate_and_test_from_a_checkpoint_reproduce_the_fit_validation(tiny_llama, tmp_path):
    """``train.py validate/test --ckpt_path`` edit under gradients (Lightning evaluates in inference mode by
    default) and, with the normaliser frozen outside training, give exactly the scores of fit's validation."""
    fit = cli(["fit"] + train_args(tiny_llama, tmp_path, steps=2) + checkpoint_every_step(tmp_path / "ckpt"))
    fitted = {k: float(v) for k, v in fit.trainer.callback_metrics.items() if k.startswith("val/")}
    ckpt = str(tmp_path / "ckpt" / "last.ckpt")
    for command, prefix in (("validate", "val/"), ("test", "test/")):
        run = cli([command] + train_args(tiny_llama, tmp_path / command, steps=2, **{"data.test_path": small_zsre()[1],
                                                                              "trainer.limit_test_batches": 2})
                  + ["--ckpt_path", ckpt])
        got = {k: float(v) for k, v in run.trainer.callback_metrics.items() if k.startswith(prefix)}
        for name in ("ES", "GS", "LS", "unedited_ES", "unedited_LS"):
            assert got[prefix + name] == pytest.approx(fitted["val/" + name], abs=1e-6), (command, name)




def test_resume_continues_exactly(tiny_llama, tmp_path, recwarn):
    every_step = checkpoint_every_step(tmp_path / "a")
    straight = cli(["fit"] + train_args(tiny_llama, tmp_path / "s", steps=4, **{"trainer.limit_val_batches": 0}))
    cli(["fit"] + train_args(tiny_llama, tmp_path / "a", steps=2, **{"trainer.limit_val_batches": 0}) + every_step)
    # the checkpoint holds the state after the optimiser step (exactly what resuming needs): no warning about it
    assert not [w for w in recwarn if "pre-optimization state" in str(w.message) or "in eval mode" in str(w.message)]
    resumed = cli(["fit"] + train_args(tiny_llama, tmp_path / "b", steps=4, **{"trainer.limit_val_batches": 0})
                  + ["--ckpt_path", str(tmp_path / "a" / "last.ckpt")])
    assert resumed.trainer.global_step == 4
    _assert_same_params(resumed.model, straight.model)


def test_cosine_meta_lr_schedule_decays_and_resumes_exactly(tiny_llama, tmp_path):
    """The cosine schedule reaches its floor at max_steps, and its state travels in the checkpoint: resuming
    from the step-2 checkpoint of a 4-step run ends with the parameters of the uninterrupted run."""
    cosine = {"trainer.limit_val_batches": 0, "model.meta_lr_schedule": "cosine", "model.min_meta_lr_ratio": 0.1}
    every_step = checkpoint_every_step(tmp_path / "s")
    straight = cli(["fit"] + train_args(tiny_llama, tmp_path / "s", steps=4, **cosine) + every_step)
    optimizer = straight.trainer.optimizers[0]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)  # 1e-3 * 0.1 after the 4th step
    step2 = next((tmp_path / "s").glob("*step=2*.ckpt"))
    resumed = cli(["fit"] + train_args(tiny_llama, tmp_path / "b", steps=4, **cosine) + ["--ckpt_path", str(step2)])
    assert resumed.trainer.global_step == 4
    _assert_same_params(resumed.model, straight.model)
    constant = cli(["fit"] + train_args(tiny_llama, tmp_path / "c", steps=4, **{"trainer.limit_val_batches": 0}))
    expected = _params(straight.model)
    assert any(not torch.equal(_params(constant.model)[k], expected[k]) for k in expected)


def test_resume_onto_another_base_model_is_refused(tmp_path, capsys):
    """Resuming reloads the base model named in the checkpoint; if different weights now stand behind that
    name (an updated folder or hub revision), the fingerprint refuses the resume."""
    from conftest import build_tiny_model

    folder = build_tiny_model("llama", tmp_path / "base", seed=0)
    cli(["fit"] + train_args(str(folder), tmp_path / "a", steps=1, **{"trainer.limit_val_batches": 0})
        + checkpoint_every_step(tmp_path / "a"))
    build_tiny_model("llama", folder, seed=7)  # same name, other weights
    with pytest.raises(SystemExit):
        main(["fit"] + train_args(str(folder), tmp_path / "b", steps=2, **{"trainer.limit_val_batches": 0})
             + ["--ckpt_path", str(tmp_path / "a" / "last.ckpt")])
    err = capsys.readouterr().err
    assert "error: This checkpoint was trained on base model" in err and "Traceback" not in err


def test_bad_data_path_is_one_sentence(tiny_llama, tmp_path, capsys):
    args = train_args(tiny_llama, tmp_path, steps=1)
    args[args.index("--data.train_path") + 1] = str(tmp_path / "missing.json")
    with pytest.raises(SystemExit):
        main(["fit"] + args)
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Data file") and "does not exist" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_recipe_parses_and_builds_with_the_model_shrunk(config, tiny_llama, tmp_path):
    run = cli(["--config", str(config), "--model.model", tiny_llama, "--model.edit_modules", "last:2",
               "--model.rank", "4", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
               "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"], run=False)
    assert run.model.hparams.model == tiny_llama
    assert run.datamodule.hparams.model == tiny_llama  # linked from model.model
    run.model.configure_model()
    assert run.model.editor.n_modules == 2
    # last.ckpt (what README's export command reads) must hold the final step, not the last multiple of
    # every_n_train_steps (two checkpoint callbacks with save_last would write last.ckpt and last-v1.ckpt)
    from lightning.pytorch.callbacks import ModelCheckpoint

    saving_last = [cb for cb in run.trainer.callbacks if isinstance(cb, ModelCheckpoint) and cb.save_last]
    steps = run.trainer.max_steps
    assert len(saving_last) <= 1, f"{config.name}: more than one checkpoint callback writes last.ckpt"
    if saving_last and steps > 0:
        every = saving_last[0]._every_n_train_steps
        assert every and steps % every == 0, f"{config.name}: last.ckpt would miss the final step {steps}"


def test_recipes_hold_only_what_makes_them_that_recipe():
    """Folders, logger, record and checkpoints come from the recipe's file name (horse_pl/recipes.py), so no recipe
    spells them out (a copied recipe cannot write into another's checkpoints, logs or record)."""
    import yaml

    for recipe in CONFIGS:
        config = yaml.safe_load(recipe.read_text())
        assert not {"default_root_dir", "logger", "callbacks"} & set(config.get("trainer", {})), recipe.name
        assert set(config.get("recipe", {})) <= {"save_every", "record"}, recipe.name


def test_a_recipe_run_is_named_after_its_file_and_its_saved_config_reruns_the_same(tiny_llama, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from horse_pl.records import ResultsRecorder

    shrink = ["--model.model", tiny_llama, "--model.edit_modules", "last:2", "--model.rank", "4"]
    recipe = CONFIGS[0].parent / "quickstart.yaml"
    run = cli(["--config", str(recipe)] + shrink, run=False)
    trainer = run.trainer
    assert trainer.default_root_dir == "checkpoints/quickstart"
    assert isinstance(trainer.logger, TensorBoardLogger) and trainer.logger.name == "quickstart"
    assert trainer.logger.save_dir == "lightning_logs"
    recorders = [cb for cb in trainer.callbacks if isinstance(cb, ResultsRecorder)]
    assert [(r.recipe, r.name) for r in recorders] == [("configs/quickstart.yaml", "quickstart")]
    checkpoints = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    assert sorted((c.dirpath.endswith("checkpoints/quickstart"), c.save_last, c.monitor) for c in checkpoints) == \
        [(True, False, "val/ES"), (True, True, None)]
    assert [c._every_n_train_steps for c in checkpoints if c.save_last] == [20]
    # the config Lightning saves holds the filled-in pieces; parsing it again adds none of them twice
    saved = tmp_path / "config.yaml"
    saved.write_text(run.parser.dump(run.config))
    again = cli(["--config", str(saved)] + shrink, run=False).trainer
    assert again.default_root_dir == "checkpoints/quickstart" and again.logger.name == "quickstart"
    assert sorted(type(cb).__name__ for cb in again.callbacks if isinstance(cb, (ResultsRecorder, ModelCheckpoint))) \
        == ["ModelCheckpoint", "ModelCheckpoint", "ResultsRecorder"]
    # the command line still decides: no logger, no checkpoints, no record, another folder, another name
    off = cli(["--config", str(recipe), "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
               "--recipe.record", "false", "--trainer.default_root_dir", str(tmp_path / "x")] + shrink, run=False)
    assert off.trainer.logger is None and off.trainer.default_root_dir == str(tmp_path / "x")
    assert not [cb for cb in off.trainer.callbacks if isinstance(cb, (ResultsRecorder, ModelCheckpoint))]
    named = cli(["--config", str(recipe), "--recipe.name", "mine"] + shrink, run=False).trainer
    assert named.default_root_dir == "checkpoints/mine" and named.logger.name == "mine"
    # a run without a recipe file stays a plain LightningCLI run
    plain = cli(shrink + ["--data.train_path", "x.json"], run=False).trainer
    assert not [cb for cb in plain.callbacks if isinstance(cb, ResultsRecorder)]


SMOLLM2_RECIPES = [c for c in CONFIGS if ("smollm2" in c.stem or c.stem == "quickstart") and "ddp" not in c.stem]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", SMOLLM2_RECIPES, ids=[c.stem for c in SMOLLM2_RECIPES])
def test_shipped_recipe_trains_through_its_own_file(recipe, tiny_llama, tmp_path, monkeypatch):
    """Each shipped SmolLM2 recipe, as written (its data files, stages, losses, callbacks), trains two steps and
    validates with only the sizes shrunk: a tiny model, 4 edits per step. It runs from a folder beside a link to
    ``../shared``, so the recipe's relative data paths are checked and its checkpoints and records land there."""
    work = tmp_path / "repo"
    work.mkdir()
    (tmp_path / "shared").symlink_to(Path(__file__).resolve().parents[2] / "shared")
    monkeypatch.chdir(work)
    run = cli(["fit", "--config", str(recipe), "--model.model", tiny_llama, "--model.edit_modules", "last:2",
               "--model.rank", "8", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
               "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
               "--trainer.enable_model_summary", "false", "--data.n_edits", "4", "--data.val_n_edits", "4",
               "--data.val_limit", "4", "--data.batch_size", "2", "--data.max_length", "1024"])
    assert run.trainer.global_step == 2
    metrics = run.trainer.callback_metrics
    assert {"val/ES", "val/unedited_ES", "val/LS_agree"} <= set(metrics)
    assert list(work.glob("checkpoints/*/best-*.ckpt")), "the recipe's own checkpoint callback wrote nothing"
    records = list(work.glob("checkpoints/*/*-fit-*.json"))  # the recipe's ResultsRecorder
    assert len(records) == 1 and json.loads(records[0].read_text())["recipe"] == f"configs/{recipe.name}"


def test_recipes_and_the_readme_table_use_the_method_presets():
    """The method -> stages mapping lives in horse_pl.methods: every shipped SmolLM2 recipe's stages are the preset
    its file name says (malmen_*, mend_*, horse_reference_*, horse_*) and the README's table shows the presets."""
    import re

    import yaml

    from horse_pl.methods import METHODS, SPREADS, UPDATES, class_path

    def class_of(stage) -> str:
        return (stage or {}).get("class_path", stage) if isinstance(stage, dict) else stage

    for recipe in SMOLLM2_RECIPES:
        model = yaml.safe_load(recipe.read_text())["model"]
        method = next(m for m in ("malmen", "mend", "horse_reference", "horse") if recipe.stem.startswith(m)) \
            if recipe.stem != "quickstart" else "horse"
        preset = METHODS[method]
        update = class_of(model.get("update")) or class_path(UPDATES["closed_form"])
        assert class_of(model.get("spread")) == class_path(SPREADS[preset.spread]), recipe.name
        assert update in (class_path(UPDATES[preset.update]), class_path(UPDATES["joint_closed_form"])), recipe.name
        # a recipe named *_subject_* keys its edits on the subject's last token (issue 22's lever for the neighbourhood)
        positions = "subject" if "_subject_" in recipe.stem else preset.positions
        assert model.get("positions", "answer") == positions, recipe.name
        assert model.get("learn_lambda", False) == preset.learn_lambda, recipe.name
        # a recipe named *_kl or *_kl_* measures MALMEN's KL locality with the HORSE stages (issue 22's lever)
        named_kl = re.search(r"_kl(_|$)", recipe.stem) is not None
        assert model.get("locality", "ce") == ("kl" if named_kl else preset.locality), recipe.name
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = {"HORSE (default)": "horse", "HORSE, released code's spread": "horse_reference", "MALMEN": "malmen",
            "MEND": "mend"}
    for label, method in rows.items():
        m = METHODS[method]
        row = re.search(rf"^\| {re.escape(label)} \|(.*)\|$", readme, re.M).group(1)
        cells = [c.strip(" `") for c in row.split("|")]
        assert cells == [SPREADS[m.spread].__name__, UPDATES[m.update].__name__,
                         m.positions, str(m.learn_lambda).lower(), m.locality], label
