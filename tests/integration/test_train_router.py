"""tools/train_router.py on a tiny dense checkpoint with a tokenizer trained offline."""

import json
import random

from medmoe_mcore.router import file as router_file
from tests import tiny_hf
from tests.conftest import run_tool

WORDS = {"CT": "computed tomography axial slice hounsfield contrast",
         "MRI": "magnetic resonance weighted signal flair sequence",
         "X-Ray": "radiograph chest frontal projection film",
         "pathology": "histology stained tissue slide microscope"}


def _tokenizer(folder, corpus):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)


def test_train_router_beats_chance_and_writes_a_router_file(tmp_path):
    rng = random.Random(0)
    records = []
    for modality, words in WORDS.items():
        for _ in range(30):
            picked = rng.sample(words.split(), 3)
            records.append({"modality": modality, "conversations": [
                {"from": "human", "value": f"<image>\nwhat does this {' '.join(picked)} show"},
                {"from": "gpt", "value": "an answer"}]})
    records.append({"conversations": [{"from": "human", "value": "no label"}]})
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    hf = tiny_hf.build("phi", tmp_path / "hf")
    _tokenizer(str(hf), [r["conversations"][0]["value"] for r in records[:-1]] +
               ["A chat between a curious user USER: ASSISTANT:"])
    for args in (("tools/convert_hf_to_mcore.py", "--hf-dir", str(hf), "--save",
                  str(tmp_path / "ckpt"), "--no-progress"),
                 ("tools/train_router.py", "--load", str(tmp_path / "ckpt"), "--records",
                  str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "router.safetensors"))):
        proc = run_tool(*args)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "skipped records: {'no modality': 1}" in proc.stdout
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["accuracy"] > 0.5, proc.stdout  # chance is 0.25
    assert result["modalities"] == sorted(WORDS)
    router = router_file.load(tmp_path / "router.safetensors", num_experts=4)
    assert router.modalities == sorted(WORDS)
