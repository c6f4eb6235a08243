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
