"""What a user sees in the terminal, and where everything else goes.

`run.py` calls `redirect(workdir)` once: from then on the terminal shows only the stage lines,
progress bars and results this package prints, while library chatter goes to `WORKDIR/run.log`:
Python logging (absl, Orbax, our own `log.info`), captured warnings, and whatever C/C++
libraries (XLA, TensorFlow) write to the process's stderr, which is redirected at the file
descriptor level because those libraries bypass `sys.stderr`. `sys.stderr` itself is pointed
back at the terminal, so progress bars (tqdm writes there) stay visible.

`fail(err, log_path)` is the one-line error a bad input gets on the terminal; its traceback goes
to the log.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

LOG_FILE = "run.log"


def redirect(workdir: str) -> str:
    """Sends logs and native stderr to `WORKDIR/run.log` (appending); returns its path."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOG_FILE)
    sys.stdout.flush()
    sys.stderr.flush()
    terminal = os.fdopen(os.dup(2), "w", buffering=1)
    log_file = open(path, "a", buffering=1)
    os.dup2(log_file.fileno(), 2)  # native libraries write to fd 2: now the log file
    sys.stderr = terminal
    root = logging.getLogger()
    for handler in list(root.handlers):  # absl's handler writes to the terminal
        root.removeHandler(handler)
    handler = logging.StreamHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    return path


def stage(index: int, total: int, name: str, what: str) -> None:
    """One line per stage: `[2/4] dump   teacher records ...`."""
    print(f"[{index}/{total}] {name:<6} {what}", flush=True)


def fail(err: BaseException, log_path: str | None) -> None:
    """The terminal gets `error: <message>` on one line; the log gets the traceback."""
    logging.getLogger("spatial_distill").error(
        "".join(traceback.format_exception(type(err), err, err.__traceback__)))
    message = " ".join(str(err).split()) or type(err).__name__
    where = f" (traceback in {log_path})" if log_path else ""
    print(f"error: {type(err).__name__}: {message}{where}", file=sys.stderr, flush=True)
