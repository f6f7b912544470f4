"""Printing findings: grouped by severity (errors first), each with where, why and fix, then a one-line summary."""

from __future__ import annotations

from tuneforge.guide.doctor.core import SEVERITIES, Finding

STYLE = {"error": ("red", "error"), "warning": ("yellow", "warning"), "info": ("blue", "note")}


def render_findings(console, findings: list[Finding], *, title: str | None = None) -> None:
    """Print findings grouped by severity (errors first), each with where, why and fix, then a one-line summary."""
    from rich.markup import escape

    if title:
        console.print(f"[bold]{escape(title)}[/]")
    for f in findings:
        color, label = STYLE[f.severity]
        console.print(f"[bold {color}]{label:7s}[/] [bold]{f.code}[/]" + (f"  [dim]{escape(f.where)}[/]" if f.where else ""))
        console.print(f"        {escape(f.message)}")
        console.print(f"        [dim]why:[/] {escape(f.why)}")
        console.print(f"        [dim]fix:[/] {escape(f.fix)}")
    console.print(summary_line(findings))


def summary_line(findings: list[Finding]) -> str:
    counts = {s: sum(1 for f in findings if f.severity == s) for s in SEVERITIES}
    if not findings:
        return "[green]doctor: no problems found[/]"
    parts = [f"{counts['error']} error(s)", f"{counts['warning']} warning(s)", f"{counts['info']} note(s)"]
    color = "red" if counts["error"] else ("yellow" if counts["warning"] else "green")
    return f"[{color}]doctor: " + ", ".join(parts) + "[/]"
