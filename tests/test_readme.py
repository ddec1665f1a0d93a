"""README.md against the files: the layout table's line counts and total, the length of the guide, and
the two set-up commands near its top. The counts cannot drift from `wc -l`."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def lines_of(name: str) -> int:
    with open(os.path.join(ROOT, name)) as f:
        return sum(1 for _ in f)


def layout_rows() -> list[tuple[str, int]]:
    """(file, lines) of every layout table row that gives a count: "| 1 | `processing.py` | 500 | ..."."""
    return [(name, int(count.replace(",", "")))
            for name, count in re.findall(r"^\|(?: \d+ \|)? `([\w./]+\.py)` \| ([\d,]+) \|", README, re.M)]


def test_every_python_file_is_in_the_layout_with_its_line_count():
    rows = dict(layout_rows())
    tools = set(re.findall(r"^\| `(\w+\.py)` \| [^\d]", README, re.M))  # the tools table gives no counts
    files = {f for f in os.listdir(ROOT) if f.endswith(".py")}
    assert set(rows) | tools == files
    assert {name: lines_of(name) for name in rows} == rows


def test_the_reading_path_total_and_its_files_under_500_lines():
    rows = layout_rows()
    reading = [name for name, _ in rows[:10]]  # the first table's first ten: the reading path
    total = int(re.search(r"The first ten are ([\d,]+)\s+lines", README).group(1).replace(",", ""))
    assert total == sum(lines_of(name) for name in reading)
    assert all(count <= 500 for _, count in rows), [row for row in rows if row[1] > 500]


def test_the_guide_is_short_and_starts_with_its_two_commands():
    lines = README.splitlines()
    assert len(lines) <= 250
    top = "\n".join(lines[:30])
    assert "pip install -r requirements.txt && python train.py" in top
    assert "python -m pytest -q" in top


@pytest.mark.parametrize("link", re.findall(r"\]\((docs/[^)]+)\)", README))
def test_every_linked_doc_and_picture_exists(link):
    assert os.path.isfile(os.path.join(ROOT, link)), link


# The layers, lowest first: a module imports only from its own layer's earlier files and from layers below.
SUPPORT = ["autotune", "presets", "checkpoints", "configs", "sources", "questions", "easyvqa"]
READING = ["processing", "siglip", "lora", "model", "layouts", "qformer", "vlm", "data", "dpo"]  # layouts: a support
# file holding transformers' layouts (SmolVLM, LLaVA, BLIP-2) for vlm.py and qformer.py
SCRIPT_SUPPORT = ["quantize", "compiled", "plots", "cli", "parallel", "runs"]
SCRIPTS = ["generate", "train", "evaluate", "bench", "export"]
GENERATE_DECODING = {"generate", "beam_search", "banned_ids", "stop_ids", "attention_maps", "image_attention",
                     "check_options", "next_token"}


def local_imports(module: str) -> dict[str, set]:
    """{imported local module: the names taken from it (empty for `import module`)}."""
    import ast

    tree = ast.parse(open(os.path.join(ROOT, f"{module}.py")).read())
    local = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in local:
                    found.setdefault(alias.name, set())
        elif isinstance(node, ast.ImportFrom) and node.module in local:
            found.setdefault(node.module, set()).update(alias.name for alias in node.names)
    return found


def test_imports_point_one_way_and_nothing_imports_a_script():
    order = SUPPORT + READING + SCRIPT_SUPPORT + SCRIPTS
    assert set(order) == {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    for module in order:
        for imported, names in local_imports(module).items():
            assert imported not in ("train", "evaluate", "bench", "export"), f"{module} imports the script {imported}"
            if imported == "generate":  # its decoding only, never its command line
                assert names and names <= GENERATE_DECODING, (module, names)
                continue
            assert order.index(imported) < order.index(module), f"{module} imports {imported}, above it"
