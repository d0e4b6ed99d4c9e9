"""Path patterns: one rule for backup's ``--exclude``, restore's ``--include``/``--exclude``,
``find`` and ``rewrite`` (docs/user-guide.md, "Patterns").

A pattern is components separated by ``/``. In a component, ``*`` matches any run of
characters, ``?`` one, ``[abc]`` one of a set; a whole component ``**`` matches any number
of components, none included.

- A pattern that starts with ``/`` is anchored: it must match the whole path.
- Any other pattern matches the end of the path, at any depth: ``*.tmp``, ``cache`` and
  ``src/a/b`` behave as ``**/*.tmp``, ``**/cache`` and ``**/src/a/b`` (as in restic and
  .gitignore), so a relative pattern needs no knowledge of where the tree was mounted.
- A directory that matches takes everything below it along.

Paths are raw bytes, split into components and matched as ``os.fsdecode`` strings, so a
name that is not UTF-8 matches ``*`` like any other.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable, Sequence

from deltavault.errors import UsageError

_ANY = "**"


def components(path: bytes | str) -> list[str]:
    """The non-empty components of a path, as strings (``os.fsdecode``)."""
    text = os.fsdecode(path) if isinstance(path, bytes) else path
    return [c for c in text.split("/") if c and c != "."]


class Pattern:
    def __init__(self, text: str, *, ignore_case: bool = False) -> None:
        if not text.strip("/"):
            raise UsageError(f"empty pattern {text!r}")
        self.text = text
        self.anchored = text.startswith("/")
        parts = components(text)
        if ".." in parts:
            raise UsageError(f"pattern {text!r}: '..' is not allowed in a pattern")
        if not self.anchored and parts[0] != _ANY:
            parts.insert(0, _ANY)
        flags = re.IGNORECASE if ignore_case else 0
        self._parts: list[re.Pattern[str] | None] = [
            None if p == _ANY else re.compile(fnmatch.translate(p), flags | re.DOTALL) for p in parts]

    def __repr__(self) -> str:
        return f"Pattern({self.text!r})"

    def matches(self, comps: Sequence[str]) -> bool:
        """The whole path ``comps`` matches."""
        return self._run(comps, prefix=False)

    def may_match_below(self, comps: Sequence[str]) -> bool:
        """Some path below the directory ``comps`` could match (so a walk must enter it)."""
        return self._run(comps, prefix=True)

    def _run(self, comps: Sequence[str], *, prefix: bool) -> bool:
        """Search the states (i: pattern parts used, j: components consumed) from (0, 0),
        with a stack of our own: the recursive form went one Python frame deeper for each
        component under ``**``, so a path a few thousand directories deep (which any user
        of a backup source can make) ended find and restore --include with RecursionError.
        ``prefix``: accept once the components run out with parts left (more could follow);
        else only when both run out together."""
        parts = self._parts
        n, m = len(parts), len(comps)
        seen: set[tuple[int, int]] = set()
        todo = [(0, 0)]
        while todo:
            state = todo.pop()
            if state in seen:
                continue
            seen.add(state)
            i, j = state
            if j == m and (i < n if prefix else i == n):
                return True
            if i == n:
                continue
            rx = parts[i]
            if rx is None:  # "**": skip it, or let it take one more component
                todo.append((i + 1, j))
                if j < m:
                    todo.append((i, j + 1))
            elif j < m and rx.match(comps[j]) is not None:
                todo.append((i + 1, j + 1))
        return False


class PatternSet:
    """Several patterns: a path matches if any does. ``used`` records which ever matched,
    so a command can name the patterns that matched nothing."""

    def __init__(self, texts: Iterable[str] = (), *, ignore_case: Iterable[str] = ()) -> None:
        self.patterns = [Pattern(t) for t in texts] + [Pattern(t, ignore_case=True) for t in ignore_case]
        self.used: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def matches(self, comps: Sequence[str]) -> bool:
        hit = False
        for p in self.patterns:
            if p.matches(comps):
                self.used.add(p.text)
                hit = True
        return hit

    def may_match_below(self, comps: Sequence[str]) -> bool:
        return any(p.may_match_below(comps) for p in self.patterns)

    def unused(self) -> list[str]:
        return [p.text for p in self.patterns if p.text not in self.used]


def read_pattern_file(path: str) -> list[str]:
    """Patterns from a file (``--exclude-file``): one a line; blank lines and lines starting
    with ``#`` are skipped, surrounding blanks stripped (use ``[ ]`` for a blank at an end)."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read the pattern file {path}: {exc.strerror or exc}") from exc
    return [s for s in (ln.strip() for ln in lines) if s and not s.startswith("#")]
