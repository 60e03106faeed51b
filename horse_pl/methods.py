"""The methods as stage presets, defined once: which spread, update stage, capture positions, lambda learning and
locality loss make HORSE, HORSE with the released code's spread, MALMEN and MEND.

Recipes spell their stages out in YAML (``model.spread``, ``model.update``, ...); :func:`cli_args` gives the same
settings as ``train.py`` arguments, :func:`method_of` names the method a combination implements (written into an
exported editor's ``config.json``), and the tests check that every shipped recipe and the README's table agree
with these presets.
"""

from __future__ import annotations

from dataclasses import dataclass

from horse_pl.editing.spread import GramSchmidtSpread, NoSpread, ReferenceSpread, Spread
from horse_pl.editing.update import ClosedFormUpdate, JointClosedFormUpdate, OuterProductUpdate, ParamShiftUpdate

# stage name -> class: what an exported editor's config.json names, and what the presets below refer to
SPREADS: dict[str, type[Spread]] = {c.name: c for c in (GramSchmidtSpread, ReferenceSpread, NoSpread)}
UPDATES: dict[str, type[ParamShiftUpdate]] = {c.name: c for c in (ClosedFormUpdate, JointClosedFormUpdate,
                                                                   OuterProductUpdate)}


@dataclass(frozen=True)
class Method:
    """One method's stages (names of :data:`SPREADS` / :data:`UPDATES`) and loss settings."""

    spread: str
    update: str
    positions: str
    learn_lambda: bool
    locality: str


METHODS: dict[str, Method] = {
    "horse": Method("gram_schmidt", "closed_form", "answer", False, "ce"),
    "horse_reference": Method("reference", "closed_form", "answer", False, "ce"),
    "malmen": Method("none", "closed_form", "answer", True, "kl"),
    "mend": Method("none", "outer_product", "all", False, "kl"),
}


def class_path(cls: type) -> str:
    """The ``class_path`` a recipe names a stage class by."""
    return f"{cls.__module__}.{cls.__qualname__}"


def cli_args(method: str) -> list[str]:
    """``train.py fit`` arguments that select ``method``'s stages and losses."""
    if method not in METHODS:
        raise ValueError(f"Unknown method '{method}'; choose from {list(METHODS)}.")
    m = METHODS[method]
    return ["--model.spread", class_path(SPREADS[m.spread]), "--model.update", class_path(UPDATES[m.update]),
            "--model.positions", m.positions, "--model.learn_lambda", str(m.learn_lambda).lower(),
            "--model.locality", m.locality]


def method_of(spread: str, update: str, learn_lambda: bool) -> str:
    """The method a stage combination implements (for people reading ``config.json``); a joint solve counts as its
    per-module stage, and a combination no preset has gets a descriptive name."""
    base_update = "closed_form" if update == "joint_closed_form" else update
    for name, m in METHODS.items():
        if (m.spread, m.update, m.learn_lambda) == (spread, base_update, learn_lambda):
            return name
    if base_update == "outer_product":
        return "mend"
    if spread == "none":
        return "closed_form_no_spread"
    return f"horse_{spread}"
