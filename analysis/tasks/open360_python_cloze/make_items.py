"""Write python_cloze.jsonl: hand-written Python-idiom cloze items (context, 4 endings, gold index)."""

from __future__ import annotations

import json
from pathlib import Path

# (context, correct ending, three wrong endings). Endings are appended to the context with no delimiter.
ITEMS = [
    ("def __init__(self", "):", "]:", "}:", ")("),
    ("import os\nimport", " sys", " (", " =", " ]"),
    ("for i in range(", "10):", "10]:", "10}:", ":10("),
    ("if __name__ == '__main__", "':", "\":", "'(", "]:"),
    ("class Error(Exception", "):", "]:", "),", ")."),
    ("    return self", ".value", "]value", " (value", ":value"),
    ("try:\n    f()\nexcept", " ValueError:", " ValueError(", " = ValueError", " ValueError]"),
    ("with open(path) as", " f:", " f(", " = f", " :f"),
    ("    def __repr__", "(self):", "[self]:", "(self]:", "{self}:"),
    ("raise TypeError(", "'expected a string')", "'expected a string']", "expected a string'", "]'expected a string'"),
    ("x = [1, 2, 3", "]", ")", "}", ":"),
    ("d = {'a': 1, 'b'", ": 2}", ", 2}", ": 2]", " 2:}"),
    ("while True", ":", ";", "(", "]"),
    ("    @property\n    def", " name(self):", " (self):", " name[self]:", " name(self;"),
    ("from collections import", " namedtuple", " (", " ]", " ="),
    ("import re\npattern = re.", "compile(", "compile[", "compile)", "(compile"),
    ("    if not isinstance(value, int", "):", "]:", ")(", "}:"),
    ("lines = text.split", "('\\n')", "['\\n']", "('\\n']", "{'\\n'}"),
    ("    for key, value in self.items", "():", "[]:", "():)", "(:)"),
    ("    self.assertEqual(", "a, b)", "a, b]", "a b)", ")a, b("),
    ("print(", "'hello')", "'hello']", "hello')", "('hello'"),
    ("elif x > 0", ":", ";", ")", "]"),
    ("    else", ":", "(", ";", "="),
    ("result = []\nfor item in items:\n    result.", "append(item)", "append[item]", "(append item)", "append(item]"),
    ("    def __eq__(self, other", "):", "]:", ")(", "},"),
    ("return '%s(%r)' % (self.__class__.__name__", ", self.value)", ", self.value]", " self.value)", ".self.value)"),
    ("__all__ = [", "'main']", "'main')", "'main'}", "main']"),
    ("    def close(self):\n        self.file.", "close()", "close[]", "(close)", "close)("),
    ("assert isinstance(", "obj, dict)", "obj, dict]", "obj dict)", "(obj, dict"),
    ("import sys\nsys.", "exit(1)", "exit[1]", "(exit 1)", "exit)1("),
    ("    finally", ":", "(", ";", "]"),
    ("n = len(", "data)", "data]", "data}", ")data"),
    ("lambda x", ": x + 1", "; x + 1", "( x + 1", "] x + 1"),
    ("def main(argv=None", "):", "]:", "}:", ")("),
    ("    yield from self.", "items()", "items[]", "(items)", "items)("),
    ("    global", " _cache", " (", " =", " ]"),
    ("    return None if value is None else", " str(value)", " str[value]", " (str value)", " str(value]"),
    ("if x is not None and y is not", " None:", " None(", " None]", " None;"),
    ("s = ', '.join(", "names)", "names]", "names}", ")names"),
    ("    except OSError as", " exc:", " exc(", " exc]", " :exc"),
]


def main() -> None:
    out = Path(__file__).with_name("python_cloze.jsonl")
    with out.open("w") as f:
        for i, (context, gold, *wrong) in enumerate(ITEMS):
            choices = [gold, *wrong]
            rotate = i % 4  # put the gold ending at every index in turn
            choices = choices[-rotate:] + choices[:-rotate] if rotate else choices
            row = {"id": i, "context": context, "choices": choices, "label": choices.index(gold)}
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
