"""``blipfast caption`` / ``blipfast vqa`` at their edges (issue 17): folders that cannot generate are refused before
anything loads, bad images are skipped and reported (also before the model loads), the output is continued (rows
appended per batch, a cut last line repaired, no row twice) and refuses other settings, empty texts are counted,
bad generate() arguments and damaged model folders are messages, and the help shows the defaults. A tiny random
BLIP-2 OPT folder (blipfast.testing.blip2)."""
from __future__ import annotations

import json
import shutil

import pytest

from blipfast import cli
from blipfast.options import EXIT_OK, EXIT_USAGE
from blipfast.testing import blip2 as T

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (tests/conftest.py)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    model = T.save_folder(T.blip2("opt"), root / "model", "opt")
    images = root / "imgs"
    images.mkdir()
    T.write_images(images, 4)
    (images / "a-empty.png").write_bytes(b"")  # sorted first
    (images / "img-corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 4)
    return {"root": root, "model": model, "images": images}


def _caption(tiny, out, *extra, model=None):
    return cli.main(["caption", "--model", str(model or tiny["model"]), "--images", str(tiny["images"]), "--output",
                     str(out), "--no-progress", "--device", "cpu", "--num-beams", "2", "--max-new-tokens", "4",
                     "--batch-size", "2", *extra])


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _damaged(tiny, name, edit):
    folder = tiny["root"] / name
    shutil.copytree(tiny["model"], folder)
    edit(folder)
    return folder


def test_bad_images_are_skipped_and_the_output_is_continued(tiny, tmp_path, capsys):
    out = tmp_path / "new" / "captions.jsonl"  # its folder is created
    assert _caption(tiny, out) == EXIT_OK
    err = capsys.readouterr().err
    assert "a-empty.png: cannot be read: the file is empty (skipped)" in err and "img-corrupt.png" in err
    assert "4 rows" in err and "2 unreadable image(s) skipped" in err
    full = out.read_text()
    assert [r["image"] for r in _rows(out)] == [str(tiny["images"] / f"img{i}.png") for i in range(4)]
    # a crash in the middle of a write: a cut last line and a missing row; the rerun does only the missing rows
    lines = full.splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:10])
    assert _caption(tiny, out) == EXIT_OK
    assert "2 rows" in capsys.readouterr().err and out.read_text() == full
    assert _caption(tiny, out) == EXIT_OK  # only the unreadable image is tried again
    err = capsys.readouterr().err
    assert "0 rows" in err and "4 already in the output" in err and out.read_text() == full
    # other settings are refused (they would mix two settings' captions), --restart starts again
    assert _caption(tiny, out, "--prompt", "a photo of") == EXIT_USAGE
    assert "other settings (prompt: '' -> 'a photo of'" in capsys.readouterr().err and out.read_text() == full
    assert _caption(tiny, out, "--prompt", "a photo of", "--restart") == EXIT_OK
    assert len(_rows(out)) == 4 and out.read_text() != full


def test_folders_that_cannot_caption_are_refused_before_loading(tiny, capsys, tmp_path, monkeypatch):
    def retrieval(folder):
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["Blip2ForImageTextRetrieval"]}))

    def truncate(folder):
        w = folder / "model.safetensors"
        w.write_bytes(w.read_bytes()[:1000])

    cases = (("retrieval", retrieval, "holds a Blip2ForImageTextRetrieval, which does not generate text"),
             ("no-tokenizer", lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
              "has no tokenizer files"),
             ("no-weights", lambda f: (f / "model.safetensors").unlink(), "has no weights (model.safetensors)"),
             ("no-processor", lambda f: (f / "preprocessor_config.json").unlink(), "has no preprocessor_config.json"),
             ("truncated", truncate, "cannot load"))
    for name, edit, msg in cases:
        assert _caption(tiny, tmp_path / f"{name}.jsonl", model=_damaged(tiny, name, edit)) == EXIT_USAGE, name
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, (name, err)
    # past the file check: transformers builds a tokenizer from config.json alone that turns text into no tokens
    from blipfast.generate import engine

    monkeypatch.setattr(engine, "check_model_folder", lambda folder: None)
    with pytest.raises(ValueError, match="the tokenizer of .* is empty"):
        engine.Generator(tiny["root"] / "no-tokenizer", device="cpu")


def test_vqa_checks_its_images_before_the_model_loads(tiny, tmp_path, capsys):
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"image": "missing.png", "question": "what"}) + "\n")
    broken = _damaged(tiny, "vqa-broken", lambda f: (f / "model.safetensors").write_bytes(b"x" * 100))
    assert cli.main(["vqa", "--model", str(broken), "--data", str(data), "--output", str(tmp_path / "a.jsonl")]) == \
        EXIT_USAGE
    err = capsys.readouterr().err
    assert "missing.png: cannot be read: no such file" in err and "no image of the input" in err
    assert "cannot load" not in err  # the model was never read


def test_empty_captions_are_counted_and_bad_generate_arguments_are_messages(tiny, tmp_path, capsys):
    # only special tokens allowed: every caption decodes to ""
    no_words = json.dumps({"suppress_tokens": list(range(len(T.SPECIALS), len(T.VOCAB)))})
    out = tmp_path / "c.jsonl"
    assert _caption(tiny, out, "--generate-kwargs", no_words) == EXIT_OK
    assert all(r["caption"] == "" for r in _rows(out))
    assert "4 empty caption(s)" in capsys.readouterr().err
    for kwargs, msg in (('{"num_beams": 0}', "num_beams must be an integer >= 1"),
                        ('{"num_return_sequences": 3}', "num_return_sequences (3) must be <= num_beams (2)"),
                        ('{"top_k": "x", "do_sample": true}', "generate() refused the arguments")):
        assert _caption(tiny, tmp_path / "d.jsonl", "--generate-kwargs", kwargs) == EXIT_USAGE, kwargs
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, (kwargs, err)


def test_help_shows_the_defaults(capsys):
    """The decoding defaults are LAVIS' settings for the model's LLM (resolved once the model is read): the help
    names the settings and says which flags default to them."""
    for cmd, settings in (("caption", "{caption,coco}"), ("vqa", "{vqa}")):
        with pytest.raises(SystemExit):
            cli.main([cmd, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for want in (f"--settings {settings} LAVIS' decoding settings, resolved for the model's LLM",
                     "--num-beams NUM_BEAMS beams of the beam search (1: greedy; default: the settings', 5)",
                     "--max-new-tokens MAX_NEW_TOKENS most tokens generated per text (default: the settings')",
                     "--min-new-tokens MIN_NEW_TOKENS fewest tokens generated per text (default: the settings')",
                     "--length-penalty LENGTH_PENALTY beam search's length penalty (default: the settings')",
                     "--no-progress no tqdm bar", "--restart start --output again"):
            assert want in text, (cmd, want)
