"""Shared fixtures: tiny randomly initialised LLaMA / GPT-2 / Gemma 3 models with a tiny byte-level BPE
tokenizer, saved as folders so they load through the same path as any Hugging Face model."""

from __future__ import annotations

import functools
import gzip
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

from horse_pl.methods import cli_args

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ZSRE_TRAIN = SHARED / "zsre" / "zsre_train_10k.json.gz"
ZSRE_EVAL = SHARED / "zsre" / "zsre_eval_1k.json.gz"
CF_TRAIN = SHARED / "counterfact" / "counterfact_train_10k.json.gz"
CF_EVAL = SHARED / "counterfact" / "counterfact_eval_10k.json.gz"
CF_ROME = SHARED / "counterfact" / "counterfact_rome_format_sample.json.gz"
KNOWEDIT = SHARED / "knowedit"


@functools.cache
def small_zsre() -> tuple[str, str]:
    """The first 300 training (2 with an empty target) and 40 evaluation zsRE records, written to a
    temporary folder once per session, for tests that train on tiny models."""
    folder = Path(tempfile.mkdtemp(prefix="horse_pl-zsre-"))
    train, evaluation = folder / "train.json", folder / "eval.json"
    train.write_text(json.dumps(json.load(gzip.open(ZSRE_TRAIN))[:300]))
    evaluation.write_text(json.dumps(json.load(gzip.open(ZSRE_EVAL))[:40]))
    return str(train), str(evaluation)


def _corpus() -> list[str]:
    records = json.load(gzip.open(ZSRE_TRAIN))[:400]
    return [f"{r['src']} {r['alt']} {r['rephrase']} {r['loc']} {r['loc_ans']}" for r in records]


