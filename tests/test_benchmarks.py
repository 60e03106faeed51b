"""The benchmark scripts run end to end on a tiny model and write consistent JSON and PNG files."""

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import small_zsre

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fit_slope_recovers_exponents():
    speed = _load("edit_speed")
    assert speed.fit_slope([16, 64, 256], [2 * n for n in [16, 64, 256]], log=True) == pytest.approx(1.0)
    assert speed.fit_slope([16, 64, 256], [n ** 2 for n in [16, 64, 256]], log=True) == pytest.approx(2.0)
    assert speed.fit_slope([1, 2, 3], [5, 7, 9], log=False) == pytest.approx(2.0)


@pytest.mark.parametrize("name, argv, option", [
    ("lifelong", ["--recipe", "r.yaml", "--out", "o", "--max-requests", "0"], "--max-requests"),
    ("train_step", ["--steps", "0"], "--steps"),
    ("train_step", ["--warmup", "-1"], "--warmup"),
    ("edit_quality", ["--n", "0"], "--n"),
    ("edit_quality", ["--dev-size", "0"], "--dev-size"),
    ("edit_quality", ["--batch-size", "0"], "--batch-size"),
    ("edit_speed", ["--repeats", "0"], "--repeats"),
    ("edit_speed", ["--chunk-size", "0"], "--chunk-size"),
    ("key_geometry", ["--texts", "0"], "--texts"),
    ("side_by_side", ["--released", ".", "--rounds", "0"], "--rounds"),
    ("edit_wall", ["--editor", ".", "--requests", ".", "--n", "0"], "--n"),
])
def test_benchmark_counts_below_one_end_with_argparse_s_line_naming_the_option(name, argv, option, capsys):
    with pytest.raises(SystemExit):
        _load(name).main(argv)
    assert f"argument {option}: must be a whole number of at least 1, not {argv[-1]}" in capsys.readouterr().err


