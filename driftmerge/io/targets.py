"""Where PEFT carries each checkpoint tensor's drift: the :class:`Target` of a tensor and the model's
:class:`Architecture` (what :mod:`driftmerge.io.architecture` works out)."""

from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("linear", "embedding", "conv1d", "param", "experts")


@dataclass(frozen=True)
class Target:
    """Where PEFT carries one checkpoint tensor's drift.

    ``path`` is the PEFT target: a module path (``linear``/``embedding``/``conv1d``) or a parameter path
    (``param``/``experts``). For ``experts``: ``experts`` = E and ``dims`` = ``(out, in)`` of one expert's matrix as
    PEFT multiplies it (``ΔW_e = B_e A_e``); ``expert`` is the expert this tensor holds and ``rows`` the rows of
    ``ΔW_e`` it fills (a per-expert checkpoint key), or both None when the tensor is the whole stack;
    ``transposed`` means the stack is stored ``(E, in, out)`` (PEFT's ``is_transposed``). ``nest``: PEFT wraps each
    targeted parameter of one module in its own layer, the first in the module's order innermost, so its LoRA keys
    carry ``nest`` times ``base_layer.`` (the number of targeted parameters of that module registered after it).
    """

    kind: str
    path: str
    experts: int = 0
    dims: tuple[int, int] | None = None
    expert: int | None = None
    rows: tuple[int, int] | None = None
    transposed: bool = False
    nest: int = 0


@dataclass
class Architecture:
    targets: dict[str, Target] = field(default_factory=dict)  # checkpoint tensor name -> where PEFT carries it
    tied: dict[str, str] = field(default_factory=dict)  # tensor name -> the name whose weight it shares
    fan_in_fan_out: bool = False  # True when any LoRA target is a GPT-2 style Conv1D
    source: str = "config"  # "known" (dense decoder), "config" (meta skeleton) or "names" (--guess-modules)
    task_type: str | None = "CAUSAL_LM"  # PEFT's task type for the model class (None: a plain PeftModel)
    model_class: str | None = None  # the transformers class the skeleton was built with

    @property
    def kinds(self) -> dict[str, str]:
        return {n: t.kind for n, t in self.targets.items()}

    @property
    def modules(self) -> dict[str, str]:
        return {n: t.path for n, t in self.targets.items()}
