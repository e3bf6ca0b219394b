"""What ``kdcl experiment`` writes while it runs: progress for a terminal, plain lines for a log, or nothing.

In a terminal, progress bars redraw in place as usual. When stderr is not a terminal (a log file, a pipe, a CI
job), a redrawn bar leaves carriage returns and, for nested bars (``pt.Experiment`` around a reranker's scoring),
cursor movements (``ESC[A``) in the file: there each bar becomes plain lines instead, one when it starts, one at
most every :data:`INTERVAL` seconds, and one when it ends (transformers' weight-loading bars, which pt.tqdm does not
reach, are off). ``--quiet`` shows no progress at all, and none of the libraries' chatter (ir_datasets' ``[INFO]``
lines): only warnings that ask for action, errors and the results. PyTerrier's advice to set ``plan='tree'`` is
never shown: the runner chooses how systems share a first stage, and whoever runs the command cannot act on it.

Example::

    with console.configured(quiet=args.quiet):   # around the run; everything is as it was afterwards
        run()
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pyterrier as pt
from tqdm import tqdm

#: seconds between two lines of a plain progress bar
INTERVAL = 30.0

_TREE_ADVICE = "There are shared pipeline components among .* Consider setting plan='tree'"


class PlainProgress(tqdm):
    """A tqdm bar that writes whole lines (no ``\\r``, no cursor movement): for a log file or a pipe."""

    def __init__(self, *args, **kwargs):
        self._last_line = None
        kwargs.update(ascii=True, dynamic_ncols=False, ncols=None, position=None,
                      bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]")
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "":  # tqdm clearing a line before it redraws: nothing was drawn in place
            return True
        finished = self.total is not None and self.n >= self.total
        now = time.monotonic()
        if self._last_line is not None and now - self._last_line < INTERVAL and not finished:
            return True
        line = (msg or str(self)).strip()
        if line and line != getattr(self, "_last_text", None):
            self.fp.write(line + "\n")
            self.fp.flush()
            self._last_text = line
        self._last_line = now
        return True

    def moveto(self, n: int) -> None:  # nested bars print below each other: no cursor movement
        pass

    def clear(self, nolock: bool = False) -> None:  # nothing was drawn in place, so nothing to clear
        pass


class SilentProgress(tqdm):
    """A tqdm bar that never shows: ``--quiet``."""

    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def configure(quiet: bool, stream=None) -> None:
    """Sets PyTerrier's progress bars (``pt.tqdm``, which this package's bars use too) and the libraries' output
    for a run: silent with ``quiet``, plain lines when ``stream`` (default stderr) is not a terminal."""
    stream = sys.stderr if stream is None else stream
    warnings.filterwarnings("ignore", message=_TREE_ADVICE)
    if quiet:
        pt.tqdm = SilentProgress
        _quiet_libraries()
    elif not _is_terminal(stream):
        pt.tqdm = PlainProgress
    if quiet or not _is_terminal(stream):
        # transformers draws its own nested "Loading weights" bars (ESC[A in a log), which pt.tqdm does not reach
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


@contextmanager
def configured(quiet: bool, stream=None) -> Iterator[None]:
    """:func:`configure` for the duration of a ``with`` block: the bars, the warning filters and the logging level
    are restored when it ends (a CLI called in-process, as tests do, leaves the process as it found it)."""
    from transformers.utils import logging as hf_logging

    bars, disabled, hf_bars = pt.tqdm, logging.root.manager.disable, hf_logging.is_progress_bar_enabled()
    with warnings.catch_warnings():
        configure(quiet, stream)
        try:
            yield
        finally:
            pt.tqdm = bars
            logging.disable(disabled)
            if hf_bars:
                hf_logging.enable_progress_bar()


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _quiet_libraries() -> None:
    # "[INFO] Opening … with direct file access": ir_datasets sets each of its loggers to INFO when first used, so
    # only the process-wide switch reaches them
    logging.disable(logging.INFO)
