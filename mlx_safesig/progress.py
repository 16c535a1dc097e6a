"""Progress of long work on stderr: a tqdm bar on a terminal; in a log (stderr not a terminal,
e.g. a background run) the same status as one plain line at most every ``LOG_EVERY`` seconds, and
none for work shorter than that."""

import sys

LOG_EVERY = 60.0


class _Lines:
    """A stream for tqdm that writes each refresh as its own line (no carriage returns)."""

    def __init__(self, stream):
        self.stream, self.last = stream, None

    def write(self, text: str):
        text = text.replace("\r", "").strip()
        count = text.split("[")[0]  # the bar and counts, without the timings
        if text and count != self.last:  # closing repeats the last refresh
            self.stream.write(text + "\n")
            self.last = count

    def flush(self):
        self.stream.flush()


def progress_bar(total: int, desc: str, unit: str, initial: int = 0, enabled: bool = True):
    """A tqdm bar of ``total`` units (``initial`` done already); ``enabled`` False: silent."""
    from tqdm import tqdm

    stream = sys.stderr
    tty = stream.isatty()
    if tty:
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream,
                    disable=not enabled, dynamic_ncols=True)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=_Lines(stream),
                disable=not enabled, ascii=True, ncols=100, mininterval=LOG_EVERY,
                maxinterval=LOG_EVERY, delay=LOG_EVERY)
