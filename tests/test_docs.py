"""Every python block of README.md and docs/*.md runs, warns nothing and prints what it shows.

A block tagged ```python runs as it stands, in a fresh namespace, from a temporary
directory. A sketch that cannot run alone (it uses names from around it) is tagged
```python fragment and is reported as skipped with that reason. When a ```output block
follows a python block, the block's standard output must match it (`...` matches any
text, as in doctest's ELLIPSIS).
"""
from __future__ import annotations

import contextlib
import doctest
import io
import pathlib
import re
import warnings

import pytest

from kfac_fast.backends.lapack_threads import LapackThreadsWarning

ROOT = pathlib.Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(.*)$")

# Blocks that are fragments but not yet tagged, in files another owner edits: (file,
# index of the python block in that file) -> why. Each entry must still be needed (a
# test below fails once the block is tagged), so the list only shrinks.
UNTAGGED_FRAGMENTS: dict[tuple[str, int], str] = {
}


def _blocks(path: pathlib.Path) -> list[tuple[list[str], str, int, str | None]]:
    """(info words, code, first line number, following output block or None) per python block."""
    lines = path.read_text().splitlines()
    fenced, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        fenced.append((m.group(1).split(), "\n".join(lines[i + 1:end]) + "\n", i + 2))
        i = end + 1
    out = []
    for k, (info, code, line) in enumerate(fenced):
        if info[:1] == ["python"]:
            nxt = fenced[k + 1] if k + 1 < len(fenced) else None
            output = nxt[1] if nxt is not None and nxt[0][:1] == ["output"] else None
            out.append((info, code, line, output))
    return out


CASES = [(path.relative_to(ROOT).as_posix(), n, *block)
         for path in FILES for n, block in enumerate(_blocks(path))]


def test_blocks_found():
    files = {case[0] for case in CASES}
    assert {"README.md", "docs/frontends.md"} <= files
    runnable = [c for c in CASES if "fragment" not in c[2] and (c[0], c[1]) not in UNTAGGED_FRAGMENTS]
    assert len(runnable) >= 4


@pytest.mark.parametrize("name, index, info, code, line, output", CASES,
                         ids=[f"{c[0]}:{c[4]}" for c in CASES])
def test_python_block(name, index, info, code, line, output, tmp_path, monkeypatch):
    if "fragment" in info:
        assert (name, index) not in UNTAGGED_FRAGMENTS, f"{name} block {index} is tagged now: drop its exception"
        compile(code, f"{name}:{line}", "exec")  # a fragment is still valid python
        pytest.skip(f"fragment (tagged ```python fragment): {name} line {line}")
    if (name, index) in UNTAGGED_FRAGMENTS:
        pytest.skip(f"fragment, not yet tagged (listed exception): {UNTAGGED_FRAGMENTS[name, index]}")
    monkeypatch.chdir(tmp_path)
    stdout = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(stdout):
        warnings.simplefilter("always")
        exec(compile(code, f"{name}:{line}", "exec"), {"__name__": "__main__"})
    # (the OMP_WAIT_POLICY advice depends on the environment the tests run in, not on the docs)
    assert [f"{w.category.__name__}: {w.message}" for w in caught if w.category is not LapackThreadsWarning] == []
    if output is not None:
        checker = doctest.OutputChecker()
        assert checker.check_output(output, stdout.getvalue(), doctest.ELLIPSIS), \
            f"{name}:{line} printed\n{stdout.getvalue()}expected\n{output}"
