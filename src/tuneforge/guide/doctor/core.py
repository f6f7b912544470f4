"""The doctor's core: a finding, the error `train` raises on error findings, and the context every check reads.

A check is a function `Context -> iterable of Finding`. It reads the recipe (a `tuneforge.recipe.Recipe`) by its
attributes, and where it needs them the tokenizer, the model's config, the prepared data and the device; a check
whose input is missing yields nothing. The checks live in this package's topic modules; `runner.CHECKS` lists them
in the order they run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

from tuneforge.errors import TuneforgeError
from tuneforge.methods import method_spec

if TYPE_CHECKING:
    from tuneforge.methods import Method

SEVERITIES = ("error", "warning", "info")


@dataclass
class Finding:
    severity: str  # "error" | "warning" | "info"
    code: str  # stable id, e.g. "lr-out-of-range"
    message: str  # what is wrong, with the numbers
    why: str  # why it matters
    fix: str  # what to change
    where: str = ""  # "`train.lr` (recipe.yaml:12)", or a data file:line

    def __post_init__(self):
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")


class DoctorError(TuneforgeError):
    """`train` refuses to start: the doctor found errors. `findings` holds all of them."""

    def __init__(self, findings: list[Finding]):
        self.findings = findings
        errors = [f for f in findings if f.severity == "error"]
        lines = [f"doctor found {len(errors)} error(s); the run was not started:"]
        for f in errors:
            lines.append(f"  - {f.code}: {f.message}" + (f" [{f.where}]" if f.where else ""))
            lines.append(f"    fix: {f.fix}")
        super().__init__("\n".join(lines), fix="fix the recipe or data, or pass --no-doctor to train anyway")


def has_errors(findings: Iterable[Finding]) -> bool:
    return any(f.severity == "error" for f in findings)


def raise_for_errors(findings: list[Finding]) -> None:
    if has_errors(findings):
        raise DoctorError(findings)


def by_severity(findings: list[Finding]) -> list[Finding]:
    """Errors first, then warnings, then notes; a stable sort, so checks keep their order within a severity."""
    order = {s: i for i, s in enumerate(SEVERITIES)}
    return sorted(findings, key=lambda f: order[f.severity])


@dataclass
class Context:
    recipe: Any  # a tuneforge.recipe.Recipe
    tokenizer: Any = None
    data: Any = None  # PreparedData (SFT-style examples: conversations, text, or the chosen side of pairs)
    model_config: Any = None
    device_info: dict | None = None
    source: str | None = None
    data_format: str | None = None
    native_chat_template: str | None = None
    key_lines: dict = field(default_factory=dict)
    _meta: Any = None
    _meta_failed: bool = False

    def where(self, key: str) -> str:
        """"`train.lr` (recipe.yaml:12)", or "(default)" when the key is not written in the recipe file."""
        path = tuple(key.split("."))
        if not self.source:
            return f"`{key}`"
        if path in self.key_lines:
            return f"`{key}` ({self.source}:{self.key_lines[path]})"
        head = path[:1]
        if head in self.key_lines and not any(k[:1] == head and len(k) > 1 for k in self.key_lines):
            return f"`{key}` ({self.source}:{self.key_lines[head]})"  # shorthand such as `model: name`
        return f"`{key}` (default, not set in {self.source})"

    @property
    def method(self) -> str:
        return self.recipe.method

    @property
    def spec(self) -> Method:
        """The method's registry entry: family, data kind, learning rates, KL default."""
        return method_spec(self.recipe.method)

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def adapter(self) -> str:
        return self.recipe.adapter.type

    @property
    def uses_lora(self) -> bool:
        return self.adapter in ("lora", "qlora")

    @property
    def stats(self):
        return getattr(self.data, "stats", None)

    @property
    def on_gpu(self) -> bool:
        return bool(self.device_info) and self.device_info.get("type") == "cuda"

    def meta_model(self):
        """The model built on the meta device from its config (no weights, no memory), or None."""
        if self._meta is None and not self._meta_failed and self.model_config is not None:
            from tuneforge.guide.plan import meta_model

            try:
                self._meta = meta_model(self.model_config)
            except Exception:  # an architecture transformers cannot build from config alone
                self._meta_failed = True
        return self._meta


Check = Callable[[Context], Iterable[Finding]]
