"""Showing a streamed reply in a terminal: the model's text on stdout, the safety signal on
stderr, and keys typed during a reply kept out of it."""

import contextlib
import os
import sys

from .generate import without_retracted

COLOURS = {"red": 31, "green": 32, "yellow": 33}


class Reply:
    """One streamed reply: the model's text to stdout, safety markers to stderr (coloured on a
    terminal). With ``hold`` (rollback on: text may still be withdrawn) the text is written once
    it is final, so nothing withdrawn is ever shown; with ``show=False`` nothing is written (the
    text and the trace of safety events are collected for --json)."""

    def __init__(self, hold: bool, show: bool = True):
        self.out, self.err = sys.stdout, sys.stderr
        self.colour = self.err.isatty()
        self.hold, self.show, self.text, self.last, self.trace = hold, show, "", None, []

    def mark(self, text: str, colour: str):
        """``text`` on stderr, after the text already on stdout."""
        if not self.show:
            return
        self.out.flush()
        self.err.write(f"\x1b[{COLOURS[colour]}m{text}\x1b[0m" if self.colour else text)
        self.err.flush()

    def add(self, r):
        """Take one ``GenerationResult`` of ``stream_generate``."""
        for e in r.safety.events:
            self.trace.append({"kind": e.kind, "step": e.step, "p": e.p,
                               **({"chars": len(e.text)} if e.text is not None else {}),
                               **({"nats": e.nats} if e.nats is not None else {})})
            if e.kind == "surprisal-gate":
                self.mark(f"[surprisal gate: {e.nats:.1f} nats]", "red")
            elif e.kind == "refusal-inserted":
                self.mark(f"[refusal inserted, p={e.p:.2f}]", "red")
            elif e.kind == "retracted":
                self.mark(f"[retracted {len(e.text or '')} chars]", "yellow")
        self.text = without_retracted(self.text, r.safety.events) + r.text
        self.last = r
        if self.show and not self.hold:
            self.out.write(r.text)
            self.out.flush()

    def finish(self):
        """End the reply's line (writing the held text first)."""
        if self.show:
            self.out.write((self.text if self.hold else "") + "\n")
            self.out.flush()


@contextlib.contextmanager
def keys_held_back(stream):
    """While a reply streams on a terminal, keys typed are neither echoed into it nor kept as
    the start of the next message (echo off, typed input dropped at the end)."""
    try:
        fd = stream.fileno()
        tty = os.isatty(fd)
    except (AttributeError, OSError, ValueError):
        tty = False
    if not tty:
        yield
        return
    import termios

    saved = termios.tcgetattr(fd)
    quiet = list(saved)
    quiet[3] &= ~termios.ECHO  # lflag: Ctrl-C (ISIG) still interrupts
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcflush(fd, termios.TCIFLUSH)
        termios.tcsetattr(fd, termios.TCSANOW, saved)
