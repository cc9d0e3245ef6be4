"""The terminal a user sees: stage lines and results; library logs in WORKDIR/run.log; a bad input
is one line naming the problem, its traceback in the log."""

import functools
import importlib.util
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ABSL_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")  # absl / glog line prefix


@functools.cache  # run.py defines absl flags: a second execution of it would define them twice
def load_run_py():
    spec = importlib.util.spec_from_file_location("run_py", ROOT / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_env() -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}


def run(workdir, *flags):
    env = run_env()
    return subprocess.run([sys.executable, "run.py", "--config=configs/student.py:tiny",
                           f"--workdir={workdir}", *flags], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_bad_input_is_one_line_with_the_traceback_in_the_log(tmp_path):
    r = run(tmp_path, "--config.data.source=scannet")
    assert r.returncode == 1
    assert r.stdout == ""
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines == [f"error: ValueError: config.data.scannet_dir = None: must point at exported ScanNet "
                     f"scenes when data.source='scannet' (traceback in {tmp_path}/run.log)"], r.stderr
    log = (tmp_path / "run.log").read_text()
    assert "Traceback (most recent call last)" in log and "scannet_dir" in log


def test_a_stage_prints_its_line_and_results_and_logs_the_rest(tmp_path):
    r = run(tmp_path, "--config.mode=data", "--config.data.num_train_scenes=16",
            "--config.data.num_eval_scenes=2", "--config.data.workers=1")
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout.splitlines()
    assert out[0].startswith("[1/1] data ") and any(line.startswith("  train 16 scenes") for line in out)
    assert any("tokenizer: " in line for line in out)
    assert not [line for line in (r.stdout + r.stderr).splitlines() if ABSL_LINE.match(line)]
    log = (tmp_path / "run.log").read_text()
    assert "config:" in log  # run.py's config dump went to the log, not the terminal
    # run.py re-executed itself with huge-page malloc where this host supports it.
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        thp = "[never]"
    env = run_env()
    want = load_run_py().hugepage_malloc_env(env, system=platform.system(), libc=platform.libc_ver(),
                                             thp_mode=thp) or env
    assert f"GLIBC_TUNABLES={want.get('GLIBC_TUNABLES')}\n" in log


def test_huge_page_malloc_only_where_glibc_has_the_tunable_and_the_user_set_none():
    decide = load_run_py().hugepage_malloc_env
    host = dict(system="Linux", libc=("glibc", "2.36"), thp_mode="always [madvise] never\n")
    assert decide({"A": "1"}, **host) == {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert decide({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, **host) is None
    assert decide({}, **{**host, "thp_mode": "always madvise [never]\n"}) is None
    assert decide({}, **{**host, "libc": ("glibc", "2.34")}) is None
    assert decide({}, **{**host, "libc": ("glibc", "2.40")}) is not None
    assert decide({}, **{**host, "libc": ("", "")}) is None  # musl: platform.libc_ver() knows no name
    assert decide({}, **{**host, "system": "Darwin"}) is None
