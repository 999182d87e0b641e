"""README.md and docs/: a front door under 200 lines whose commands run, links that resolve, and
figures that match the stored reports they are generated from."""
from __future__ import annotations

import re
import shlex
import subprocess

import pytest

from tests.conftest import REPO

README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]


def fenced(path, language):
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), re.DOTALL)


def test_every_generated_figure_matches_its_stored_source():
    from vlm.docs import regenerate

    assert regenerate(REPO, check=True) == [], "run `vqa-rlhf docs` after storing a new report"


def test_a_changed_figure_in_a_stored_report_is_caught(tmp_path):
    import json

    from vlm.docs import regenerate

    (tmp_path / "docs" / "results").mkdir(parents=True)
    record = json.loads((REPO / "docs/results/ppo-settings.json").read_text())
    (tmp_path / "docs/results/r.json").write_text(json.dumps(record))
    page = tmp_path / "docs" / "page.md"
    page.write_text("<!-- generated: record docs/results/r.json -->\n<!-- end generated -->\n")
    assert regenerate(tmp_path) and regenerate(tmp_path, check=True) == []  # written, then up to date
    record["rows"][0][4] = 99.99
    (tmp_path / "docs/results/r.json").write_text(json.dumps(record))
    assert regenerate(tmp_path, check=True) == ["docs/page.md: record docs/results/r.json"]


def test_the_seeds_table_is_rendered_from_bench_rlhf_seeds_and_asked_for_when_missing():
    from vlm.docs import render_seeds
    from bench.rlhf import over_seeds

    def run(start, test, low):
        return {"start": start, "methods": {"ppo": {"test": test, "change": test - start, "ci95": [low, low + 2],
                                                    "error_removed": round(100 * (test - start) / (100 - start), 2)}}}

    report = {"stages": {"rlhf": {"bench": {"command": "vqa-rlhf bench rlhf --seeds 0,1", "seeds": over_seeds(
        {0: run(70.0, 85.0, 5.0), 1: run(80.0, 90.0, 1.0)})}}}}
    text = "\n".join(render_seeds(report))
    assert "| ppo | 0, 1 | 87.50 +- 3.54 | 50.00 +- 0.00 | yes |" in text
    assert "seed 1: 90.0 (+1.00..+3.00, 50.0%)" in text and "--seeds 0,1" in text
    with pytest.raises(ValueError, match="bench rlhf --seeds"):
        render_seeds({"stages": {"rlhf": {"bench": {}}}})


def test_the_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines"
    text = README.read_text()
    assert "./install.sh && ./launch.sh" in text and "./install.sh && .venv/bin/python -m pytest -q" in text


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_resolve(page):
    for target in re.findall(r"\]\(([^)#\s]+)\)", page.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        assert (page.parent / target).exists(), f"{page.name} links to {target}, which is not there"


def readme_commands() -> list[str]:
    commands = []
    for block in fenced(README, "bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line:
                commands.append(line)
    return commands


def test_every_readme_command_runs_or_answers_help():
    """Cheap commands run as shown; a long one is checked by its --help and its config loading."""
    from vlm.config import load_config

    assert readme_commands()
    for line in readme_commands():
        for command in line.split("&&"):
            argv = shlex.split(command.strip())
            if argv[0] == "./install.sh":
                assert (REPO / "install.sh").is_file()
                continue
            if argv[0] == "./launch.sh":
                config = next((a for a in argv[1:] if a.endswith(".yaml")), "configs/default.yaml")
                load_config(REPO / config)  # the config it names is valid
                argv = ["./launch.sh", "--help"]
            elif argv[:3] == [".venv/bin/python", "-m", "pytest"]:
                continue  # this test is part of that run
            elif argv[0] == ".venv/bin/vqa-rlhf":
                argv = [str(REPO / ".venv/bin/vqa-rlhf"), argv[1], *([argv[2]] if argv[1] == "prep" else []), "--help"]
            result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, f"{command}: {result.stderr[-500:]}"


def test_the_readme_python_example_compiles():
    for block in fenced(README, "python"):
        compile(block, "README.md", "exec")


RECORDS = sorted((REPO / "docs" / "results").glob("*.json"))


@pytest.mark.parametrize("record", RECORDS, ids=lambda p: p.stem)
def test_every_recorded_measurement_says_how_where_and_when_and_is_shown(record):
    import json

    fields = json.loads(record.read_text())
    missing = {"question", "command", "commit", "machine", "date", "columns", "rows"} - set(fields)
    assert not missing, f"{record.name} lacks {sorted(missing)}"
    assert all(len(row) == len(fields["columns"]) for row in fields["rows"]), f"{record.name}: a row's width"
    source = f"record docs/results/{record.name} -->"
    assert any(source in page.read_text() for page in PAGES), f"no page shows {record.name}"


def test_a_summary_row_is_computed_from_the_rows_not_typed():
    from vlm.docs import render_record

    record = {"question": "Q?", "command": "c", "commit": "abc1234", "machine": "m", "date": "d",
              "columns": ["seed", "test"], "rows": [[0, 99.18], [1, 99.39], [2, 98.82]],
              "summary": {"label": "mean +- sd", "columns": [1]}}
    assert render_record(record)[-1] == "| mean +- sd | 99.13 +- 0.29 |"
