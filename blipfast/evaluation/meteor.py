"""METEOR 1.5 as pycocoevalcap computes it, with the alignment spread over several Java processes; the numbers
are pycocoevalcap's own, bit for bit (docs/evaluation.md#captions).

pycocoevalcap's ``Meteor.compute_score`` runs one ``java -jar -Xmx2G meteor-1.5.jar - - -stdio -l en -norm``
(its jar, in its folder) and talks a line protocol with it: ``SCORE ||| ref 1 ||| ... ||| ref n ||| hypothesis``
per image, answered by a line of sufficient statistics (the alignment: the slow part), then one ``EVAL ||| stats 1
||| ... ||| stats N`` answered by N per-image scores and the corpus score, which METEOR computes from the pooled
statistics (not the mean of the per-image scores). A segment's statistics depend on that segment alone, so here
the SCORE lines go to ``workers`` processes of the same command (threads feed them batches of images from one
shared queue, so a process that started late takes fewer), the statistics are put back in image order, and one
process runs the one EVAL: the per-image and corpus scores are the ones pycocoevalcap computes.

What is kept from pycocoevalcap: the jar, its folder, the command line (``-Xmx2G``: every worker may use up to 2 GB,
each loads METEOR's paraphrase table, about 1.1 GB resident and 9 s of CPU to start), the hypothesis' ``|||``
removed and double spaces made single, the images in the order of ``gts``. What differs: the line and record
separators of :func:`sanitize_caption` become spaces in every caption first (a raw newline would stall the line
protocol); a process that dies is an error naming METEOR with its exit status and stderr (the end of it); every
process is killed and waited for on every path (:meth:`MeteorScorer.close`, also on an error or an interrupt).
"""
from __future__ import annotations

import concurrent.futures as cf
import math
import os
import re
import subprocess
import tempfile
import threading
from typing import Mapping, Optional

_SEPARATORS = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
MAX_WORKERS = 8
# a process takes ~9 s of CPU and ~1.1 GB to start (the paraphrase table), and scores ~450 images/s: a second one
# pays off in wall time on a free core from a few seconds of scoring each
MIN_IMAGES_PER_WORKER = 2500
BATCH = 32  # SCORE lines written before their answers are read: small enough to fit the pipes' buffers


def sanitize_caption(text: str) -> str:
    """``text`` with every line or record separator replaced by a space (the Java tools read one caption per line,
    and Java also ends lines at ``\\r``, ``\\x0b``, ``\\x0c`` and U+2028/9)."""
    return _SEPARATORS.sub(" ", text)


def default_workers(images: int) -> int:
    """The workers ``workers=None`` gives for ``images`` images: ``min(os.cpu_count(), 8)``, but at least
    :data:`MIN_IMAGES_PER_WORKER` images each (one process below that)."""
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS, images // MIN_IMAGES_PER_WORKER))


def meteor_command(java: str = "java") -> tuple[list, str]:
    """pycocoevalcap's METEOR command line (``java`` as the executable) and the folder it runs in."""
    from pycocoevalcap.meteor import meteor

    return [java, "-jar", "-Xmx2G", meteor.METEOR_JAR, "-", "-", "-stdio", "-l", "en", "-norm"], \
        os.path.dirname(os.path.abspath(meteor.__file__))


