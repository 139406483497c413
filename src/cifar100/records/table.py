"""The results tables, generated from run records, never typed: every record (one row each,
as text or Markdown), the headline (the best record of each model family on each kind of
hardware) and the coursework's table.

``update_readme`` puts each table between its markers in a Markdown file, wherever the
file has them: every record between ``<!-- results:start -->`` and ``<!-- results:end -->``
(the documentation's Results page), the headline between ``<!-- headline:start -->`` and
``<!-- headline:end -->`` (the README), the coursework table between
``<!-- coursework:start -->`` and ``<!-- coursework:end -->``. ``write_between`` does the
same for the benchmarks' tables in docs/.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cifar100.evaluation.metrics import tta_note
from cifar100.records.coursework import coursework_table
from cifar100.records.record import RecordError, load_record

START, END = "<!-- results:start -->", "<!-- results:end -->"
COURSEWORK_START, COURSEWORK_END = "<!-- coursework:start -->", "<!-- coursework:end -->"
HEADLINE_START, HEADLINE_END = "<!-- headline:start -->", "<!-- headline:end -->"
HEADLINE_COLUMNS = [
    "Model family",
    "Hardware",
    "Test top-1",
    "Training time",
    "Wall time",
    "Record",
    "Command",
]
COLUMNS = [
    "Model",
    "Test accuracy",
    "Top-5",
    "Parameters",
    "Training time",
    "Wall time",
    "Hardware",
    "Date",
    "Command",
]


def _machine(info: dict[str, Any]) -> str:
    """The GPU's or the CPU's name, without the trademark signs."""
    if info.get("gpu"):
        return str(info["gpu"])
    cpu = re.sub(r"\((R|TM)\)", "", str(info.get("cpu") or "CPU"))
    return re.sub(r"\s+", " ", cpu.replace(" CPU", "")).strip()


def _hardware(info: dict[str, Any]) -> str:
    if info.get("gpu"):
        return _machine(info)
    threads = info.get("threads") or info.get("cpu_count")
    cpu = f"{_machine(info)}, {threads} threads" if threads else _machine(info)
    # bf16 autocast on a CPU (AMX) is not what the other CPU rows ran: the row says so
    return f"{cpu}, bf16" if info.get("precision") == "bf16" else cpu


def _processes(processes: dict[str, Any]) -> str:
    """``"8 × "`` before the hardware of a run that 8 processes trained (on 1 machine)."""
    world, nodes = processes.get("world_size") or 1, processes.get("nodes") or 1
    if world <= 1:
        return ""
    return f"{world} × " if nodes <= 1 else f"{world} × ({nodes} machines) "


def _duration(minutes: float | None) -> str:
    if minutes is None:
        return ""
    if minutes < 60:
        return f"{minutes:.1f} min"
    return f"{int(minutes // 60)} h {round(minutes % 60):02d} min"


def wall_time(record: dict[str, Any]) -> str:
    """The whole command's minutes (data loading and the test included); "—" for a record
    from before they were kept."""
    seconds = record.get("wall_seconds")
    return "—" if seconds is None else _duration(seconds / 60)


def _teacher_cost(record: dict[str, Any]) -> str:
    """A distilled run's teachers' own training time, beside the student's."""
    distill = record.get("distill") or {}
    teachers = distill.get("teachers") or []
    if not teachers:
        return ""
    minutes = [t.get("train_minutes") for t in teachers]
    if None in minutes:
        cost = " + teacher (time unknown)"
    else:
        cost = f" + {_duration(sum(minutes))} teacher{'s' * (len(minutes) > 1)}"
    return cost + _logits_cost(distill)


def _logits_cost(distill: dict[str, Any]) -> str:
    """Cached teacher logits that an earlier run computed: a cost the student's minutes
    do not hold (what this run computed itself is in them, as ``logits_seconds``)."""
    cache = distill.get("cache_seconds")
    if not cache:  # online teachers, or a record from before the cost was kept
        return ""
    if None in cache:
        return " + teacher logits (time unknown)"
    earlier = sum(cache) - distill.get("logits_seconds", 0)
    return f" + {_duration(earlier / 60)} teacher logits" if earlier >= 3 else ""


def table_row(record: dict[str, Any]) -> list[str]:
    notes = [tta_note(record)] * bool(tta_note(record))
    notes += ["refit"] * bool(record.get("refit"))
    # A -dirty commit cannot be checked out again: the run cannot be reproduced exactly.
    commits = [record.get("commit"), (record.get("evaluated") or {}).get("commit")]
    notes += ["uncommitted code"] * any(str(c or "").endswith("-dirty") for c in commits)
    params = record.get("parameters")
    return [
        str(record.get("name") or record["model"]),
        f"{100 * record['test_top1']:.2f}%" + (f" ({', '.join(notes)})" if notes else ""),
        f"{100 * record['test_top5']:.2f}%",
        f"{params / 1e6:.2f} M" if params else "",
        _duration(record.get("train_minutes")) + _teacher_cost(record),
        _processes(record.get("processes") or {}) + _hardware(record.get("hardware") or {}),
        str(record.get("started") or "")[:10],
        record.get("command") or "",
    ]


def _table_cells(record: dict[str, Any]) -> list[str]:
    """``table_row`` with the wall time after the training time (the tables' columns)."""
    row = table_row(record)
    return [*row[:5], wall_time(record), *row[5:]]


def markdown_table(records: list[dict[str, Any]]) -> str:
    def cell(text: str, code: bool) -> str:
        text = text.replace("|", "\\|")
        return f"`{text}`" if code and text else text

    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|--:|--:|--:|--:|--:|---|---|---|"]
    for record in records:
        row = _table_cells(record)
        lines.append(
            "| " + " | ".join(cell(v, i == len(row) - 1) for i, v in enumerate(row)) + " |"
        )
    return "\n".join(lines) + "\n"


