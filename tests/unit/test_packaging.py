"""The GPU image gets the project's one dependency list: Dockerfile.ngc installs the package
with its dependencies (never --no-deps beside a hand-kept list) and keeps the image's torch."""

import re
import shlex
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _pip_installs(dockerfile: str) -> list[list[str]]:
    """The words of every `pip install` command of the Dockerfile's RUN instructions."""
    text = re.sub(r"\\\n", " ", dockerfile)  # continuation lines joined
    commands = []
    for line in text.splitlines():
        if not line.startswith("RUN "):
            continue
        lex = shlex.shlex(line[4:].replace("${PIP_CONSTRAINT:+-c $PIP_CONSTRAINT}", ""),
                          posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        words = []
        for token in [*lex, "&&"]:
            if token in ("&&", "||", ";", "|"):
                if words[:2] == ["pip", "install"] or words[1:4] == ["-m", "pip", "install"]:
                    commands.append(words)
                words = []
            else:
                words.append(token)
    return commands


def _project_install(commands: list[list[str]]) -> list[str]:
    found = [c for c in commands if any(re.fullmatch(r"\.(\[[\w,]+\])?", w) for w in c)]
    assert len(found) == 1, f"one pip install of the project itself expected, found {found}"
    return found[0]


def test_every_runtime_dependency_reaches_the_image():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    commands = _pip_installs((ROOT / "Dockerfile.ngc").read_text())
    project = _project_install(commands)
    assert "--no-deps" not in project, \
        "Dockerfile.ngc installs the package with --no-deps: its dependencies would be a second list"
    extras = re.fullmatch(r"\.(?:\[([\w,]+)\])?", next(
        w for w in project if re.fullmatch(r"\.(\[[\w,]+\])?", w))).group(1) or ""
    # the demo's images and the tests (tests/gpu) are part of what the image is for
    assert set(pyproject["optional-dependencies"]) <= set(extras.split(",")), extras
    # no other pip install may name a dependency (a second list that could drift)
    names = {re.split(r"[<>=!~\[; ]", d)[0].lower() for d in pyproject["dependencies"]}
    for command in commands:
        if command is project:
            continue
        named = {re.split(r"[<>=!~\[; ]", w)[0].lower() for w in command[2:]} & names
        assert not named, f"Dockerfile.ngc installs {sorted(named)} by hand: {command}"


def test_the_image_keeps_its_own_torch():
    project = _project_install(_pip_installs((ROOT / "Dockerfile.ngc").read_text()))
    assert "-c" in project or "--constraint" in project, \
        "the project install must run under a constraint that pins the image's torch"


def test_the_rule_can_fail():
    bad = ("FROM x\nRUN pip install --no-cache-dir --no-deps -e . && \\\n"
           "    pip install transformers safetensors\n")
    project = _project_install(_pip_installs(bad))
    assert "--no-deps" in project
    assert any("transformers" in c for c in _pip_installs(bad) if c is not project)
