"""Caption metrics as the COCO caption toolkit (``pycocoevalcap``) computes them when LAVIS' captioning task runs
it: BLEU-1..4, METEOR, ROUGE-L, CIDEr (CIDEr-D) and SPICE when it can run.

The steps are pycocoevalcap's own (``COCOEvalCap.evaluate``): the references, then the predictions, through the
PTB tokenizer (Stanford CoreNLP 3.4.1, Java; lower case, punctuation tokens dropped: brackets survive as
``-lrb-``); then its scorers on ``{image: [tokenized captions]}``: BLEU (``closest`` reference length) and METEOR
at corpus level, ROUGE-L and SPICE as means of per-image scores, CIDEr-D (sigma 6, x10) with document frequencies
from the references of the images scored (scoring a subset changes every image's CIDEr). Numbers are the
toolkit's fractions (CIDEr 1.05, not 105).

What differs, and why:

- METEOR runs on one or more Java processes (``meteor_workers``; :mod:`blipfast.evaluation.meteor`), started
  before the tokenizer so that their start (seconds: the paraphrase table) overlaps the tokenizer and the other
  scorers; the per-image and corpus scores are pycocoevalcap's, bit for bit.
- captions are sanitised first: the line and record separators (``\\n \\r \\x0b \\x0c \\x1c-\\x1e \\x85 U+2028
  U+2029``) become spaces. The tokenizer reads one caption per line and Java splits lines at ``\\r``, ``\\x0b``,
  ``\\x0c`` and U+2028/9 (pycocoevalcap only replaces ``\\n``), so one such caption shifts every later caption
  onto the wrong image; a raw newline that reached METEOR would stall its line protocol.
- the tokenizer is run here with pycocoevalcap's command, jar and punctuation list, but with its input file in a
  temporary folder (pycocoevalcap writes it next to the jar, which fails in a read-only environment) and a check
  that one line came back per caption.
- SPICE runs only when Stanford CoreNLP 3.6.0 is already in pycocoevalcap's ``spice/lib`` (pycocoevalcap would
  download it, which hangs or fails offline); otherwise, or when it fails, it is reported as unavailable and the
  other metrics stand. Per-image SPICE is matched to the images in the order SPICE returns them (pycocoevalcap's
  ``COCOEvalCap`` pairs its sorted order with the unsorted ids).
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Mapping, Optional

from .formats import select
from .meteor import MeteorScorer, check_workers, sanitize_caption

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
JAVA_HELP = ("the COCO caption toolkit (pycocoevalcap: its PTB tokenizer and METEOR) needs a Java runtime, and "
             "{problem}. Install a headless JRE with the system package manager, e.g. `sudo apt-get install -y "
             "default-jre-headless` (Debian / Ubuntu), `sudo dnf install -y java-17-openjdk-headless` (Fedora / "
             "RHEL), `brew install openjdk` (macOS) or `conda install -c conda-forge openjdk`, so that `java` is on "
             "PATH")
SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


class ScorerUnavailableError(RuntimeError):
    """The caption toolkit cannot run here (no Java runtime, or pycocoevalcap not installed); the message says
    how to fix it."""


def check_java() -> str:
    """The ``java`` that will run, or ScorerUnavailableError telling how to install one."""
    java = shutil.which("java")
    if java is None:
        raise ScorerUnavailableError(JAVA_HELP.format(problem="`java` is not on PATH"))
    try:
        r = subprocess.run([java, "-version"], stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ScorerUnavailableError(JAVA_HELP.format(problem=f"`{java} -version` failed ({e})")) from None
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).decode(errors="replace").strip().splitlines()
        raise ScorerUnavailableError(JAVA_HELP.format(problem=f"`{java} -version` failed ({' '.join(msg[:2])})"))
    return java


def _toolkit_dir() -> str:
    try:
        from pycocoevalcap.tokenizer import ptbtokenizer
    except ImportError:
        raise ScorerUnavailableError("caption metrics need pycocoevalcap: pip install 'blipfast[eval]' (or pip "
                                     "install pycocoevalcap)") from None
    return os.path.dirname(os.path.dirname(os.path.abspath(ptbtokenizer.__file__)))


def check_toolkit() -> str:
    """The ``java`` that will run, or ScorerUnavailableError, saying how to fix it, when pycocoevalcap or the Java
    runtime is missing."""
    _toolkit_dir()
    return check_java()


def ptb_tokenize(captions: Mapping) -> dict:
    """``{key: [tokenized captions]}`` of ``{key: [captions]}``: pycocoevalcap's ``PTBTokenizer.tokenize`` (same
    Java command, jar and punctuation list) on sanitised captions."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, STANFORD_CORENLP_3_4_1_JAR

    jar = os.path.join(_toolkit_dir(), "tokenizer", STANFORD_CORENLP_3_4_1_JAR)
    keys = [k for k, caps in captions.items() for _ in caps]
    lines = [sanitize_caption(c) for caps in captions.values() for c in caps]
    if not lines:
        return {}
    with tempfile.TemporaryDirectory(prefix="blipfast-ptb-") as tmp:
        path = os.path.join(tmp, "captions.txt")
        with open(path, "wb") as fh:
            fh.write("\n".join(lines).encode())
        cmd = [check_java(), "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase",
               path]
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True)
    if r.returncode != 0:
        raise RuntimeError(f"the PTB tokenizer failed (exit {r.returncode}): {r.stderr.decode(errors='replace')}")
    out = r.stdout.decode().split("\n")
    if len(out) != len(lines):
        raise RuntimeError(f"the PTB tokenizer returned {len(out)} lines for {len(lines)} captions")
    result: dict = {}
    for k, line in zip(keys, out):
        result.setdefault(k, []).append(" ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS))
    return result


def spice_unavailable_reason() -> Optional[str]:
    """None when SPICE can run without downloading, else why not."""
    lib = os.path.join(_toolkit_dir(), "spice", "lib")
    missing = [j for j in SPICE_JARS if not os.path.isfile(os.path.join(lib, j))]
    if missing:
        return (f"Stanford CoreNLP 3.6.0 ({', '.join(missing)}) is not in {lib}; fetch it once, online: python -c "
                "'from pycocoevalcap.spice.get_stanford_models import get_stanford_models as g; g()'")
    return None


@dataclass
class CaptionScores:
    """``metrics``: the corpus scores (keys of :data:`METRICS`, plus ``SPICE`` when it ran); ``per_image``:
    ``{image_id: {metric: score}}``; ``spice``: ``"ran"``, ``"off"`` or why it did not run; ``coverage``:
    ``{"scored", "references"}``."""

    metrics: dict
    per_image: dict = field(default_factory=dict)
    spice: str = "off"
    coverage: dict = field(default_factory=dict)


def _spice(gts: dict, res: dict):
    from pycocoevalcap.spice.spice import Spice

    with contextlib.redirect_stdout(io.StringIO()):
        return Spice().compute_score(gts, res)


def score_captions(predictions: Mapping, references: Mapping, *, spice: Optional[bool] = None,
                   allow_missing: bool = False, meteor_workers: Optional[int] = None) -> CaptionScores:
    """Score ``predictions`` (image id -> caption) against ``references`` (image id -> [captions]) the LAVIS way
    (see the module doc). Every reference image needs exactly one prediction and every prediction an image
    (ValueError), unless ``allow_missing``: then the predicted images are scored (CIDEr's document frequencies
    from their references only, as LAVIS scores a subset) and ``coverage`` tells how many.

    ``spice``: None runs it when it can, False skips it, True requires it (RuntimeError when it cannot run).
    ``meteor_workers``: METEOR's Java processes (up to 2 GB of memory each), None:
    :func:`blipfast.evaluation.meteor.default_workers`; the numbers do not depend on it.
    Raises :class:`ScorerUnavailableError` when Java or pycocoevalcap is missing."""
    check_workers(meteor_workers)
    ids, coverage = select(predictions, references, allow_missing=allow_missing)
    for i in ids:
        if not isinstance(predictions[i], str):
            raise TypeError(f"the prediction of image {i!r} must be a string, got {type(predictions[i]).__name__}")
        refs = references[i]
        if isinstance(refs, str) or not refs or not all(isinstance(c, str) for c in refs):
            raise ValueError(f"the references of image {i!r} must be a non-empty list of strings")
    java = check_toolkit()
    status = "off" if spice is False else (spice_unavailable_reason() or "ran")
    if spice and status != "ran":
        raise RuntimeError(f"SPICE cannot run: {status}")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    # METEOR's processes start first (seconds each: its paraphrase table) and load while the tokenizer, BLEU,
    # ROUGE-L and CIDEr run here; METEOR scores last, with nothing else holding the interpreter (a thread feeding
    # Java while Python code runs waits for the interpreter at every line). Leaving the block ends the processes.
    with MeteorScorer(meteor_workers, images=len(ids), java=java) as meteor:
        # the scorers see positions 0..n-1 as image keys: one key type, SPICE's sorted order is the images' order
        gts = ptb_tokenize({n: list(references[i]) for n, i in enumerate(ids)})
        res = ptb_tokenize({n: [predictions[i]] for n, i in enumerate(ids)})
        found = {}
        bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
        for k in range(4):
            found[f"Bleu_{k + 1}"] = bleu[k], bleu_each[k]
        for name, scorer in (("ROUGE_L", Rouge()), ("CIDEr", Cider())):
            found[name] = scorer.compute_score(gts, res)
        found["METEOR"] = meteor.compute_score(gts, res)
    metrics, per = {}, {}
    for name in METRICS:
        metrics[name], per[name] = found[name]
    if status == "ran":
        try:
            metrics["SPICE"], each = _spice(gts, res)
            per["SPICE"] = [s["All"]["f"] for s in each]
        except (subprocess.CalledProcessError, OSError, ValueError, KeyError) as e:
            if spice:
                raise RuntimeError(f"SPICE failed: {e}") from None
            status = f"SPICE failed: {e}"
    metrics = {k: float(v) for k, v in metrics.items()}
    per_image = {i: {k: float(per[k][n]) for k in per} for n, i in enumerate(ids)}
    return CaptionScores(metrics=metrics, per_image=per_image, spice=status, coverage=coverage)


def format_captions(scores: CaptionScores) -> str:
    """The metric table ``blipfast eval caption`` prints (the toolkit's three decimals)."""
    lines = [f"{'metric':<10}{'score':>8}"] + [f"{k:<10}{v:>8.3f}" for k, v in scores.metrics.items()]
    if "SPICE" not in scores.metrics:
        lines.append("SPICE: skipped" if scores.spice == "off" else f"SPICE: unavailable: {scores.spice}")
    return "\n".join(lines)
