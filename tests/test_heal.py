"""Healing (streamsvd/heal.py): LoRA merged into the factors keeps the output a low-rank
checkpoint of the same ranks that loads like the compressed one, in streamsvd and in a
stock process that cannot import streamsvd; it lowers the training loss; bad input is
refused before anything is written."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config, write_checkpoint
from test_pipeline import tensors_of
from test_remote_code import STOCK, run_stock

from streamsvd import CompressConfig, compress, load_compressed
from streamsvd.calib import stdlib_docstrings
from streamsvd.cli import main as cli_main
from streamsvd.errors import StreamSVDError
from streamsvd.heal import HealConfig, heal

HEAL = dict(nsamples=8, seqlen=32, batch_size=4, epochs=3, lr=1e-3)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    root = tmp_path_factory.mktemp("heal")
    model = write_checkpoint(root / "model", tiny_config(layers=2), dtype=torch.float64)
    calib = root / "calib.txt"
    calib.write_text(stdlib_docstrings(40_000))
    out = root / "low-rank"
    compress(CompressConfig(model=str(model), out=str(out), calib=str(calib), ratio=0.4,
                            nsamples=8, seqlen=32, batch_size=4))  # fmt: skip
    return out, calib


def test_healed_output_keeps_ranks_and_loads_in_a_stock_process(compressed, tmp_path):
    source, calib = compressed
    out = tmp_path / "healed"
    summary = heal(HealConfig(model=str(source), out=str(out), data=str(calib), **HEAL))
    assert summary["last_loss"] < summary["first_loss"]
    before, after = tensors_of(source), tensors_of(out)
    assert before.keys() == after.keys()
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed and all(n.endswith((".down.weight", ".up.weight")) for n in changed)
    assert all(before[n].shape == after[n].shape and before[n].dtype == after[n].dtype
               for n in before)  # fmt: skip
    section = json.loads((out / "config.json").read_text())["streamsvd"]
    assert (
        section["ranks"] == json.loads((source / "config.json").read_text())["streamsvd"]["ranks"]
    )
    assert section["heal"]["epochs"] == HEAL["epochs"] and section["complete"] is True
    ids = torch.randint(2, 500, (2, 24), generator=torch.Generator().manual_seed(3))
    result, said = run_stock(STOCK, [str(out), json.dumps(ids.tolist())], tmp_path, 300)
    assert "trust_remote_code=True" in said and result["class"] == "StreamSVDForCausalLM"
    stock = torch.tensor(result["logits"], dtype=torch.float64)
    with torch.no_grad():
        ours = load_compressed(out)(ids).logits
    assert float((stock - ours).abs().max()) <= 1e-9 * float(ours.abs().max())


def test_heal_takes_jsonl_and_refuses_bad_input(compressed, tmp_path, capsys):
    source, calib = compressed
    jsonl = tmp_path / "train.jsonl"
    text = calib.read_text()
    jsonl.write_text("\n".join(json.dumps({"text": text[i : i + 4000]})
                               for i in range(0, 40_000, 4000)))  # fmt: skip
    out = tmp_path / "from-jsonl"
    heal(HealConfig(model=str(source), out=str(out), data=str(jsonl), **{**HEAL, "epochs": 1}))
    assert (out / "config.json").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "no text field"}\n')
    with pytest.raises(StreamSVDError, match="'text' field"):
        heal(HealConfig(model=str(source), out=str(tmp_path / "x"), data=str(bad), **HEAL))
    assert not (tmp_path / "x").exists()
    with pytest.raises(StreamSVDError, match="already exists"):
        heal(HealConfig(model=str(source), out=str(out), data=str(calib), **HEAL))
    code = cli_main(["heal", "--model", str(calib.parent), "--out", str(tmp_path / "y")])
    assert code != 0 and "streamsvd" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
