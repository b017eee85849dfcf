"""Kernel tests run Triton in one of two process-wide modes, each module in the mode it needs.

Why a process per mode: Triton decides interpreter vs compiler when `triton` is first imported
(`TRITON_INTERPRET=1` then turns every `@triton.jit` function, its own `tl.sum`/`tl.cumsum` included,
into Python). Setting the variable later changes nothing, and unsetting it cannot undo it, so
it cannot be scoped to some tests of one pytest process; setting it for the whole process would
leak into every other test (and break AOT compilation, which needs the compiler mode).

So each test module here names the mode it needs (`COMPILE_MODE_MODULES` below; all others need the
interpreter). A module whose mode matches this process is collected as usual; one that does not is
collected as a single item, and the first such item runs all of them in one child pytest with the
environment they need; each item then fails with its module's failures from the child's report.
Plain `pytest tests/` thus runs the interpreter tests in a child with TRITON_INTERPRET=1 and the AOT
checks in-process; `TRITON_INTERPRET=1 pytest tests/kernels/test_x.py` runs test_x natively
(selection with -k works there).
"""
import os
import subprocess
import sys
import tempfile
from xml.etree import ElementTree

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # import the package from the checkout, installed or not

from dsv3.kernels.triton.runtime import interpreting  # noqa: E402  (imports triton in this process's mode)

COMPILE_MODE_MODULES = {"test_aot_compile.py", "test_resolve.py"}
_DEFERRED: dict[bool, list] = {True: [], False: []}  # needs interpreter? -> module paths for a child run
_CHILD_RESULTS: dict[bool, dict] = {}  # needs interpreter? -> {module file name: failure report or None}


def _needs_interpreter(path) -> bool:
    return path.name not in COMPILE_MODE_MODULES


def pytest_pycollect_makemodule(module_path, parent):
    if _needs_interpreter(module_path) != interpreting():
        _DEFERRED[_needs_interpreter(module_path)].append(module_path)
        return ChildProcessModule.from_parent(parent, path=module_path)
    return None


def _run_child(interpret: bool) -> dict:
    """Run every deferred module of one mode in one child pytest (one start-up, not one per module);
    return each module's failure report, None where all its tests passed."""
    paths = sorted(set(_DEFERRED[interpret]))
    env = dict(os.environ)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "report.xml")
        cmd = [sys.executable, "-m", "pytest", *map(str, paths), "-q", "-p", "no:cacheprovider", "-rfE",
               f"--junitxml={xml}", "-o", "junit_family=xunit1"]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        ran, failed = set(), {}
        if os.path.exists(xml):
            for case in ElementTree.parse(xml).getroot().iter("testcase"):
                name = os.path.basename(case.get("file", ""))
                ran.add(name)
                for problem in [*case.iter("failure"), *case.iter("error")]:
                    failed.setdefault(name, []).append(f"{case.get('name')}: {problem.get('message')}\n{problem.text}")
    log = f"{' '.join(cmd)} exited with {done.returncode}:\n{done.stdout[-20000:]}\n{done.stderr[-5000:]}"
    results = {}
    for path in paths:
        if path.name in failed:
            results[path.name] = "\n\n".join(failed[path.name]) + "\n\n" + log
        elif path.name not in ran or done.returncode not in (0, 1):
            results[path.name] = f"the child run reported no results for {path.name}\n" + log
        else:
            results[path.name] = None
    return results


class ChildProcessModule(pytest.File):
    def collect(self):
        mode = "TRITON_INTERPRET=1" if _needs_interpreter(self.path) else "compiler mode"
        yield ChildProcessItem.from_parent(self, name=f"[all tests, in a child process, {mode}]")


class ChildProcessFailed(Exception):
    pass


class ChildProcessItem(pytest.Item):
    def runtest(self):
        interpret = _needs_interpreter(self.path)
        if interpret not in _CHILD_RESULTS:
            _CHILD_RESULTS[interpret] = _run_child(interpret)
        failure = _CHILD_RESULTS[interpret][self.path.name]
        if failure is not None:
            raise ChildProcessFailed(failure)

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, ChildProcessFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"{self.path.name} {self.name}"
