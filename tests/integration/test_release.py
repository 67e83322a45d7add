"""The release: the sdist and wheel ``python -m build`` makes pass ``twine check``, and the
wheel, installed into a fresh virtualenv, runs a task end to end with nothing borrowed
from the source tree (its own interpreter, a working directory outside the repo, no
PYTHONPATH)."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

from rmqdelay import Settings

from .helpers import settings_env

ROOT = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]

HANDLER = """\
import json

import rmqdelay


def record(task):
    print("RAN", json.dumps({"payload": task.payload, "module": rmqdelay.__file__}), flush=True)
"""


def _run(args: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300):
    done = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], cwd=out)
    made = sorted(p.name for p in out.iterdir())
    assert made == [f"rmqdelay-{VERSION}-py3-none-any.whl", f"rmqdelay-{VERSION}.tar.gz"], made
    return out


def test_the_sdist_and_wheel_pass_twine_check(dist: Path) -> None:
    done = _run(
        [sys.executable, "-m", "twine", "check", "--strict", *map(str, dist.iterdir())], cwd=dist
    )
    assert done.stdout.count("PASSED") == 2, done.stdout


def test_the_wheel_ships_the_package_its_types_and_pages_and_nothing_of_the_tests(
    dist: Path,
) -> None:
    names = set(zipfile.ZipFile(dist / f"rmqdelay-{VERSION}-py3-none-any.whl").namelist())
    shipped = {n for n in names if n.startswith("rmqdelay/") and not n.endswith(".py")}
    tracked = subprocess.run(
        ["git", "ls-files", "rmqdelay"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    wanted = {n for n in tracked if not n.endswith((".py", "ruff.toml"))}
    assert wanted <= shipped, sorted(wanted - shipped)
    assert "rmqdelay/py.typed" in shipped
    assert not [n for n in names if n.startswith(("tests/", "scripts/", "bench/", "docs/"))]


def test_the_wheel_in_a_fresh_virtualenv_runs_a_task_end_to_end(
    dist: Path, own_settings: Settings, tmp_path: Path
) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    bin_dir = env_dir / "bin"
    wheel = dist / f"rmqdelay-{VERSION}-py3-none-any.whl"
    _run([str(bin_dir / "pip"), "install", "-q", str(wheel)], cwd=tmp_path, timeout=600)

    work = tmp_path / "app"
    work.mkdir()
    (work / "release_handlers.py").write_text(HANDLER)
    # Nothing of the caller's: no RMQDELAY_* but this namespace's settings, and on the
    # path only the handler's folder.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RMQDELAY_", "PYTHON"))}
    env.update(
        settings_env(own_settings), PATH=f"{bin_dir}:{env.get('PATH', '')}", PYTHONPATH=str(work)
    )
    rmqdelay = str(bin_dir / "rmqdelay")

    assert _run([rmqdelay, "--version"], cwd=work, env=env).stdout.strip() == (
        f"rmqdelay {VERSION}"
    )
    _run([rmqdelay, "declare", "released"], cwd=work, env=env, timeout=60)
    _run(
        [rmqdelay, "schedule", "released", '{"from": "the wheel"}', "--delay", "1s"],
        cwd=work,
        env=env,
        timeout=60,
    )
    worker = subprocess.Popen(
        [rmqdelay, "consume", "released", "--handler", "release_handlers:record"],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(worker, lines), daemon=True)
    reader.start()
    log: list[str] = []
    try:
        while (line := lines.get(timeout=60)) is not None and not line.startswith("RAN "):
            log.append(line)
    except queue.Empty:
        pytest.fail("the task did not run within 60 s:\n" + "".join(log))
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
        reader.join(timeout=30)
        assert worker.stdout is not None
        worker.stdout.close()
    assert line is not None, "the worker exited before the task ran:\n" + "".join(log)
    ran = json.loads(line.removeprefix("RAN "))
    assert ran["payload"] == {"from": "the wheel"}
    assert ran["module"].startswith(str(env_dir)), ran["module"]
    assert worker.returncode == 0


def _read_lines(process: subprocess.Popen[str], into: queue.Queue[str | None]) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        into.put(line)
    into.put(None)