def build_tokenizer(folder: Path):
    """A byte-level BPE tokenizer (GPT-2 style) trained on a few hundred zsRE lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


FAMILIES = ("llama", "gpt2", "gemma3", "qwen2", "qwen3", "mistral", "phi3", "gptj", "gpt_neox", "olmo2")


def _tiny_config(kind: str, vocab: int):
    import transformers as tf

    shape = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256)
    decoder = dict(shape, pad_token_id=0, bos_token_id=0, eos_token_id=0)  # the families whose defaults exceed vocab
    if kind == "llama":
        return tf.LlamaConfig(**{**shape, "num_hidden_layers": 4}, tie_word_embeddings=True)
    if kind == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=3, n_head=4, n_positions=256)
    if kind == "gemma3":
        return tf.Gemma3TextConfig(**shape, head_dim=8, sliding_window=16)
    if kind == "qwen2":
        return tf.Qwen2Config(**decoder, tie_word_embeddings=True)
    if kind == "qwen3":
        return tf.Qwen3Config(**decoder, head_dim=8)
    if kind == "mistral":
        return tf.MistralConfig(**decoder, sliding_window=None)
    if kind == "phi3":
        return tf.Phi3Config(**decoder)
    if kind == "olmo2":
        return tf.Olmo2Config(**decoder)
    if kind == "gptj":
        return tf.GPTJConfig(vocab_size=vocab, n_embd=32, n_layer=3, n_head=4, n_positions=256, rotary_dim=4,
                             bos_token_id=0, eos_token_id=0)
    if kind == "gpt_neox":
        return tf.GPTNeoXConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                num_attention_heads=4, max_position_embeddings=256, bos_token_id=0, eos_token_id=0)
    raise ValueError(kind)


def build_tiny_model(kind: str, folder: Path, seed: int = 0) -> Path:
    """Save a tiny random model of an architecture family (one of :data:`FAMILIES`) with the BPE tokenizer."""
    from transformers import AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(folder)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_tiny_config(kind, len(tok)))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return {kind: str(build_tiny_model(kind, root / kind)) for kind in FAMILIES}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> str:
    return tiny_models["llama"]


def perturbed_editor(shapes, update, moments, learn_lambda: bool = False):
    """A float64 toy editor whose parameters are moved off their initial values (so every block has a gradient),
    with the key moments its update stage needs."""
    from horse_pl.editing.editor import Editor
    from horse_pl.editing.spread import GramSchmidtSpread

    torch.manual_seed(0)
    editor = Editor(shapes, rank=5, n_blocks=2, lr=0.1, spread=GramSchmidtSpread(), update=update,
                    learn_lambda=learn_lambda, chunk_size=4).double()
    for p in editor.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    editor.bind_key_moments(moments)
    return editor


def autograd_module_io(model, modules, micro_batch) -> tuple[list, list]:
    """Each module's input and ``d loss / d output`` by plain autograd through the model's own forward (loss: the mean
    cross-entropy over the answer tokens): the reference the capture pass is checked against."""
    inputs, outputs, hooks = {}, {}, []
    for i, m in enumerate(modules):
        def hook(module, args, out, i=i):
            inputs[i] = args[0]
            out.retain_grad()
            outputs[i] = out
        hooks.append(m.register_forward_hook(hook))
    model.requires_grad_(True)
    try:
        answer = micro_batch["labels"] != -100
        logits = model(input_ids=micro_batch["input_ids"], attention_mask=micro_batch["attention_mask"]).logits
        torch.nn.functional.cross_entropy(logits[answer], micro_batch["labels"][answer]).backward()
    finally:
        model.requires_grad_(False)
        for h in hooks:
            h.remove()
    return [inputs[i].detach() for i in range(len(modules))], [outputs[i].grad for i in range(len(modules))]


def cubic_meta_loss(targets):
    """A meta-loss on the shifts with a non-linear part, for gradient checks."""
    return lambda shifts: sum(((s - t) ** 2).sum() + s.sum() ** 3 for s, t in zip(shifts, targets))


def pipeline_grads(editor, cap, meta_loss) -> dict:
    """Hypernetwork gradients of ``meta_loss(shifts)`` through the editor's own path: shifts without graph,
    ``G_W`` from the loss, the chunked backward (compared against autograd through the solve by the tests)."""
    state = editor.param_shifts(cap, requires_grad=True)
    state.param_shifts = [s.double().detach().requires_grad_(True) for s in state.param_shifts]
    meta_loss(state.param_shifts).backward()
    editor.backward(cap, state, [s.grad for s in state.param_shifts])
    return {name: p.grad for name, p in editor.named_parameters() if p.grad is not None}


def train_args(model: str, root: Path, steps: int, method: str = "horse", **extra) -> list[str]:
    """train.py arguments for a few steps on a tiny model and 300 zsRE records (``method``: a preset)."""
    args = [
        "--seed_everything", "0",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.max_steps", str(steps), "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "2",
        "--trainer.val_check_interval", str(steps), "--trainer.check_val_every_n_epoch", "null",
        "--trainer.default_root_dir", str(root),
        "--model.model", model, "--model.edit_modules", "last:2", "--model.rank", "8", "--model.lr", "1e-3",
        "--model.meta_lr", "1e-3",
        "--data.train_path", small_zsre()[0], "--data.val_path", small_zsre()[1], "--data.dataset", "zsre",
        "--data.n_edits", "8", "--data.batch_size", "4", "--data.val_limit", "16", "--data.max_length", "1024",
    ]
    args += cli_args(method)  # the presets of horse_pl.methods
    for key, value in extra.items():
        args += [f"--{key}", str(value)]
    return args


def checkpoint_every_step(folder: Path) -> list[str]:
    return ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.dirpath", str(folder), "--trainer.callbacks.save_last", "true",
            "--trainer.callbacks.every_n_train_steps", "1", "--trainer.callbacks.save_top_k", "-1"]


@pytest.fixture(scope="session")
def editor_dir(tiny_llama, tmp_path_factory) -> Path:
    """A tiny HORSE editor trained for 3 steps and exported once per session: ROOT/editor (exported folder),
    ROOT/ckpt/last.ckpt (its checkpoint)."""
    from horse_pl.cli import cli
    from horse_pl.export import main as export_main

    root = tmp_path_factory.mktemp("editor")
    # the spread given explicitly, as a recipe does: the checkpoint then stores it as a class_path dict
    explicit = {"trainer.limit_val_batches": 0, "model.spread": "horse_pl.editing.spread.GramSchmidtSpread"}
    cli(["fit"] + train_args(tiny_llama, root / "run", steps=3, **explicit) + checkpoint_every_step(root / "ckpt"))
    assert export_main(["--ckpt_path", str(root / "ckpt" / "last.ckpt"), "--out", str(root / "editor")]) == 0
    return root