def model_family(record: dict[str, Any]) -> str:
    """The registry model a record trained, or ``ensemble`` for several averaged."""
    return "ensemble" if "members" in record else str(record["model"])


def hardware_kind(record: dict[str, Any]) -> str:
    """``GPU`` or ``N-thread CPU``: runs of one kind compare, whatever the CPU's make."""
    info = record.get("hardware") or {}
    if info.get("gpu"):
        return "GPU"
    threads = info.get("threads") or info.get("cpu_count")
    return f"{threads}-thread CPU" if threads else "CPU"


def best_records(records: Iterable[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(hardware kind, model family) -> the record with the best test top-1 there."""
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for record in records:
        key = (hardware_kind(record), model_family(record))
        if key not in best or record["test_top1"] > best[key]["test_top1"]:
            best[key] = record
    return best


def reached(records: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Model -> its best record on each kind of hardware (kind, test top-1, record name),
    best first: what ``cifar100 models`` says each model reaches. Ensembles are left out."""
    by_model: dict[str, list[dict[str, Any]]] = {}
    for (kind, family), record in best_records(records).items():
        if family != "ensemble":
            entry = {"hardware": kind, "test_top1": record["test_top1"], "record": record["name"]}
            by_model.setdefault(family, []).append(entry)
    return {m: sorted(e, key=lambda x: -x["test_top1"]) for m, e in by_model.items()}


def headline_table(records: list[dict[str, Any]]) -> str:
    """Markdown: the record with the best test top-1 of each model family on each kind of
    hardware, CPUs first, then by accuracy. Every record was itself selected on validation;
    this only picks which finished record to show."""
    best = best_records(records)
    ordered = sorted(best.items(), key=lambda kv: (kv[0][0] == "GPU", -kv[1]["test_top1"]))
    lines = ["| " + " | ".join(HEADLINE_COLUMNS) + " |", "|---|---|--:|--:|--:|---|---|"]
    for (kind, family), record in ordered:
        row = table_row(record)
        machine = _machine(record.get("hardware") or {})
        command = row[7].replace("|", "\\|")
        wall = wall_time(record)
        cells = [family, f"{kind} ({machine})", row[1], row[4], wall, f"`{row[0]}`", f"`{command}`"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def generated_tables(records: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """Each generated Markdown table under its (start, end) markers."""
    return {
        (START, END): markdown_table(records),
        (HEADLINE_START, HEADLINE_END): headline_table(records),
        (COURSEWORK_START, COURSEWORK_END): coursework_table(records),
    }


def text_table(records: list[dict[str, Any]]) -> str:
    rows = [COLUMNS] + [_table_cells(r) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    return (
        "\n".join(
            "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=False)) + "  " + row[-1]
            for row in rows
        )
        + "\n"
    )


def update_readme(readme: Path, tables: dict[tuple[str, str], str]) -> None:
    """Replace what lies between each pair of markers in ``readme`` with its table from
    ``tables`` ((start, end) -> table); the file must have at least one pair."""
    try:
        text = readme.read_text()
    except OSError as error:
        raise RecordError(f"{readme}: cannot read ({error.strerror or error})") from None
    present = [markers for markers in tables if markers[0] in text]
    if not present:
        pairs = " or ".join(f"{start} and then {end}" for start, end in tables)
        raise RecordError(f"{readme}: needs the markers {pairs} around a table")
    new = text
    for start, end in present:
        new = _between(new, start, end, tables[start, end], readme)
    tmp = readme.with_name(readme.name + ".tmp")
    tmp.write_text(new)
    tmp.replace(readme)


def write_between(path: Path, marker: str, table: str) -> None:
    """Replace what lies between ``<!-- MARKER:start -->`` and ``<!-- MARKER:end -->`` in
    ``path`` with ``table`` (benchmarks' generated tables in docs/)."""
    text = path.read_text()
    new = _between(text, f"<!-- {marker}:start -->", f"<!-- {marker}:end -->", table, path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new)
    tmp.replace(path)


def _between(text: str, start_marker: str, end_marker: str, table: str, readme: Path) -> str:
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < 0 or end < start:
        raise RecordError(
            f"{readme}: needs the markers {start_marker} and then {end_marker} around the table"
        )
    return text[: start + len(start_marker)] + "\n" + table + text[end:]


def compare(records: Iterable[str | Path | dict[str, Any]], markdown: bool = False) -> str:
    """The results table, one row per run directory, run record file or record, in order.

    Args:
        records: run directories, run record files (``results/*.json``), or records as
            ``load_record`` returns them.
        markdown: a Markdown table (as in the README) instead of aligned text.
    """
    rows = [r if isinstance(r, dict) else load_record(r) for r in records]
    return markdown_table(rows) if markdown else text_table(rows)


def write_tables(
    inputs: list[Path],
    markdown: bool = False,
    readme: Path | list[Path] | None = None,
    out: Path | None = None,
) -> str:
    """The table of the records (or run folders) ``inputs`` (Markdown with ``readme``); each
    generated table is also spliced into each ``readme`` file that has its markers, and the
    table is written to ``out``."""
    records = [load_record(path) for path in inputs]
    readmes = [readme] if isinstance(readme, Path) else list(readme or [])
    table = compare(records, markdown=markdown or bool(readmes))
    for path in readmes:
        update_readme(path, generated_tables(records))
    if out:
        try:
            out.write_text(table)
        except OSError as error:
            raise RecordError(f"{out}: cannot write ({error.strerror or error})") from None
    return table