def test_edit_speed_splits_the_edit_time_and_measures_the_floor(tiny_llama, tmp_path):
    speed = _load("edit_speed")
    out = tmp_path / "speed.json"
    assert speed.main(["--n", "4", "8", "--repeats", "1", "--model", tiny_llama, "--edit-modules", "layers:2-3",
                       "--rank", "16", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["n_edits"] for r in report["results"]] == [4, 8]
    for row in report["results"]:
        parts = row["edit"]
        stages = ("capture", "predict", "spread", "solve", "merge")
        assert parts["total"] == pytest.approx(sum(parts[k] for k in stages))
        assert row["floor"] > 0 and row["ratio"] == pytest.approx(parts["total"] / row["floor"])
        assert row["edit_peak_memory_mb"] > 0 and row["answer_tokens"] > 0
    assert "time_growth_exponent" in report and out.with_suffix(".png").stat().st_size > 1000
    assert report["commit"] and report["kind"] == "edit_speed"  # the record names the code it measured
    # interleaved: one process per N times both in turn; the split and the ratio as before, no peak memory
    assert speed.main(["--n", "4", "--repeats", "2", "--model", tiny_llama, "--edit-modules", "layers:2-3",
                       "--rank", "16", "--interleave", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["results"][0]
    assert row["ratio"] == pytest.approx(row["edit"]["total"] / row["floor"]) and row["floor"] > 0
    assert row["edit"]["capture"] > 0 and row["edit_peak_memory_mb"] is None


def test_edit_quality_scores_each_editor_against_n(editor_dir, tmp_path, capsys):
    quality = _load("edit_quality")
    out = tmp_path / "quality.json"
    folder = str(editor_dir / "editor")
    assert quality.main(["--dataset", "zsre", "--editors", f"a={folder}", f"b={folder}",
                         f"r={folder},refine=2,refine_general=1", "--refine-general-n", "4", "--n", "4", "8",
                         "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["unedited"]) == {"4", "8"} and set(report["editors"]) == {"a", "b", "r"}
    assert report["editors"]["r"]["refinement"]["general"] == 1.0 and report["editors"]["r"]["4"]["ES"] >= 0
    # the same editor twice gives the same scores: nothing leaks from one editor's run into the next
    for n in ("4", "8"):
        a, b = ({k: v for k, v in report["editors"][e][n].items() if k in quality.SCORES} for e in "ab")
        assert a == b and a
        assert {"ES", "GS", "LS", "LS_agree", "EM_edit"} <= set(report["editors"]["a"][n])
    assert out.with_suffix(".png").exists()
    with pytest.raises(SystemExit, match="NAME=FOLDER"):
        quality.main(["--editors", folder, "--out", str(out)])
    with pytest.raises(SystemExit, match="unknown editor option"):
        quality.main(["--editors", f"a={folder},mu=3", "--out", str(out)])
    with pytest.raises(SystemExit):
        quality.main(["--editors", f"a={folder}", "--refine-general-n", "0", "--out", str(out)])
    assert "argument --refine-general-n: must be a whole number of at least 1, not 0" in capsys.readouterr().err
    assert quality.parse_editor(f"s={folder},scale=2") == ("s", editor_dir / "editor", {"scale": 2.0})
    assert quality.parse_editor(f"p={folder},refine=2,refine_prefixes=3")[2] == {"refine": 2, "refine_prefixes": 3}
    assert quality.parse_editor(f"g={folder},refine=2,refine_general=0.5")[2] == {"refine": 2, "refine_general": 0.5}
    assert quality.parse_editor(f"q={folder},refine=2,refine_paraphrases=2")[2] == {"refine": 2,
                                                                                   "refine_paraphrases": 2}
    assert quality.parse_editor(f"u={folder},refine=2,refine_budget=1e-4")[2] == {"refine": 2, "refine_budget": 1e-4}


def test_edit_quality_on_the_dev_split_with_a_preserving_solve_and_retention(editor_dir, tmp_path):
    quality = _load("edit_quality")
    out = tmp_path / "scale.json"
    folder = str(editor_dir / "editor")
    assert quality.main(["--dataset", "zsre", "--split", "dev", "--dev-size", "20", "--editors", f"plain={folder}",
                         f"kept={folder},preserve=1e6", f"para={folder},refine=1,refine_paraphrases=2",
                         "--refine-paraphrase-n", "300", "--n", "4", "8", "--general", "--general-limit", "8",
                         "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["split"] == "dev" and "development split" in report["data"]
    assert report["editors"]["kept"]["update_args"]["preserve"] == 1e6
    for n in ("4", "8"):
        plain, kept = report["editors"]["plain"][n], report["editors"]["kept"][n]
        assert plain["edit_seconds"] > 0 and plain["peak_memory_mb"] > 0
        assert 0 < plain["retention"]["perplexity"] <= 2 and "open_domain_qa" in plain["general"]
        # a huge preservation weight keeps the model where it was: perplexity and unrelated answers unchanged
        assert abs(kept["retention"]["perplexity"] - 1) < abs(plain["retention"]["perplexity"] - 1) + 1e-6
        assert kept["LS_agree"] >= plain["LS_agree"]
        # the share by which each edit moved the edit modules' outputs on unrelated text, less under the large charge
        assert 0 <= kept["output_change"] < plain["output_change"]
        # the rephrased refinement says how many requests its bank (the editor's 300 training records) rephrased,
        # and GS apart where a request's own rephrase prompt was among the bank's rephrasings
        bank = report["editors"]["para"][n]["paraphrase_bank"]
        assert 0 < bank["rephrased"] <= 1 and 0 <= bank["own_rephrase_in_bank"] <= bank["rephrased"]
        assert "GS_other" in bank
    # a bank that reaches into the development split would hold its requests' own rephrasings
    with pytest.raises(SystemExit, match="reaches into the development split"):
        quality.main(["--dataset", "zsre", "--split", "dev", "--dev-size", "20", "--editors",
                      f"para={folder},refine=1,refine_paraphrases=2", "--refine-paraphrase-n", "9999", "--n", "4",
                      "--out", str(out)])


def test_edit_quality_traces_a_refined_edit(editor_dir, tmp_path, capsys):
    """``--trace-every K``: the row's trace holds step 0, every K-th step and the last, each with the perplexity
    retention and the output change on the C0 texts and on held-out texts; the last entry is the edit the row scores."""
    quality = _load("edit_quality")
    out = tmp_path / "trace.json"
    folder = str(editor_dir / "editor")
    assert quality.main(["--dataset", "zsre", "--split", "dev", "--dev-size", "20", "--editors",
                         f"held={folder},refine=3,refine_lr=0.5,refine_budget=1e-3", "--trace-every", "2", "--n", "4",
                         "--general", "--general-limit", "8", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["editors"]["held"]["4"]
    trace = row["trace"]
    assert [entry["step"] for entry in trace] == [0, 2, 3]
    assert trace[-1]["output_change"] == pytest.approx(row["output_change"], rel=1e-4)
    assert trace[-1]["perplexity_retention"] == pytest.approx(row["retention"]["perplexity"], rel=1e-4)
    for entry in trace:
        assert entry["output_change"] <= 1e-3 * (1 + 1e-4) and entry["output_change_heldout"] > 0
        assert 0 < entry["perplexity_retention"] <= 2 and entry["seconds"] > 0
    assert row["edit_seconds"] > 0
    with pytest.raises(SystemExit):
        quality.main(["--trace-every", "-1"])
    assert "argument --trace-every: must be a whole number of at least 0, not -1" in capsys.readouterr().err


def test_train_step_times_the_recipe_and_counts_its_work(tiny_llama, tmp_path, capsys):
    step = _load("train_step")
    out = tmp_path / "step.json"
    assert step.main(["--steps", "2", "--warmup", "1", "--out", str(out), "--", "--model.model", tiny_llama,
                      "--model.edit_modules", "layers:2-3", "--model.rank", "16", "--data.n_edits", "4",
                      "--data.batch_size", "2", "--data.train_path", small_zsre()[0],
                      "--data.max_length", "1024"]) == 0
    report = json.loads(out.read_text())
    assert report["timed_steps"] == 2 and len(report["steps"]) == 2
    assert report["kind"] == "train_step" and report["commit"]  # the record names the run that wrote it
    assert report["command"].startswith("python benchmarks/train_step.py --steps 2")
    assert report["command"].endswith("--data.max_length 1024")  # the recipe overrides after -- included
    split = report["seconds"]
    for timed in report["steps"]:
        assert timed > 0
    from horse_pl.timing import TRAIN_STAGES

    assert set(split) == set(TRAIN_STAGES) | {"step"}
    parts = sum(split[s]["mean"] for s in TRAIN_STAGES)
    assert split["step"]["mean"] == pytest.approx(parts, rel=1e-6)
    assert report["gflop_per_step"] > 0 and report["matmul_gflops_before"] > 0
    assert report["step_at_matmul_rate"] == pytest.approx(
        report["gflop_per_step"] / ((report["matmul_gflops_before"] + report["matmul_gflops_after"]) / 2))
    assert "GFLOP" in capsys.readouterr().out


def test_edit_wall_reads_each_edit_py_run_s_own_timing_line(editor_dir, tmp_path, capsys):
    wall = _load("edit_wall")
    out = tmp_path / "wall.json"
    assert wall.main(["--editor", str(editor_dir / "editor"), "--requests", small_zsre()[1], "--n", "3",
                      "--score", "none", "edit", "--out", str(out), "--", "--delta"]) == 0
    report = json.loads(out.read_text())
    assert report["kind"] == "edit_wall" and report["commit"] and report["edit_py_options"] == ["--delta"]
    assert [(r["n_edits"], r["score"]) for r in report["results"]] == [(3, "none"), (3, "edit")]
    for row in report["results"]:
        assert row["edit_stages"] == pytest.approx(sum(row["seconds"].get(k, 0) for k in wall.EDIT_STAGES))
        assert row["wall"] >= row["edit_stages"] > 0 and row["ratio"] == pytest.approx(row["wall"] / row["edit_stages"])
    none, edit = (r["seconds"]["score_after"] for r in report["results"])
    assert edit > 10 * none  # --score none scores nothing
    seconds, total = wall.timing_line("x\ntimings (s): load 0.5, capture 2.0, save 1.0; wall 3.6 from reading it\n")
    assert seconds == {"load": 0.5, "capture": 2.0, "save": 1.0} and total == 3.6
    with pytest.raises(SystemExit):
        wall.main(["--editor", str(tmp_path / "none"), "--requests", small_zsre()[1]])
    assert "--editor '" in capsys.readouterr().err


FAKE_RELEASED = """
import sys, time
from tqdm import tqdm
assert sys.argv[1:] == ["data=zsre", "editor.n_edits=4"], sys.argv
for _ in tqdm(range(3), desc="Valid", ncols=100):
    time.sleep(0.01)
for _ in tqdm(range(10 ** 6), desc="Train", ncols=100):  # never ends by itself: the benchmark stops it
    time.sleep(0.2)
"""


def test_side_by_side_times_the_released_loop_by_its_bar_and_ours_by_train_step(tiny_llama, tmp_path):
    side = _load("side_by_side")
    checkout = tmp_path / "released"
    checkout.mkdir()
    (checkout / "main.py").write_text(FAKE_RELEASED)
    out = tmp_path / "side.json"
    assert side.main(["--released", str(checkout), "--released-args", "data=zsre editor.n_edits=4", "--steps", "2",
                      "--warmup", "1", "--rounds", "2", "--timeout", "120", "--out", str(out), "--",
                      "--model.model", tiny_llama, "--model.edit_modules", "layers:2-3", "--model.rank", "16",
                      "--data.n_edits", "4", "--data.batch_size", "2", "--data.train_path", small_zsre()[0],
                      "--data.max_length", "1024"]) == 0
    report = json.loads(out.read_text())
    assert report["kind"] == "side_by_side" and report["released"]["commit"] is None  # not a git checkout
    assert len(report["rounds"]) == 2
    for row in report["rounds"]:
        assert len(row["released_steps"]) == 2 and len(row["our_steps"]) == 2
        assert all(0.15 < s < 5 for s in row["released_steps"])  # the fake's 0.2 s steps, the Valid bar ignored
        assert row["ratio"] == pytest.approx(row["our_median"] / row["released_median"])
    assert report["ratio"] == pytest.approx(report["our_median"] / report["released_median"])
    assert report["recipe_overrides"][:2] == ["--model.model", tiny_llama]


def test_side_by_side_names_a_checkout_without_main_and_a_released_run_that_fails(tmp_path, capsys):
    side = _load("side_by_side")
    with pytest.raises(SystemExit):
        side.main(["--released", str(tmp_path)])
    assert f"--released '{tmp_path}' has no main.py" in capsys.readouterr().err
    (tmp_path / "main.py").write_text("import sys; print('no such config'); sys.exit(3)")
    with pytest.raises(SystemExit, match="(?s)exited with code 3 after 0 of 2 steps.*no such config"):
        side.released_steps(tmp_path, "main.py", [], "Train", 2, timeout=60)
    assert side.step_seconds({0: 0.0, 1: 2.0, 4: 8.0, 6: 9.0}, 5) == [2.0, 2.0, 2.0, 2.0, 0.5]  # 2, 3 and 5 skipped
    assert side.progress_counts("Train:  10%|#  | 1/10 [00:01<00:09, 1.0s/it]\rTrain:  20%|## | 2/10 [00:02<00:08]",
                                "Train") == [1, 2]


def test_gpu_check_runs_on_cpu_at_reduced_size(tmp_path):
    """benchmarks/gpu_check.sh, the prepared GPU run (LLaMA-2-7B's configuration, random bf16 weights), at a size a
    CPU runs in seconds: same script, same random-model path, same report."""
    import os
    import subprocess

    env = {**os.environ, "MODEL": "random:llama2-7b,num_hidden_layers=2,hidden_size=64,intermediate_size=96,"
                                  "num_attention_heads=4,num_key_value_heads=4",
           "DEVICE": "cpu", "DTYPE": "bfloat16", "EDIT_MODULES": "layers:0-1", "N": "4", "RANK": "16",
           "TRAIN_EDITS": "8", "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "s/100 edits" in proc.stdout and "DDP step is skipped" in proc.stdout
    report = json.loads((tmp_path / "edit_speed.json").read_text())
    row = report["results"][0]
    assert row["n_edits"] == 4 and row["ratio"] > 0 and report["model"].startswith("random:llama2-7b")
    step = json.loads((tmp_path / "train_step.json").read_text())  # the 7B recipe's own training loop
    assert step["timed_steps"] == 2 and step["gflop_per_step"] > 0 and step["dtype"] == "torch.bfloat16"


def test_random_model_has_the_published_shapes():
    from horse_pl.edit_modules import resolve_edit_modules, weight_shape
    from horse_pl.models import RANDOM_CONFIGS, load_model

    model, tok = load_model("random:llama2-7b,num_hidden_layers=2,hidden_size=64,intermediate_size=96,"
                            "num_attention_heads=4,num_key_value_heads=4")
    names = resolve_edit_modules(model, "last:2")
    assert weight_shape(model.get_submodule(names[0])) == (96, 64) and model.config.vocab_size == len(tok)
    assert RANDOM_CONFIGS["llama2-7b"]["intermediate_size"] == 11008  # LLaMA-2-7B's MLP
    with pytest.raises(ValueError, match="Unknown random model"):
        load_model("random:gpt-9")


def test_key_geometry_compares_the_positions_it_names(tiny_llama, tmp_path):
    """On records whose paraphrase and neighbourhood prompt are the edit prompt itself (with the same answer), every
    pair it measures is a key against itself: whitened cosine 1; on real records they are below 1."""
    import gzip

    geometry = _load("key_geometry")
    records = json.load(gzip.open(ROOT.parent / "shared" / "data" / "counterfact" / "counterfact_train_10k.json.gz"))
    mirrored = [dict(r, rephrase_prompt=r["prompt"], locality_prompt=r["prompt"], locality_ground_truth=r["target_new"])
                for r in records[:6]]
    (tmp_path / "mirror.json").write_text(json.dumps(mirrored))
    (tmp_path / "real.json").write_text(json.dumps(records[:6]))
    for name in ("mirror", "real"):
        assert geometry.main(["--split", "eval", "--data", str(tmp_path / f"{name}.json"), "--n", "6", "--layers",
                              "1", "2", "--texts", "16", "--model", tiny_llama,
                              "--out", str(tmp_path / f"{name}_out.json")]) == 0
    mirror = json.loads((tmp_path / "mirror_out.json").read_text())
    real = json.loads((tmp_path / "real_out.json").read_text())
    assert mirror["kind"] == "key_geometry" and mirror["counts"]["subject_rephrase"] == 6
    for layer in ("1", "2"):
        for pair, value in mirror["layers"][layer].items():
            assert value == pytest.approx(1.0, abs=1e-6), (layer, pair)
        assert real["layers"][layer]["answer_rephrase"] < 0.999
    assert (tmp_path / "real_out.png").stat().st_size > 1000


def test_lifelong_benchmark_runs_every_shape_and_reads_finished_ones(tiny_llama, tmp_path, monkeypatch, capsys):
    from conftest import CF_EVAL

    lifelong = _load("lifelong")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"sequential: true\nmethods: [mose, ft]\nmodel: {tiny_llama}\nrequests: {CF_EVAL}\n"
                      "edit_modules: layers:2-3\nsteps: 2\nlr: 1.0e-2\ngeneral_tasks: [sst2]\ngeneral_limit: 6\n"
                      "method_settings:\n  mose: {edit_modules: 'layers:3'}\n")
    out = tmp_path / "bench"
    argv = ["--recipe", str(recipe), "--shapes", "3x1", "2x2", "--max-requests", "3", "--out", str(out)]
    assert lifelong.main(argv) == 0
    report = json.loads((out / "lifelong_benchmark.json").read_text())
    assert report["kind"] == "lifelong_benchmark"
    # 2 x 2 capped at 3 requests: one turn of 2, named as run and as planned
    assert list(report["shapes"]) == ["3x1", "1x2"] and report["shapes"]["1x2"]["planned"] == "2x2"
    for name, turns in (("3x1", 3), ("1x2", 1)):
        shape = report["shapes"][name]
        run = json.loads((out / name / "record.json").read_text())
        assert shape["turns"] == turns and set(shape["methods"]) == {"mose", "ft"}
        for method, res in shape["methods"].items():
            assert res["after_post"] == run["methods"][method]["after_post"]
            assert res["curve"][-1]["n_edits"] == shape["n_requests"] and res["condition_number_ratio"] > 0
            assert "perplexity" in res["retention"] and res["seconds_per_edit"] > 0
            assert res["method_seconds"] > res["sequence_seconds"] > 0
        # the shape's whole run: the unedited scores and every method
        assert shape["seconds"] > sum(res["method_seconds"] for res in shape["methods"].values())
    assert report["shapes"]["3x1"]["methods"]["mose"]["curve"][0]["n_edits"] == 1  # about four points along the way
    assert (out / "lifelong_benchmark.png").stat().st_size > 1000
    # the results document shows every shape and method from the record
    spec = importlib.util.spec_from_file_location("make_results", ROOT / "scripts" / "make_results.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    text = make.results_md({"bench": report})
    assert "### Lifelong benchmark: `bench`" in text and "| 1x2 (planned 2x2), 0 min | mose |" in text
    assert f"{report['shapes']['3x1']['methods']['ft']['after_post']['efficacy']:.3f}" in text
    # finished shapes are read, not run again; a folder without a finished run is refused
    monkeypatch.setattr(lifelong, "run_shape", lambda *a: pytest.fail("a finished shape ran again"))
    assert lifelong.main(argv) == 0 and "3x1: reading the finished run" in capsys.readouterr().out
    (out / "5x1").mkdir()
    with pytest.raises(SystemExit, match="holds no finished run"):
        lifelong.main(["--recipe", str(recipe), "--shapes", "5x1", "--out", str(out)])
    with pytest.raises(SystemExit, match="TURNSxREQUESTS_PER_TURN"):
        lifelong.main(["--recipe", str(recipe), "--shapes", "10by1", "--out", str(out)])
