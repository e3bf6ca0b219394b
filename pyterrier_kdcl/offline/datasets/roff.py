"""roff (man(7) macros) → plain readable text, in pure Python so every machine builds the same bytes.

Handles what the man pages of Debian's documentation packages use: the man macros, pod2man's and
docbook's preambles (string definitions, ``.ie n`` / ``.el`` conditionals, ``.de`` macro bodies, which
are skipped), tbl tables, escapes and special characters. It does not typeset: the output is a list of
``(section heading, paragraph text)`` pairs, which is all a retrieval collection needs. mdoc(7) pages
(``.Dd``/``.Nm``) are not handled; :func:`is_mdoc` lets callers skip them.
"""

from __future__ import annotations

import re

# special characters \(xx and \[name]; ASCII where one reads naturally, otherwise the Unicode sign
SPECIAL_CHARS = {
    "aq": "'", "dq": '"', "lq": '"', "rq": '"', "oq": "'", "cq": "'", "Bq": '"', "bq": ",",
    "em": "--", "en": "-", "hy": "-", "mi": "-", "ti": "~", "ha": "^", "rs": "\\", "sl": "/",
    "ga": "`", "aa": "'", "a-": "-", "ul": "_", "ru": "_", "bv": "|", "or": "|", "ba": "|", "br": "|",
    "bu": "*", "pc": ".", "ci": "o", "sq": "#", "lB": "[", "rB": "]", "lC": "{", "rC": "}",
    "la": "<", "ra": ">", "fo": "<", "fc": ">", "Fo": "<<", "Fc": ">>", "at": "@", "Do": "$",
    "co": "(C)", "rg": "(R)", "tm": "(TM)", "de": "°", "mu": "x", "di": "/", "pl": "+", "eq": "=",
    "<=": "<=", ">=": ">=", "!=": "!=", "==": "==", "->": "->", "<-": "<-", "rA": "=>", "lA": "<=",
    "+-": "+-", "sc": "§", "ps": "¶", "dg": "+", "dd": "++", "12": "1/2", "14": "1/4", "34": "3/4",
    "Eu": "EUR", "eu": "EUR", "Po": "GBP", "Ye": "JPY", "ct": "c", "ss": "ss", "ae": "ae", "AE": "AE",
    "u": "u", "en-dash": "-", "em-dash": "--", "nbsp": " ", "NO": "~", "tno": "~", "OK": "ok",
}
# accented letters: \('e and friends
_ACCENTS = {"'": "\u0301", "`": "\u0300", "^": "\u0302", ":": "\u0308", "~": "\u0303", ",": "\u0327", "o": "\u030a"}

_SKIP_UNTIL_DOTS = {"de", "de1", "am", "ig", "dei", "ami", "am1"}
_TABLE = ("TS", "TE")
_PARAGRAPH_BREAKS = {"PP", "LP", "P", "sp", "TP", "TQ", "HP", "IP", "Ip", "RS", "RE", "nf", "fi", "EX",
                     "EE", "Vb", "Ve", "Sp", "br", "SY", "YS", "bp", "ne"}
_FONT_PAIRS = {"BR", "RB", "BI", "IB", "IR", "RI"}


def is_mdoc(source: str) -> bool:
    """True for pages written with the mdoc(7) macros, which :func:`sections` does not understand."""
    return re.search(r"^\.(Dd|Dt|Nm)\b", source, flags=re.M) is not None


def is_redirect(source: str) -> bool:
    """True for alias pages: nothing but comments and a ``.so other/page`` line."""
    lines = [ln for ln in source.splitlines() if ln.strip() and not re.match(r"^[.']\s*\\\"", ln)]
    return len(lines) <= 2 and any(re.match(r"^[.']\s*so\s", ln) for ln in lines)


def split_args(rest: str) -> list[str]:
    """Macro arguments: blank-separated, double quotes group words, ``""`` inside quotes is a quote."""
    args, i, n = [], 0, len(rest)
    while i < n:
        while i < n and rest[i] in " \t":
            i += 1
        if i >= n:
            break
        if rest[i] == '"':
            i += 1
            buf = []
            while i < n:
                if rest[i] == '"':
                    if i + 1 < n and rest[i + 1] == '"':
                        buf.append('"')
                        i += 2
                        continue
                    i += 1
                    break
                buf.append(rest[i])
                i += 1
            args.append("".join(buf))
        else:
            j = i
            while j < n and rest[j] not in " \t":
                j += 2 if rest[j] == "\\" else 1
            args.append(rest[i:j])
            i = j
    return args


