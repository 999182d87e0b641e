"""Figures in README.md and docs/ are generated from stored files, never typed.

A generated block in a markdown file is fenced by two comments that name what renders it and from
which stored file (paths relative to the repository):

    <!-- generated: stages docs/reports/default/report.json -->
    ...                                   (written by `vqa-rlhf docs`)
    <!-- end generated -->

Kinds: `stages` (a run report's first table: what each stage bought on test, with its paired CI),
`families` (per question family: the SFT model and after RLHF), `rlhf` (the ways to learn from
judgments side by side), `rm` (what the reward model knows), `provenance` (commit, machine,
threads, seed, date of a report), `record` (a recorded measurement: docs/results/*.json, a table
with the command, commit, machine, date and seed it was measured with; `source`: the commit whose
README first reported it; `summary`: a mean +- sd row computed from the rows). `vqa-rlhf docs` rewrites every block;
`vqa-rlhf docs --check` (a test runs it) fails naming the file and block that differ.
"""
from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from vlm.report import SEEDS_COLUMNS, STAGE_COLUMNS, seeds_rows, stage_rows

BLOCK = re.compile(r"(<!-- generated: (?P<kind>\w+) (?P<source>\S+) -->\n)(?P<body>.*?)(<!-- end generated -->)",
                   re.DOTALL)


def _table(columns, rows) -> list[str]:
    return ["| " + " | ".join(map(str, columns)) + " |", "|---" * len(columns) + "|",
            *["| " + " | ".join("" if cell is None else str(cell) for cell in row) + " |" for row in rows]]


def provenance_line(report: dict) -> str:
    p = report.get("provenance") or {}
    return (f"One run: seed {p.get('seed', '?')}, commit {p.get('commit', '?')}, {p.get('cpu', '?')}, "
            f"{p.get('threads', '?')} threads, {p.get('date', '?')}.")


def render_stages(report: dict) -> list[str]:
    return [provenance_line(report), "", *_table(STAGE_COLUMNS, stage_rows(report))]


def render_families(report: dict) -> list[str]:
    sft = report["stages"]["sft"]["by_question_family"]
    after = (((report["stages"].get("rlhf") or {}).get("methods") or {}).get("ppo") or {}).get("by_family") or {}
    rows = [(family, f"{acc:.2f}", after.get(family, {}).get("after", "-"), after.get(family, {}).get("error_removed", "-"))
            for family, acc in sorted(sft.items())]
    return _table(("question family", "SFT", "after RLHF", "error removed (%)"), rows)


def render_rlhf(report: dict) -> list[str]:
    rlhf = report["stages"]["rlhf"]
    methods = dict(rlhf["methods"])
    bench = rlhf.get("bench") or {}
    for name, entry in (bench.get("methods") or {}).items():
        methods.setdefault(name, entry)
    lines = [f"The SFT model answers {rlhf['start']} of the test split"
             + (f"; with written answers for every training image, {rlhf['reference']['vqa_accuracy']}."
                if (rlhf.get("reference") or {}).get("vqa_accuracy") is not None else "."), ""]
    rows = [(name, m["test"], f"{m['change']:+.2f} ({m['ci95'][0]:+.2f}..{m['ci95'][1]:+.2f})", m["error_removed"],
             m.get("labels") if m.get("labels") is not None else "-", m.get("seconds", "-"))
            for name, m in methods.items()]
    lines += _table(("method", "test VQA", "change (paired 95% CI)", "error removed (%)", "labels", "seconds"), rows)
    if bench.get("command"):
        lines += ["", f"Command: `{bench['command']}`."]
    return lines


def render_seeds(report: dict) -> list[str]:
    """`vqa-rlhf bench rlhf --seeds`: per method, mean +- sd over seeds, each seed its own dataset and run."""
    bench = (report["stages"].get("rlhf") or {}).get("bench") or {}
    spread = bench.get("seeds")
    if not spread:
        raise ValueError("the report has no stages.rlhf.bench.seeds: run `vqa-rlhf bench rlhf --seeds 0,1,2` on its run")
    per_seed = [f"seed {seed}: {r['test']} ({r['ci95'][0]:+.2f}..{r['ci95'][1]:+.2f}, {r['error_removed']}%)"
                for seed, r in (spread.get("ppo") or {}).get("per_seed", {}).items()]
    lines = _table(SEEDS_COLUMNS, seeds_rows(spread))
    if per_seed:
        lines += ["", "ppo per seed: " + "; ".join(per_seed) + "."]
    return lines + ["", f"Command: `{bench.get('command', '')}`."]


def render_rm(report: dict) -> list[str]:
    rm = report["stages"]["rm"]
    probe = rm.get("candidate_top1") or {}
    bon = rm.get("best_of_n") or {}
    rows = [("held-out accuracy (%)", rm["accuracy"]), ("ROC AUC", rm["auc"]),
            ("training labels fitted (%)", (rm.get("train_fit") or {}).get("accuracy")),
            ("within-question ranking (%)", rm.get("ranking_accuracy")),
            (f"best of {bon.get('n')}: greedy / reward's pick / oracle",
             f"{bon.get('greedy')} / {bon.get('reward')} / {bon.get('oracle')}"),
            ("candidate probe, overall (%)", probe.get("overall")),
            *[(f"candidate probe, {family} (%)", value) for family, value in (probe.get("by_family") or {}).items()]]
    return _table(("reward model (" + rm["objective"] + ")", "value"), rows)


def render_provenance(report: dict) -> list[str]:
    return [provenance_line(report)]


def summary_row(record: dict) -> list:
    """A record's `summary` row, computed from its rows, never typed: {"label": "mean +- sd", "columns": [i, ...]}
    puts mean +- sample sd of those columns under the table."""
    summary = record["summary"]
    row: list = [summary["label"]] + [""] * (len(record["columns"]) - 1)
    for column in summary["columns"]:
        values = [float(r[column]) for r in record["rows"]]
        row[column] = f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"
    return row


def render_record(record: dict) -> list[str]:
    lines = [f"**{record['question']}** Measured with `{record['command']}` at commit {record['commit']}, "
             f"{record['machine']}, {record['date']}" + (f", seed {record['seed']}" if "seed" in record else "")
             + (f"; {record['note']}" if record.get("note") else "")
             + (f" (recorded in `git show {record['source']}:README.md`)" if record.get("source") else "") + ".",
             ""]
    rows = record["rows"] + ([summary_row(record)] if record.get("summary") else [])
    return lines + _table(record["columns"], rows)


RENDERERS = {"stages": render_stages, "families": render_families, "rlhf": render_rlhf, "rm": render_rm, "seeds": render_seeds,
             "provenance": render_provenance, "record": render_record}


def render_block(kind: str, source: Path) -> str:
    if kind not in RENDERERS:
        raise ValueError(f"unknown generated block kind {kind!r}; kinds are {sorted(RENDERERS)}")
    return "\n".join(RENDERERS[kind](json.loads(source.read_text()))) + "\n"


def markdown_files(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def regenerate(root: Path, check: bool = False) -> list[str]:
    """Rewrites every generated block of README.md and docs/*.md from its stored source; with `check`,
    writes nothing and returns the blocks that differ ("file: kind source")."""
    stale = []
    for path in markdown_files(root):
        if not path.is_file():
            continue
        text = path.read_text()

        def replace(match):
            body = render_block(match["kind"], root / match["source"])
            if body != match["body"]:
                stale.append(f"{path.relative_to(root)}: {match['kind']} {match['source']}")
            return match.group(1) + body + match.group(5)

        new = BLOCK.sub(replace, text)
        if not check and new != text:
            path.write_text(new)
    return stale
