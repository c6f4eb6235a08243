import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    test_cmd = next(b for b in blocks if "pytest" in b)
    # the install part and the test runner of the README's one-liner both appear in CI
    assert 'pip install torch==2.13.0 && pip install -e ".[dev]"' in test_cmd
    assert "pip install -q torch==2.13.0 && pip install -q -e \".[dev]\"" in ci
    assert "python -m pytest -q" in test_cmd and "python -m pytest -q" in ci


def test_readme_states_the_guarantees_and_every_exit_status():
    from pixelwise.cli import EXIT_SKIPPED

    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Guarantees", 1)[1].split("\n## ", 1)[0]
    for code in (0, 1, 2, EXIT_SKIPPED, 130, 143):
        assert f"\n| {code} |" in section, code
    for promise in ("never clobbered", "<stem>_<ext>", "--skip-invalid", "SIGTERM", "umask", "--max-pixels"):
        assert promise in section, promise
    ci = (ROOT / ".ci" / "run").read_text()
    assert "-c constraints-min.txt" in ci and "### Dependency floors" in readme
