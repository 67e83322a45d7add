"""Every Python and shell example in the docs (and the README) runs, in page order, against
the real broker.

Each page gets a namespace of its own (deleted afterwards) and a working directory of its
own; its examples run in the order a reader meets them:

- a ``python`` block runs in the page's one namespace of names, with top-level ``await``
  (as in ``python -m asyncio``), ``Settings()`` reading the page's ``RMQDELAY_*``; a block
  without ``await`` runs in a thread of its own, as a script would (``asyncio.run`` works);
- a ``python`` block whose first line is a file name (``# myapp/tasks.py``) is that file:
  it is written into the working directory, which is on the path of both kinds of block;
- a ``sh`` or ``bash`` block runs under ``bash -euo pipefail`` with ``.venv/bin`` first on
  the PATH, the page's ``RMQDELAY_*`` in the environment, and ``NEW_BROKER_URL`` (where a
  page moves tasks to another broker) pointing at a second namespace of the same broker.

A comment right before a block can change that:

- ``<!-- docs-test: background until=URL -->``: a long-running command (a worker, a
  server), started and left running until the page ends (then stopped with SIGTERM and
  required to exit 0); with ``until=``, the next block waits for URL to answer, with
  ``says=WORD`` for the command's output to hold WORD;
- a page may set OpenTelemetry's global tracer provider: it is put back afterwards;
- ``<!-- docs-test: skip REASON -->``: not run. The few there are name why (minutes of
  benchmark, a Docker engine, this very test suite) and are listed in ``SKIPS`` below, so
  a new one cannot slip in unseen.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import inspect
import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.util._once import Once

from rmqdelay import Settings
from rmqdelay.tools.destroy import destroy, plan_destroy

from .conftest import NO_MANAGEMENT, cannot, management_api
from .helpers import settings_env

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PROMTOOL_DIR = "/var/lib/rmqdelay/tools"
RUNNABLE = {"python", "sh", "bash"}
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[A-Za-z0-9_+-]*)")
DIRECTIVE = re.compile(r"^\s*<!-- docs-test: (?P<what>.+?) -->\s*$")
FILE_LINE = re.compile(r"^# (?P<path>[A-Za-z0-9_./-]+\.py)\s*$")

#: Blocks not run, each with why (page, and the reason's first words).
SKIPS = {
    ("README.md", "the two commands"),
    ("docs/index.md", "installs into the environment"),
    ("docs/tutorial.md", "points at the reader's broker"),
    ("docs/development.md", "runs the test suite itself"),
    ("docs/explanation/benchmarks.md", "minutes of benchmark"),
    ("docs/how-to/operators.md", "needs a Docker engine"),
}


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    lang: str
    code: str
    directive: str

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def page_blocks(path: Path) -> list[Block]:
    """The fenced blocks of one page, with the directive just before each (if any)."""
    page = path.relative_to(ROOT).as_posix()
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        start, indent = i, len(fence["indent"])
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith("```"):
            body.append(lines[i][indent:])
            i += 1
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        directive = DIRECTIVE.match(before)
        blocks.append(
            Block(
                page,
                start + 1,
                fence["lang"],
                "\n".join(body) + "\n",
                directive["what"] if directive else "",
            )
        )
        i += 1
    return blocks


def all_blocks() -> list[Block]:
    return [b for p in [*sorted(DOCS.rglob("*.md")), ROOT / "README.md"] for b in page_blocks(p)]


PAGES = sorted(
    {b.page for b in all_blocks() if b.lang in RUNNABLE and not b.directive.startswith("skip")}
)


def test_every_skip_is_one_listed_with_its_reason() -> None:
    skipped = [
        (b.page, b.directive.removeprefix("skip "))
        for b in all_blocks()
        if b.directive.startswith("skip")
    ]
    unlisted = [s for s in skipped if not any(s[0] == p and s[1].startswith(r) for p, r in SKIPS)]
    assert not unlisted
    unused = [
        (p, r) for p, r in SKIPS if not any(s[0] == p and s[1].startswith(r) for s in skipped)
    ]
    assert not unused


def test_every_block_is_runnable_or_says_what_it_is() -> None:
    """A block with no language would pass unseen: each names one (``text`` for output)."""
    unnamed = [b.where for b in all_blocks() if not b.lang]
    assert not unnamed


@pytest.fixture
async def page_settings(broker_url: str) -> AsyncIterator[Settings]:
    """A namespace for one page with the defaults a reader has; destroyed afterwards."""
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        url=broker_url,
        namespace=f"rmqdelay-docs-{uuid.uuid4().hex[:8]}",
        management_url=os.environ.get("RMQDELAY_TEST_MANAGEMENT_URL") or NO_MANAGEMENT,
        connect_timeout=20,
        shutdown_grace=5,
    )
    yield settings
    for namespace in (settings.namespace, f"{settings.namespace}-new"):
        gone = settings.model_copy(update={"namespace": namespace})
        await destroy(gone, await plan_destroy(gone, []))
    # What 'rmqdelay declare --policies' made (destroy leaves policies alone).
    with management_api(settings) as api:
        for policy in api.get("/api/policies/%2F").raise_for_status().json():
            if policy["name"].startswith(f"{settings.namespace}."):
                api.delete(f"/api/policies/%2F/{policy['name']}").raise_for_status()


@pytest.mark.parametrize("page", PAGES)
async def test_the_examples_of_a_page_run(
    page: str, page_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = _environment(page_settings, tmp_path)
    for key, value in env.items():
        if key.startswith("RMQDELAY_"):
            monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    # A page may set OpenTelemetry's global tracer provider (once per process, says the
    # API): a fresh slot for it, and the one before put back after the page.
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    monkeypatch.setattr(trace, "_TRACER_PROVIDER_SET_ONCE", Once())
    names: dict[str, object] = {"__name__": "__docs__", "asyncio": asyncio}  # python -m asyncio
    background: list[Background] = []
    runnable = [
        b for b in page_blocks(ROOT / page)
        if b.lang in RUNNABLE and not b.directive.startswith("skip")
    ]  # fmt: skip
    assert runnable
    try:
        await _run_blocks(runnable, names, env, tmp_path, background)
    finally:
        for name, module in list(sys.modules.items()):  # the next page writes its own myapp
            if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
                del sys.modules[name]
        for started in background:
            os.killpg(started.process.pid, signal.SIGTERM)
        for started in background:
            code = await asyncio.to_thread(started.stopped)
            # uvicorn (rmqdelay serve) shuts down cleanly, then dies of the signal it got,
            # as Unix daemons may; anything else must exit 0.
            clean = (0, -signal.SIGTERM) if "rmqdelay serve" in started.block.code else (0,)
            assert code in clean, f"{started.block.where} exited {code}:\n{started.said()[-3000:]}"


async def _run_blocks(
    blocks: list[Block],
    names: dict[str, object],
    env: dict[str, str],
    workdir: Path,
    background: list[Background],
) -> None:
    try:
        for block in blocks:
            if block.lang == "python":
                await _python(block, names, workdir)
            elif block.directive.startswith("background"):
                background.append(await _background(block, env, workdir))
            else:
                await _shell(block, env, workdir)
    except BaseException:
        for started in background:  # what the workers and servers said, to see why
            print(f"--- {started.block.where} said:\n{started.said()[-4000:]}")
        raise


def _environment(settings: Settings, workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RMQDELAY_", "PYTHON"))}
    env.update(settings_env(settings))
    # .venv's rmqdelay, and promtool where scripts/promtool puts it.
    env["PATH"] = ":".join(
        (str(ROOT / ".venv" / "bin"), PROMTOOL_DIR, str(_rabbitmqctl(workdir)), env.get("PATH", ""))
    )
    env["PYTHONPATH"] = str(workdir)
    env["NEW_BROKER_URL"] = settings.url
    return env


def _rabbitmqctl(workdir: Path) -> Path:
    """A ``rabbitmqctl`` for the test broker: its node runs where only its control command
    reaches (``RMQDELAY_TEST_BROKER_CONTROL``, e.g. scripts/broker, a Debian root)."""
    control = os.environ.get("RMQDELAY_TEST_BROKER_CONTROL")
    if not control:
        cannot("RMQDELAY_TEST_BROKER_CONTROL is not set: the docs run rabbitmqctl")
    shims = workdir / ".shims"
    shims.mkdir()
    shim = shims / "rabbitmqctl"
    shim.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = import_definitions ]; then exec {control} import "$(realpath "$2")"; fi\n'
        f'exec {control} ctl "$@"\n'
    )
    shim.chmod(0o755)
    return shims


async def _background(block: Block, env: dict[str, str], workdir: Path) -> Background:
    started = Background(block, env, workdir)
    if until := re.search(r"until=(\S+)", block.directive):
        await _answers(until[1], started)
    if says := re.search(r"says=(\S+)", block.directive):
        await asyncio.to_thread(started.wait_for, says[1])
    return started


async def _python(block: Block, names: dict[str, object], workdir: Path) -> None:
    first = block.code.splitlines()[0]
    if file := FILE_LINE.match(first):
        target = workdir / file["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        for parent in target.relative_to(workdir).parents:
            if parent != Path(".") and not (workdir / parent / "__init__.py").exists():
                (workdir / parent / "__init__.py").touch()
        target.write_text(block.code)
        return
    code = compile(block.code, block.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    try:
        async with asyncio.timeout(120):
            if code.co_flags & inspect.CO_COROUTINE:
                await eval(code, names)  # a doc example, which is what this test runs
            else:
                await asyncio.to_thread(exec, code, names)
    except Exception as e:
        raise AssertionError(f"{block.where} raised {e!r}") from e


async def _shell(block: Block, env: dict[str, str], workdir: Path) -> None:
    code, out = await asyncio.to_thread(_run_shell, block, env, workdir)
    assert code == 0, f"{block.where} exited {code}:\n{out[-4000:]}"


def _run_shell(block: Block, env: dict[str, str], workdir: Path) -> tuple[int, str]:
    """Run one block in a session of its own: a timeout kills all it started, not only bash."""
    process = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", block.code],
        cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True, text=True, errors="replace",
    )  # fmt: skip
    try:
        out, _ = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        pytest.fail(f"{block.where} did not finish within 180 s:\n{out[-4000:]}")
    return process.returncode, out


def _exec_last(code: str) -> str:
    """The block with its last command exec'd: the SIGTERM at the page's end reaches it, and
    its exit code is the block's."""
    lines = code.strip().splitlines()
    return "\n".join([*lines[:-1], f"exec {lines[-1]}"])


