"""The method registry: every way fewstep makes a few-step model, by name (DESIGN.md §6, "the house").

A :class:`Method` is a name, a settings dataclass (recorded in the model folder), the CLI option groups whose
flags fill those settings, what teacher it starts from (and the check that refuses any other before data is
loaded), and its recipe. ``fewstep distill`` and ``fewstep train`` build their ``--method`` choices, their help
and their dispatch from :data:`METHODS`; nothing above this module switches on a method's name.

Adding a method is its objective (:mod:`fewstep.objectives`), its recipe and one :func:`register` call in its
module, imported by :mod:`fewstep.methods` (its ``__init__``); flags of its own are one more option group in
``fewstep/cli/distill.py``::

    register(Method("tcd", "trajectory consistency distillation (Zheng et al. 2024)", TCDSettings, distill_tcd,
                    teacher="models/emoji-sd", check=check_teacher, options=("consistency", "latent", "tcd")))
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

Recipe = Callable[..., "Path | None"]   # (teacher | None, data, out, TrainConfig, settings, command) -> folder


@dataclass(frozen=True)
class Method:
    """One registered method (module docstring)."""

    name: str
    summary: str                               # what it makes, after which paper (the CLI's help)
    settings: type                             # its settings dataclass
    recipe: Recipe                             # (teacher, data, out, config, settings, command) -> the saved folder
    teacher: str | None = None                 # an example --teacher it takes; None: it trains from data alone
    check: Callable[[Any, str], Any] | None = None   # (teacher, method name) -> teacher, or a FewstepError
    options: tuple[str, ...] = ()              # the CLI option groups it reads
    flags: Mapping[str, str] = field(default_factory=dict)  # settings field -> CLI option name where they differ
    family: str = ""                           # the --help heading it is listed under
    frozen_teacher_dtype: bool = False         # holds a frozen teacher UNet that --teacher-dtype may shrink
    note: Callable[[Path], str] | None = None  # a line to print after saving (e.g. where a LoRA file is)
    optimizer: str = "adamw"                   # its --optimizer when none is given (its reference code's)
    betas: tuple[float, float] | None = None   # its optimizer's β where its reference sets them (else TrainConfig's)

    @property
    def needs_teacher(self) -> bool:
        return self.teacher is not None

    def make_settings(self, values: Mapping[str, Any]) -> Any:
        """Its settings from option values (argparse's namespace as a dict): every field whose option was given
        (not None), the dataclass default otherwise, ``method`` set to this method's name where the settings
        record it."""
        kwargs = {}
        for f in fields(self.settings):
            value = self.name if f.name == "method" else values.get(self.flags.get(f.name, f.name))
            if value is not None:
                kwargs[f.name] = value
        return self.settings(**kwargs)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def teacher_free() -> list[str]:
    """The methods that train from data alone (``fewstep train``)."""
    return [name for name, m in METHODS.items() if not m.needs_teacher]
