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


def test_the_readme_python_api_example_runs(tmp_path):
    """The README's "Python API" block, as a user runs it in a fresh interpreter (with a small
    checkpoint where it loads the demo's, and an image of its name)."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from pixelwise import create_model, save_checkpoint

    readme = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)\n```", readme, re.S)
                 if b.startswith("import pixelwise") and "pixelwise.preprocess(" in b)
    kw = {"base_channels": 4, "batch_norm": True}
    (tmp_path / "pixelwise-demo").mkdir()
    save_checkpoint(tmp_path / "pixelwise-demo" / "best.safetensors", create_model("unet", num_classes=4, **kw),
                    {"model": "unet", "num_classes": 4, "model_kwargs": kw})
    (tmp_path / "pixelwise-demo" / "predictions").mkdir()  # the demo's first test image, which the README reads
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(
        tmp_path / "pixelwise-demo" / "predictions" / "test_00000_image.png")
    check = "\nassert pred.mask.shape == (40, 56) and tuple(x.shape) == (3, 40, 56), (pred.mask.shape, x.shape)\n"
    result = subprocess.run([sys.executable, "-c", block + check], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_every_markdown_table_is_one_table():
    """A blank line inside a table ends it: the rows after it showed as raw `| ... |` text (three
    rows of docs/recipes.md's paper recipes). A row after a blank line must start a new table."""
    broken = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        lines = doc.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines[1:-1], 1):
            if line.startswith("|") and not lines[i - 1].strip() and not re.match(r"\|\s*:?-", lines[i + 1]):
                broken.append(f"{doc.name}:{i + 1}")
    assert broken == []


CALL_EXAMPLES = {"read_image(f)"}  # a call shown with a variable of the text's, not a signature


def test_functions_named_with_their_parameters_in_the_docs_have_those_parameters():
    """watershed_cells(prob, threshold), with_boundaries(prob, ...), rand_error_over_thresholds(probs,
    ...) and forward_logits(model, x) named parameters the code calls otherwise, so keyword calls
    as documented were TypeErrors."""
    import importlib
    import inspect

    found: dict = {}
    for module in ("pixelwise", "pixelwise.metrics", "pixelwise.inference.cells", "pixelwise.models",
                   "pixelwise.data.io", "pixelwise.inference.mc_dropout", "pixelwise.checkpoint",
                   "pixelwise.preprocess", "pixelwise.data"):
        mod = importlib.import_module(module)
        for name in dir(mod):
            if not name.startswith("_") and inspect.isfunction(getattr(mod, name)):
                found.setdefault(name, getattr(mod, name))
    checked, wrong = 0, []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for m in re.finditer(r"`(?:[\w.]+\.)?(\w+)\(([\w, ]+)\)`", doc.read_text(encoding="utf-8")):
            name, args = m.group(1), [a.strip() for a in m.group(2).split(",")]
            if name in found and f"{name}({m.group(2)})" not in CALL_EXAMPLES:
                checked += 1
                params = inspect.signature(found[name]).parameters
                wrong += [f"{doc.name}: {m.group(0)} has no {a} ({', '.join(params)})" for a in args if a not in params]
    assert checked >= 10 and wrong == []
