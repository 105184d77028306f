"""blipfast.data serving retrieval: one annotation reader seen as training pairs or as a LAVIS gallery, one
tokenisation helper, and BLIP's eval transform as data.vision's image processor (bit-exact against a restatement of
LAVIS' ``blip_image_eval``)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from blipfast.data import read_annotations, read_gallery
from blipfast.data.vision import default_blip_processor, preprocess
from blipfast.retrieval import tokenize

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _lavis_eval(image, size: int) -> torch.Tensor:
    """LAVIS' BlipImageEvalProcessor: Resize((size, size), BICUBIC) on the PIL image, ToTensor, Normalize(CLIP)."""
    from PIL import Image

    im = image.convert("RGB").resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_default_processor_is_lavis_eval_transform_bit_exact(mode):
    from PIL import Image

    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    for h, w, size in ((37, 53, 32), (224, 301, 224), (9, 400, 24)):
        shape = (h, w) if mode == "L" else (h, w, len(mode))
        image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
        got = preprocess(default_blip_processor(size), image.convert("RGB"))
        assert got.dtype == torch.float32 and torch.equal(got, _lavis_eval(image, size)), (mode, h, w, size)


def test_one_reader_two_views(tmp_path):
    rows = [{"image": "a/./x.jpg", "caption": ["One dog.", "Two!"]}, {"image": "b.jpg", "caption": "Three"},
            {"image": "c.jpg", "caption": ["", "four"], "image_id": 7}]
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=1))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for name in ("a.json", "a.jsonl"):
        g = read_gallery(tmp_path / name)
        assert g.images == ["a/./x.jpg", "b.jpg", "c.jpg"]  # as written: LAVIS joins them to its image root
        assert g.texts == ["one dog", "two", "three", "", "four"]  # every caption, an empty one too
        assert g.img2txt == [[0, 1], [2], [3, 4]] and g.txt2img == [0, 0, 1, 2, 2]
        ann = read_annotations(str(tmp_path / name), check_images=False)  # training: the empty caption skipped
        assert ann.captions == ["one dog", "two", "three", "four"] and ann.images == ["a/x.jpg", "b.jpg", "c.jpg"]
        assert len(ann.bad) == 1 and "empty caption 1 of 2" in ann.bad[0]
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps({"image": "d.jpg"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no 'caption'"):  # a gallery never drops a row
        read_gallery(tmp_path / "bad.jsonl")
    assert len(read_annotations(str(tmp_path / "bad.jsonl"), check_images=False)) == 2


def test_retrieval_tokenize_pads_to_the_longest_caption(tmp_path):
    from blipfast.testing.retrieval import write_tokenizer

    tok = write_tokenizer(tmp_path)
    texts = ["a dog", "a red car on the street with a man", "cat"]
    for max_len in (35, 6):
        ids, mask = tokenize(tok, texts, max_len)
        ref = tok(texts, padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
        assert torch.equal(ids.long(), ref["input_ids"]) and torch.equal(mask.long(), ref["attention_mask"])