class _Escapes:
    """Expands escapes in one line of text, using the string definitions (``.ds``) seen so far."""

    _DELIMITED = "hvwlLxXNoDZbSAB"  # escapes taking a quoted argument: \h'…' and friends: dropped
    _ONE_ARG = "fsnkzFgmMYV*$"

    def __init__(self) -> None:
        self.strings: dict[str, str] = {"lq": '"', "rq": '"', "R": "(R)", "Tm": "(TM)", "Aq": "'"}

    def expand(self, text: str, depth: int = 0) -> str:
        out, i, n = [], 0, len(text)
        while i < n:
            c = text[i]
            if c != "\\":
                out.append(c)
                i += 1
                continue
            if i + 1 >= n:
                break
            e = text[i + 1]
            i += 2
            if e in "\"#":  # comment to end of line
                break
            if e in "-":
                out.append("-")
            elif e in "e\\E":
                out.append("\\")
            elif e in " ~0t":
                out.append(" ")
            elif e in "&)%|^:c{}pdruaRjO!?":
                pass
            elif e in ".'`":
                out.append({"'": "'", "`": "`", ".": "."}[e])
            elif e == "(":
                out.append(self._special(text[i:i + 2]))
                i += 2
            elif e == "[":
                j = text.find("]", i)
                j = n if j < 0 else j
                out.append(self._special(text[i:j]))
                i = j + 1
            elif e in self._DELIMITED:
                if i < n:
                    j = text.find(text[i], i + 1)
                    i = n if j < 0 else j + 1
            elif e in self._ONE_ARG:
                name, i = self._name(text, i, e)
                if e == "*" and depth < 8:
                    out.append(self.expand(self.strings.get(name, ""), depth + 1))
            else:  # unknown escape: the character itself
                out.append(e)
        return "".join(out)

    @staticmethod
    def _name(text: str, i: int, escape: str) -> tuple[str, int]:
        n = len(text)
        if escape == "s" and i < n and text[i] in "+-":
            i += 1
        if i >= n:
            return "", i
        if text[i] == "(":
            return text[i + 1:i + 3], i + 3
        if text[i] == "[":
            j = text.find("]", i)
            j = n if j < 0 else j
            return text[i + 1:j], j + 1
        if escape == "s" and text[i].isdigit():  # \s12 or \s1
            j = i + 1
            if j < n and text[j].isdigit() and text[i] in "123":
                j += 1
            return text[i:j], j
        if escape == "s" and text[i] == "'":
            j = text.find("'", i + 1)
            return text[i + 1:j], (n if j < 0 else j + 1)
        return text[i], i + 1

    @staticmethod
    def _special(name: str) -> str:
        if name in SPECIAL_CHARS:
            return SPECIAL_CHARS[name]
        if len(name) == 2 and name[0] in _ACCENTS and name[1].isalpha():
            import unicodedata
            return unicodedata.normalize("NFC", name[1] + _ACCENTS[name[0]])
        if name.startswith("u") and re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name):
            return chr(int(name[1:], 16))
        return ""


def _condition(cond: str) -> bool | None:
    """nroff is true and troff false; other conditions are unknown (None): their bodies are dropped."""
    return {"n": True, "t": False, "!n": False, "!t": True}.get(cond)


