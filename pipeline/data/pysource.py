"""Real text with no download: instruction records from Python source trees (``optsel prepare`` source ``pysource``).

Every machine with Python holds a paired corpus: the standard library (and the installed packages)
give functions with their docstrings, module docstrings, licence and README texts. A record:

- prompt: ``# module <dotted.name>``, the function's signature as ``ast.unparse`` gives it
  (``def name(args) -> ret:``, under ``class Name:`` for a method) and an opening ``\"\"\"``;
- response: its docstring, cleaned with ``inspect.cleandoc`` (``docstring: whole`` or
  ``first_paragraph``; a longer one is cut at the last paragraph that fits ``max_doc_chars``).

Kinds (the ``kind`` column):

- ``target``: clean pairs from the modules under ``target_prefixes`` (default ``email``, ``json``, ``http``);
- ``corrupted``: a target prompt paired with the docstring of ANOTHER function of similar length (a
  mismatched pair, the commonest label noise of scraped SFT data);
- ``distractor/pairs``: clean pairs from every other module;
- ``distractor/text``: licence, README and plain-text files and module docstrings as language-modelling
  records (empty prompt, the text as response, chunked at paragraphs to ``max_text_chars``).

Filters, each counted in :class:`SourceStats` (the prepare report's ``source_stats``): docstring length
(``min_doc_chars`` .. ``max_doc_chars``), language (ASCII-mostly English: a share of letters and a
stop-word test, :func:`looks_english`), dedup (exact text hash, then near-duplicates by normalised
text: lowercase, words only), private names skipped (a ``_name`` function, class or module part),
files over ``max_file_bytes`` skipped, symlinks never followed out of a root (directory links are
never walked), undecodable or unparsable files skipped. Excluded folders (``exclude_dirs``): test
suites, site-packages, idlelib, tkinter, turtledemo and the like.

The val split holds held-out target functions only; no function (module + qualname) and no docstring
(exact or normalised hash) is in both splits: :func:`check_disjoint` raises otherwise. The mix is
seeded: train has ``target_fraction`` clean targets and ``corrupted_fraction`` corrupted pairs, the rest
distractors (``text_share`` of them text), as many as the pools allow (or ``num_train``).
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import os
import random
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Literal

from optsel.pipeline.data.records import Rendered

#: folders never walked (matched against each folder's name)
DEFAULT_EXCLUDES = [
    "test",
    "tests",
    "idle_test",
    "site-packages",
    "dist-packages",
    "idlelib",
    "tkinter",
    "turtledemo",
    "lib2to3",
    "ensurepip",
    "lib-dynload",
    "config-*",
    "__pycache__",
    "__phello__",
    ".*",
]
#: file names read as plain text (distractor/text)
DEFAULT_TEXT_FILES = ["LICENSE*", "LICENCE*", "COPYING*", "README*", "NOTICE*", "*.txt", "*.rst", "*.md"]
STOP_WORDS = frozenset(
    "the a an of to is and in if for this be it or with that are as by on not from returns return "
    "which when will can given its at".split()
)
_WORD = re.compile(r"[a-z]+")


@dataclass(kw_only=True)
class PySourceConfig:
    """Source ``pysource``: which trees are read, how records are filtered and mixed (module docstring)."""

    include_stdlib: bool = True  #: read the running interpreter's stdlib (sysconfig's "stdlib" path)
    roots: list[str] = field(default_factory=list)  #: extra folders to read, e.g. a site-packages
    #: dotted module prefixes whose functions are the target family
    target_prefixes: list[str] = field(default_factory=lambda: ["email", "json", "http"])
    exclude_dirs: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDES))  #: folder-name patterns skipped
    text_files: list[str] = field(default_factory=lambda: list(DEFAULT_TEXT_FILES))  #: file-name patterns read as text
    docstring: Literal["whole", "first_paragraph"] = (
        "whole"  #: the response: the whole docstring or its first paragraph
    )
    min_doc_chars: int = 40  #: shorter docstrings (after cleaning and cutting) are skipped
    max_doc_chars: int = 1200  #: longer docstrings are cut at a paragraph; a first paragraph over it is skipped
    max_text_chars: int = 1500  #: distractor/text records are chunked at paragraphs to at most this many chars
    max_file_bytes: int = 1 << 20  #: files larger than this are skipped unread
    min_letter_share: float = 0.6  #: language filter: share of letters among non-space chars
    min_ascii_share: float = 0.97  #: language filter: share of ASCII chars
    min_stop_share: float = 0.05  #: language filter: share of English stop words among the words
    val_fraction: float = 0.15  #: share of the target functions held out for val
    target_fraction: float = 0.1  #: share of train that is clean target pairs
    corrupted_fraction: float = 0.05  #: share of train that is mismatched target pairs
    text_share: float = 0.4  #: share of the distractors that are distractor/text records
    num_train: int | None = None  #: train records; None: as many as the pools allow at these fractions
    length_ratio: float = 1.5  #: corrupted: the foreign docstring's length is within this factor of the true one's

    def __post_init__(self) -> None:
        for name in ("val_fraction", "target_fraction", "corrupted_fraction", "text_share"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name}: must be in [0, 1), got {value}")
        if self.target_fraction <= 0.0:
            raise ValueError(f"target_fraction: must be > 0, got {self.target_fraction}")
        if self.target_fraction + self.corrupted_fraction > 1.0:
            raise ValueError(
                f"corrupted_fraction: target_fraction + corrupted_fraction must be <= 1, got "
                f"{self.target_fraction} + {self.corrupted_fraction}"
            )
        if not 1 <= self.min_doc_chars <= self.max_doc_chars:
            raise ValueError(
                f"min_doc_chars: must be in [1, max_doc_chars={self.max_doc_chars}], got {self.min_doc_chars}"
            )
        if self.max_text_chars < 64:
            raise ValueError(f"max_text_chars: must be >= 64, got {self.max_text_chars}")
        if self.max_file_bytes < 1:
            raise ValueError(f"max_file_bytes: must be >= 1, got {self.max_file_bytes}")
        if self.length_ratio < 1.0:
            raise ValueError(f"length_ratio: must be >= 1, got {self.length_ratio}")
        if self.num_train is not None and self.num_train < 1:
            raise ValueError(f"num_train: must be >= 1 (or null), got {self.num_train}")
        if not self.include_stdlib and not self.roots:
            raise ValueError("roots: at least one root is required when include_stdlib is false")
        if not self.target_prefixes:
            raise ValueError("target_prefixes: at least one dotted module prefix is required")

    def root_paths(self) -> list[Path]:
        """The folders read: the stdlib (if included), then ``roots``."""
        paths = [Path(sysconfig.get_paths()["stdlib"])] if self.include_stdlib else []
        return paths + [Path(r) for r in self.roots]

    def is_target(self, module: str) -> bool:
        return any(module == p or module.startswith(p + ".") for p in self.target_prefixes)


@dataclass
class SourceStats:
    """What the walk read and dropped (counts; the prepare report's ``source_stats``)."""

    py_files: int = 0
    text_files: int = 0
    functions: int = 0  # public documented functions seen
    skipped_large: int = 0  # files over max_file_bytes
    skipped_undecodable: int = 0
    skipped_unparsable: int = 0
    skipped_symlink_outside: int = 0  # file symlinks leading out of their root
    skipped_private: int = 0  # _private functions/classes (modules: not walked)
    skipped_short: int = 0
    skipped_long: int = 0
    skipped_language: int = 0
    skipped_duplicate: int = 0  # exact docstring/text hash, or same module + qualname
    skipped_near_duplicate: int = 0
    unpaired_corrupted: int = 0  # corrupted slots with no foreign docstring of similar length
    pools: dict[str, int] = field(default_factory=dict)  # kind -> records available


@dataclass(frozen=True)
class Pair:
    """A documented function: where it is, its prompt and its (cleaned) docstring."""

    module: str
    qualname: str
    origin: str  # path:line
    prompt: str
    doc: str

    @property
    def key(self) -> str:
        return f"{self.module}:{self.qualname}"


@dataclass(frozen=True)
class Text:
    """A plain-text chunk (licence, README, module docstring)."""

    origin: str
    text: str


@dataclass
class Corpus:
    """The filtered, deduplicated pools of one walk."""

    targets: list[Pair] = field(default_factory=list)
    others: list[Pair] = field(default_factory=list)
    texts: list[Text] = field(default_factory=list)
    stats: SourceStats = field(default_factory=SourceStats)


@dataclass(frozen=True)
class PySample:
    """One record of the mix: its split, kind, text and which function(s) it came from."""

    split: str
    kind: str
    prompt: str
    response: str
    origin: str
    keys: tuple[str, ...] = ()  # module:qualname of the functions whose prompt or docstring it holds


# -- text tests ------------------------------------------------------------------------------------------
def exact_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def normalised_hash(text: str) -> str:
    """Hash of the text's lowercase words (punctuation, digits and spacing ignored): near-duplicates collide."""
    return exact_hash(" ".join(_WORD.findall(text.lower())))


def looks_english(text: str, cfg: PySourceConfig) -> bool:
    """ASCII-mostly English: enough ASCII, enough letters among non-space chars, enough stop words."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return False
    if sum(c.isascii() for c in text) < cfg.min_ascii_share * len(text):
        return False
    if sum(c.isalpha() for c in chars) < cfg.min_letter_share * len(chars):
        return False
    words = _WORD.findall(text.lower())
    return bool(words) and sum(w in STOP_WORDS for w in words) >= max(1.0, cfg.min_stop_share * len(words))


def paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def cut_at_paragraphs(text: str, limit: int) -> str:
    """The leading paragraphs of ``text`` that fit ``limit`` chars ("" when the first does not)."""
    out = ""
    for p in paragraphs(text):
        joined = f"{out}\n\n{p}" if out else p
        if len(joined) > limit:
            break
        out = joined
    return out


def chunks(text: str, limit: int) -> list[str]:
    """``text`` in chunks of whole paragraphs of at most ``limit`` chars (a longer paragraph is cut at lines,
    then hard)."""
    pieces: list[str] = []
    for p in paragraphs(text):
        if len(p) <= limit:
            pieces.append(p)
            continue
        line_chunk = ""
        for line in p.splitlines():
            while len(line) > limit:
                pieces.append(line[:limit])
                line = line[limit:]
            if line_chunk and len(line_chunk) + 1 + len(line) > limit:
                pieces.append(line_chunk)
                line_chunk = ""
            line_chunk = f"{line_chunk}\n{line}" if line_chunk else line
        if line_chunk:
            pieces.append(line_chunk)
    out: list[str] = []
    for piece in pieces:
        if out and len(out[-1]) + 2 + len(piece) <= limit:
            out[-1] += "\n\n" + piece
        else:
            out.append(piece)
    return out


# -- the walk ------------------------------------------------------------------------------------------
def module_name(rel: Path) -> str:
    """``email/mime/text.py`` → ``email.mime.text``; ``json/__init__.py`` → ``json``."""
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _walk(root: Path, cfg: PySourceConfig, stats: SourceStats) -> Iterator[tuple[Path, Path]]:
    """(path, path relative to root) of the files under ``root``, sorted; excluded and private folders
    skipped, folder symlinks never walked, file symlinks only when they resolve inside ``root``."""
    real_root = root.resolve()
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(
            d for d in dirs if not any(fnmatch(d, pat) for pat in cfg.exclude_dirs) and not d.startswith("_")
        )
        for name in sorted(files):
            path = Path(folder) / name
            if path.is_symlink():
                target = path.resolve()
                if not target.is_relative_to(real_root):
                    stats.skipped_symlink_outside += 1
                    continue
            if not path.is_file():
                continue
            yield path, path.relative_to(root)


def _read(path: Path, cfg: PySourceConfig, stats: SourceStats) -> str | None:
    if path.stat().st_size > cfg.max_file_bytes:
        stats.skipped_large += 1
        return None
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        stats.skipped_undecodable += 1
        return None


def signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """``def name(args) -> ret:`` as ``ast.unparse`` writes it (decorators and body dropped)."""
    stub = type(node)(
        name=node.name, args=node.args, body=[ast.Pass()], decorator_list=[], returns=node.returns, type_comment=None
    )
    if "type_params" in node._fields:  # Python 3.12+
        setattr(stub, "type_params", [])  # noqa: B010  (an attribute the running Python has; typeshed is 3.11)
    return ast.unparse(ast.fix_missing_locations(stub)).splitlines()[0]


def _functions(tree: ast.Module) -> Iterator[tuple[str | None, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(class name or None, function) for module-level functions and methods of module-level classes."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield None, node
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield node.name, sub


def prompt_of(module: str, cls: str | None, sig: str) -> str:
    """The prompt of a function: its module, class line (a method) and signature, then an opening docstring."""
    if cls is None:
        return f'# module {module}\n{sig}\n    """'
    return f'# module {module}\nclass {cls}:\n    {sig}\n        """'


def _clean_doc(raw: str, cfg: PySourceConfig, stats: SourceStats) -> str | None:
    doc = inspect.cleandoc(raw)
    if cfg.docstring == "first_paragraph":
        doc = paragraphs(doc)[0] if paragraphs(doc) else ""
        if len(doc) > cfg.max_doc_chars:
            stats.skipped_long += 1
            return None
    elif len(doc) > cfg.max_doc_chars:
        doc = cut_at_paragraphs(doc, cfg.max_doc_chars)
        if not doc:
            stats.skipped_long += 1
            return None
    if len(doc) < cfg.min_doc_chars:
        stats.skipped_short += 1
        return None
    if not looks_english(doc, cfg):
        stats.skipped_language += 1
        return None
    return doc


class _Dedup:
    """Exact and normalised hashes seen so far (and module:qualname keys)."""

    def __init__(self, stats: SourceStats) -> None:
        self.stats, self.exact, self.near, self.keys = stats, set[str](), set[str](), set[str]()

    def fresh(self, text: str, key: str | None = None) -> bool:
        e, n = exact_hash(text), normalised_hash(text)
        if e in self.exact or (key is not None and key in self.keys):
            self.stats.skipped_duplicate += 1
            return False
        if n in self.near:
            self.stats.skipped_near_duplicate += 1
            return False
        self.exact.add(e)
        self.near.add(n)
        if key is not None:
            self.keys.add(key)
        return True


def collect(cfg: PySourceConfig) -> Corpus:
    """Walk the roots (sorted, deterministic) into filtered, deduplicated target / other / text pools."""
    corpus = Corpus()
    stats = corpus.stats
    pair_seen, text_seen = _Dedup(stats), _Dedup(stats)
    for root in cfg.root_paths():
        if not root.is_dir():
            raise FileNotFoundError(f"pysource root not found: {root} (pysource.roots / include_stdlib)")
        for path, rel in _walk(root, cfg, stats):
            if path.suffix == ".py":
                if any(part.startswith("_") for part in rel.with_suffix("").parts[:-1]) or (
                    rel.stem.startswith("_") and rel.stem != "__init__"
                ):
                    stats.skipped_private += 1
                    continue
                stats.py_files += 1
                _read_module(path, rel, cfg, corpus, pair_seen, text_seen)
            elif any(fnmatch(path.name, pat) for pat in cfg.text_files):
                text = _read(path, cfg, stats)
                if text is None:
                    continue
                stats.text_files += 1
                _add_text(str(path), text, cfg, corpus, text_seen)
    stats.pools = {
        "target": len(corpus.targets),
        "distractor/pairs": len(corpus.others),
        "distractor/text": len(corpus.texts),
    }
    return corpus


def _add_text(origin: str, text: str, cfg: PySourceConfig, corpus: Corpus, seen: _Dedup) -> None:
    for i, chunk in enumerate(chunks(text, cfg.max_text_chars)):
        if len(chunk) < cfg.min_doc_chars:
            corpus.stats.skipped_short += 1
        elif not looks_english(chunk, cfg):
            corpus.stats.skipped_language += 1
        elif seen.fresh(chunk):
            corpus.texts.append(Text(f"{origin} chunk {i}", chunk))


def _read_module(
    path: Path, rel: Path, cfg: PySourceConfig, corpus: Corpus, pair_seen: _Dedup, text_seen: _Dedup
) -> None:
    stats = corpus.stats
    source = _read(path, cfg, stats)
    if source is None:
        return
    try:
        tree = ast.parse(source, filename=str(path))
    except (SyntaxError, ValueError):
        stats.skipped_unparsable += 1
        return
    module = module_name(rel)
    module_doc = ast.get_docstring(tree)
    if module_doc:
        _add_text(f"{path} (module docstring)", inspect.cleandoc(module_doc), cfg, corpus, text_seen)
    pool = corpus.targets if cfg.is_target(module) else corpus.others
    for cls, node in _functions(tree):
        raw = ast.get_docstring(node, clean=False)
        if raw is None:
            continue
        if node.name.startswith("_") or (cls is not None and cls.startswith("_")):
            stats.skipped_private += 1
            continue
        stats.functions += 1
        doc = _clean_doc(raw, cfg, stats)
        if doc is None:
            continue
        qualname = node.name if cls is None else f"{cls}.{node.name}"
        if not pair_seen.fresh(doc, f"{module}:{qualname}"):
            continue
        pool.append(Pair(module, qualname, f"{path}:{node.lineno}", prompt_of(module, cls, signature(node)), doc))


# -- the mix -------------------------------------------------------------------------------------------
class SplitOverlap(ValueError):
    """A function or a docstring is in both train and val."""


def _record_hashes(sample: PySample) -> set[str]:
    return {exact_hash(sample.response), normalised_hash(sample.response)}


def check_disjoint(train: list[PySample], val: list[PySample]) -> None:
    """Raise SplitOverlap when a val function (module:qualname) or a val docstring (exact or normalised
    hash) also occurs in train."""
    keys = {k for s in train for k in s.keys}
    hashes = set().union(*(_record_hashes(s) for s in train)) if train else set()
    for s in val:
        shared = keys.intersection(s.keys)
        if shared:
            raise SplitOverlap(f"function {sorted(shared)[0]} is in both train and val ({s.origin})")
        if _record_hashes(s) & hashes:
            raise SplitOverlap(f"the docstring of {s.origin} is in both train and val")


def _donor(pair: Pair, donors: list[Pair], ratio: float, rng: random.Random) -> Pair | None:
    """A random donor (not ``pair``, another docstring) whose docstring length is within ``ratio``."""
    n = len(pair.doc)
    fits = [d for d in donors if d.key != pair.key and d.doc != pair.doc and n / ratio <= len(d.doc) <= n * ratio]
    return rng.choice(fits) if fits else None


def mix(corpus: Corpus, cfg: PySourceConfig, seed: int) -> tuple[list[PySample], list[PySample]]:
    """(train, val) samples: val = held-out target functions; train = the seeded mix (module docstring)."""
    rng = random.Random(seed)
    targets = list(corpus.targets)
    rng.shuffle(targets)
    if len(targets) < 2:
        raise ValueError(
            f"target_prefixes: {len(targets)} documented target function(s) found under "
            f"{cfg.target_prefixes}; at least 2 are needed (a train and a val one)"
        )
    n_val = min(len(targets) - 1, max(1, round(cfg.val_fraction * len(targets)))) if cfg.val_fraction else 0
    val_pairs, rest = targets[:n_val], targets[n_val:]
    f_t, f_c = cfg.target_fraction, cfg.corrupted_fraction
    # the target functions left after val bound the train size: clean and corrupted share them f_t : f_c
    n_total = int(len(rest) / (f_t + f_c))
    if cfg.num_train is not None:
        n_total = min(n_total, cfg.num_train)
    n_clean = max(1, round(n_total * f_t))
    n_corrupt = min(len(rest) - n_clean, round(n_total * f_c))
    others, texts = list(corpus.others), list(corpus.texts)
    rng.shuffle(others)
    rng.shuffle(texts)
    n_distractor = max(0, n_total - n_clean - n_corrupt)
    n_text = min(len(texts), round(n_distractor * cfg.text_share))
    n_pairs = min(len(others), n_distractor - n_text)
    clean, corrupt_src = rest[:n_clean], rest[n_clean : n_clean + n_corrupt]
    # donors: train-side functions only (never a val docstring), not used clean elsewhere in the mix
    donors = others[n_pairs:] + rest[n_clean + n_corrupt :] or others
    train: list[PySample] = [PySample("train", "target", p.prompt, p.doc, p.origin, (p.key,)) for p in clean]
    for p in corrupt_src:
        d = _donor(p, donors, cfg.length_ratio, rng)
        if d is None:
            corpus.stats.unpaired_corrupted += 1
            continue
        train.append(PySample("train", "corrupted", p.prompt, d.doc, f"{p.origin} with {d.origin}", (p.key, d.key)))
    train += [PySample("train", "distractor/pairs", p.prompt, p.doc, p.origin, (p.key,)) for p in others[:n_pairs]]
    train += [PySample("train", "distractor/text", "", t.text, t.origin) for t in texts[:n_text]]
    rng.shuffle(train)
    val = [PySample("val", "target", p.prompt, p.doc, p.origin, (p.key,)) for p in val_pairs]
    check_disjoint(train, val)
    return train, val


def items(cfg: PySourceConfig, seed: int) -> tuple[Iterator[tuple[str, int, str, Rendered]], SourceStats]:
    """prepare's (split, sample ordinal, origin, record) items of the pysource mix, and the walk's stats."""
    corpus = collect(cfg)
    train, val = mix(corpus, cfg, seed)

    def gen() -> Iterator[tuple[str, int, str, Rendered]]:
        for i, s in enumerate(train + val):
            yield s.split, i, s.origin, Rendered(s.prompt, s.response, s.kind)

    return gen(), corpus.stats