class Background:
    """A long-running example: its output read as it comes, to wait on and to report."""

    def __init__(self, block: Block, env: dict[str, str], workdir: Path) -> None:
        self.block = block
        self.process = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", _exec_last(block.code)],
            cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, text=True, errors="replace",
        )  # fmt: skip
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self._lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._lines.append("")  # the end
            self._changed.notify_all()

    def said(self) -> str:
        with self._changed:
            return "".join(self._lines)

    def wait_for(self, text: str, within: float = 30) -> None:
        with self._changed:
            found = self._changed.wait_for(
                lambda: text in "".join(self._lines) or self._lines[-1:] == [""], within
            )
            ended = self._lines[-1:] == [""]
        if not found or (ended and text not in self.said()):
            pytest.fail(
                f"{self.block.where} did not say {text!r} within {within} s:\n{self.said()}"
            )

    def stopped(self) -> int:
        code = self.process.wait(timeout=30)
        self._reader.join(timeout=30)
        assert self.process.stdout is not None
        self.process.stdout.close()
        return code


async def _answers(url: str, started: Background) -> None:
    """Until ``url`` answers 2xx (bounded; the process's exit ends the wait): a worker's
    /healthz does once it consumes, a server's once it reaches the broker."""
    async with httpx.AsyncClient(timeout=2) as client, asyncio.timeout(30):
        while started.process.poll() is None:
            with contextlib.suppress(httpx.TransportError):
                if (await client.get(url)).is_success:
                    return
            await asyncio.sleep(0.1)  # nothing to await: the port is another process's
    pytest.fail(f"{started.block.where} exited before {url} answered:\n{started.said()}")