class _Reader:
    """Turns roff source into (section, paragraph) pairs."""

    def __init__(self, source: str) -> None:
        # a backslash at the end of a line continues it on the next
        self.lines = re.sub(r"(?<!\\)((?:\\\\)*)\\\n", r"\1", source.replace("\r", "")).split("\n")
        self.esc = _Escapes()
        self.sections: list[tuple[str, list[str]]] = [("", [])]
        self.para: list[str] = []
        self.next_line_is_tag = False
        self.else_allowed = False

    # paragraphs -----------------------------------------------------------
    def _flush(self) -> None:
        text = re.sub(r"\s+", " ", " ".join(self.para)).strip()
        if text:
            self.sections[-1][1].append(text)
        self.para = []

    def _text(self, raw: str) -> None:
        self.para.append(self.esc.expand(raw))
        if self.next_line_is_tag:
            self.next_line_is_tag = False
            self._flush()

    # requests -------------------------------------------------------------
    def run(self) -> list[tuple[str, list[str]]]:
        i = 0
        while i < len(self.lines):
            i = self._line(self.lines[i], i)
        self._flush()
        return [(name, paras) for name, paras in self.sections if paras or name]

    def _line(self, line: str, i: int) -> int:
        if not line.strip():
            self._flush()
            return i + 1
        if line[0] not in ".'":
            self._text(line)
            return i + 1
        body = line[1:].lstrip(" \t")
        m = re.match(r"([^\s\\]*)\s*(.*)", body)
        name, rest = (m.group(1), m.group(2)) if m else ("", "")
        if not name:  # comments (.\\"), block ends (.\\}), empty requests
            return i + 1
        if name in _SKIP_UNTIL_DOTS:
            words = rest.split('\\"')[0].split()
            end = ".." if name == "ig" or len(words) < 2 else "." + words[1]
            if name == "ig" and words:
                end = "." + words[0]
            j = i + 1
            while j < len(self.lines) and self.lines[j].strip() not in (end, "." + end.lstrip(".")):
                j += 1
            return j + 1
        if name in _TABLE[:1]:
            return self._table(i)
        if name in ("ie", "if"):
            return self._conditional(name, rest, i)
        if name == "el":
            return self._body(rest, i, run=self.else_allowed)
        if name in ("ds", "ds1", "as"):
            parts = rest.split(None, 1)
            if parts:
                value = parts[1] if len(parts) > 1 else ""
                value = value[1:] if value.startswith('"') else value
                old = self.esc.strings.get(parts[0], "") if name == "as" else ""
                self.esc.strings[parts[0]] = old + value
            return i + 1
        return self._macro(name, rest, i)

    def _conditional(self, name: str, rest: str, i: int) -> int:
        m = re.match(r"(!?\S)\s*(.*)", rest)
        if not m:
            return i + 1
        cond = m.group(1) if m.group(1) in ("n", "t", "!n", "!t") else None
        # a condition we cannot evaluate (registers, string comparisons, \n(.H>23 …): drop its body
        holds = _condition(cond) if cond else None
        remainder = m.group(2) if cond else re.sub(r"^\S+\s*", "", rest)
        if name == "ie":
            self.else_allowed = holds is False
        return self._body(remainder, i, run=bool(holds))

    def _body(self, body: str, i: int, run: bool) -> int:
        """A conditional body: one line, or a ``\\{ … \\}`` block over several lines."""
        body = body.strip()
        block = "\\{" in body
        body = body.replace("\\{", "", 1).strip() if body.startswith("\\{") else body
        lines = [body] if body else []
        j = i + 1
        if block and "\\}" not in body:
            depth = 1
            while j < len(self.lines) and depth:
                line = self.lines[j]
                depth += line.count("\\{") - line.count("\\}")
                lines.append(line)
                j += 1
        if run:
            self._run_lines([line.replace("\\}", "").strip() for line in lines])
        return j

    def _run_lines(self, lines: list[str]) -> None:
        saved, self.lines = self.lines, lines
        k = 0
        while k < len(lines):
            k = self._line(lines[k], k) if lines[k] else k + 1
        self.lines = saved

    def _macro(self, name: str, rest: str, i: int) -> int:
        args = split_args(rest)
        if name in _PARAGRAPH_BREAKS:
            self._flush()
        if name in ("SH", "Sh", "SS"):
            heading = re.sub(r"\s+", " ", self.esc.expand(" ".join(args))).strip()
            if name == "SS":
                self.para.append(heading)
                self._flush()
            else:
                self._flush()
                self.sections.append((heading.upper(), []))
        elif name in ("B", "I", "R", "SM", "SB"):
            if args:  # without arguments the font applies to the next line, which is plain text here
                self._text(" ".join(args))
        elif name in _FONT_PAIRS:
            self._text("".join(args))
        elif name in ("TP", "TQ"):
            self.next_line_is_tag = True
        elif name in ("IP", "Ip", "HP") and args:
            tag = self.esc.expand(args[0]).strip()
            if tag and tag not in ("*", "-", "o"):
                self.para.append(tag)
                self._flush()
        elif name in ("UR", "MT", "UE", "ME"):
            pass  # the link text sits on the lines between; the address itself is not prose
        elif name == "OP" and args:
            self._text("[" + " ".join(args) + "]")
        elif name == "SY" and args:
            self._text(args[0])
        elif name == "Sx" and args:
            self._text(" ".join(args))
        return i + 1

    def _table(self, i: int) -> int:
        """tbl: skip options and format lines, keep the cells of each row as one paragraph."""
        self._flush()
        j = i + 1
        lines = self.lines
        if j < len(lines) and lines[j].rstrip().endswith(";"):
            j += 1
        while j < len(lines) and not lines[j].rstrip().endswith(".") and not lines[j].startswith(".TE"):
            j += 1
        j += 1
        tab = "\t"
        while j < len(lines) and not lines[j].startswith(".TE"):
            line = lines[j]
            j += 1
            if line.startswith(".T&"):  # a new format section follows
                while j < len(lines) and not lines[j].rstrip().endswith("."):
                    j += 1
                j += 1
                continue
            if line[:1] in ".'":
                self._run_lines([line])
                continue
            if line.strip() in ("_", "=", ""):
                self._flush()
                continue
            cells = []
            while line.endswith("T{") or "T{" in line:  # text blocks T{ … T}
                before, _, after = line.partition("T{")
                cells.append(before.replace(tab, " "))
                block = [after]
                while j < len(lines) and not lines[j].startswith("T}"):
                    block.append(lines[j])
                    j += 1
                cells.append(" ".join(x for x in block if x[:1] not in ".'"))
                line = lines[j][2:] if j < len(lines) else ""
                j += 1
            cells.append(line.replace(tab, " "))
            self._text(" ".join(cells))
            self._flush()
        self._flush()
        return j + 1


def sections(source: str) -> list[tuple[str, list[str]]]:
    """Parse a man page into ``[(SECTION NAME, [paragraph, …]), …]`` in page order.

    >>> page = '.TH read 2\\n.SH NAME\\nread \\\\- read from a file descriptor\\n.SH DESCRIPTION\\n.BR read ()\\nreads.'
    >>> sections(page)
    [('NAME', ['read - read from a file descriptor']), ('DESCRIPTION', ['read() reads.'])]
    """
    return _Reader(source).run()