def check_workers(workers) -> None:
    """ValueError unless ``workers`` is a positive integer or None."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"meteor_workers must be a positive integer or None (auto), got {workers!r}")


def score_lines(gts: Mapping, res: Mapping) -> list[bytes]:
    """pycocoevalcap's SCORE line of every image of ``gts`` (``gts``: image -> [references], ``res``: image ->
    [the one hypothesis]), encoded; ValueError when the images differ or an image has not one hypothesis."""
    if gts.keys() != res.keys():
        raise ValueError("gts and res must have the same images")
    lines = []
    for i in gts:
        if len(res[i]) != 1:
            raise ValueError(f"image {i!r} must have exactly one hypothesis, got {len(res[i])}")
        hyp = sanitize_caption(res[i][0]).replace("|||", "").replace("  ", " ")
        refs = [sanitize_caption(r) for r in gts[i]]
        try:
            lines.append(f"{' ||| '.join(('SCORE', ' ||| '.join(refs), hyp))}\n".encode())
        except UnicodeEncodeError as e:
            raise ValueError(f"the captions of image {i!r} cannot be encoded as UTF-8 ({e})") from None
    return lines


class MeteorScorer:
    """``workers`` METEOR processes (None: :func:`default_workers` of ``images``, or 1 when ``images`` is not
    given), started at once so that their start overlaps what the caller does next; :meth:`compute_score` as
    pycocoevalcap's. A context manager: leaving it (or :meth:`close`) kills and waits for every process."""

    def __init__(self, workers: Optional[int] = None, images: Optional[int] = None, java: str = "java"):
        check_workers(workers)
        self.workers = workers if workers is not None else default_workers(images or 0)
        if images is not None:
            self.workers = max(1, min(self.workers, images))  # never a process without an image
        cmd, cwd = meteor_command(java)
        self.processes: list = []
        self._stderr: list = []
        self.closed = False
        self._lock = threading.Lock()
        try:
            for _ in range(self.workers):
                err = tempfile.TemporaryFile()  # a file, not a pipe: Java's messages can never block it
                self._stderr.append(err)
                self.processes.append(subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.PIPE,
                                                       stdout=subprocess.PIPE, stderr=err))
        except OSError as e:
            self.close()
            raise RuntimeError(f"METEOR could not start ({' '.join(cmd)}): {e}") from None
        except BaseException:  # an interrupt: no process left behind
            self.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):  # a scorer dropped without close(): its processes end with it
        if not getattr(self, "closed", True):
            self.close()

    def _kill(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.kill()

    def close(self) -> None:
        """Kill and wait for every process (idempotent)."""
        self.closed = True
        self._kill()
        for p in self.processes:
            for f in (p.stdin, p.stdout):
                try:
                    f.close()
                except OSError:
                    pass
            p.wait()
        for f in self._stderr:
            f.close()

    def _failure(self, k: int, what: str) -> RuntimeError:
        p, err = self.processes[k], self._stderr[k]
        if p.poll() is None:
            p.kill()
        status = p.wait()
        try:
            err.seek(0)
            text = err.read().decode(errors="replace").strip()
        except ValueError:  # closed: close() ran meanwhile
            text = ""
        return RuntimeError(f"METEOR failed (worker {k + 1} of {self.workers}: {what}; exit status {status}): "
                            f"{text[-2000:] or 'no message on stderr'}")

    def _exchange(self, k: int, data: bytes, answers: int) -> list:
        """Write ``data`` to process ``k`` and read ``answers`` lines back (stripped), or raise its failure."""
        p = self.processes[k]
        try:
            p.stdin.write(data)
            p.stdin.flush()
            out = [p.stdout.readline() for _ in range(answers)]
        except (OSError, ValueError) as e:  # a closed pipe: the process died, or was killed after another did
            raise self._failure(k, f"{type(e).__name__}: {e}") from None
        if not out[-1].endswith(b"\n"):
            raise self._failure(k, "its output ended")
        return [o.strip() for o in out]

    def _feed(self, k: int, lines: list, stats: list, queue: list) -> None:
        """Process ``k``'s share: batches of SCORE lines from the shared ``queue`` until it is empty."""
        while True:
            with self._lock:
                start = queue[0]
                queue[0] += BATCH
            if start >= len(lines):
                return
            batch = lines[start:start + BATCH]
            stats[start:start + len(batch)] = self._exchange(k, b"".join(batch), len(batch))

    def compute_score(self, gts: Mapping, res: Mapping) -> tuple[float, list]:
        """(corpus METEOR, [per-image METEOR in the order of ``gts``]), as pycocoevalcap's
        ``Meteor().compute_score(gts, res)`` returns them."""
        if self.closed:
            raise RuntimeError("this MeteorScorer is closed")
        lines = score_lines(gts, res)
        if not lines:
            raise ValueError("METEOR needs at least one image")
        stats: list = [None] * len(lines)
        queue = [0]
        with cf.ThreadPoolExecutor(self.workers, thread_name_prefix="meteor") as pool:
            futures = [pool.submit(self._feed, k, lines, stats, queue) for k in range(self.workers)]
            try:
                done, _ = cf.wait(futures, return_when=cf.FIRST_EXCEPTION)
            except BaseException:  # an interrupt: end the processes, so that the feeders end too
                self._kill()
                raise
            failed = [f for f in futures if f in done and f.exception() is not None]
            if failed:
                self._kill()  # the other feeders' reads end; the executor waits for them
        if failed:
            raise failed[0].exception()
        eval_line = b"EVAL" + b"".join(b" ||| " + s for s in stats) + b"\n"
        out = self._exchange(0, eval_line, len(stats) + 1)
        try:
            scores = [float(o) for o in out]
        except ValueError as e:
            raise self._failure(0, f"an answer to EVAL is not a number ({e})") from None
        return scores[-1], scores[:-1]


def meteor_score(gts: Mapping, res: Mapping, workers: Optional[int] = None, java: str = "java") -> tuple:
    """(corpus METEOR, [per-image METEOR]) of ``gts`` (image -> [tokenized references]) and ``res`` (image ->
    [the tokenized hypothesis]), equal to pycocoevalcap's ``Meteor().compute_score(gts, res)``, on ``workers``
    Java processes (None: :func:`default_workers`)."""
    score_lines(gts, res)  # bad input before any Java starts
    with MeteorScorer(workers, images=len(gts), java=java) as m:
        return m.compute_score(gts, res)
