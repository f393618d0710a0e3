import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from microbert.checkpoint import (
    load_artifact,
    resolve_artifact_dir,
    save_artifact,
    update_latest,
    verify_artifact,
)
from microbert.errors import ArtifactError
from microbert.model import BertForMaskedLM

transformers = pytest.importorskip("transformers")


def _plain_copy(artifact: Path, folder: Path) -> Path:
    """A copy of an export without its manifest and with weights written elsewhere (no mark)."""
    shutil.copytree(artifact, folder)
    (folder / "manifest.json").unlink()
    weights = folder / "model.safetensors"
    save_file(load_file(weights), weights, metadata={"format": "pt"})
    return folder


def test_artifact_layout_and_manifest(tiny_artifact):
    names = {p.name for p in tiny_artifact.iterdir()}
    assert names == {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.txt",
        "manifest.json",
    }
    manifest = verify_artifact(tiny_artifact)
    assert manifest["step"] == 7 and set(manifest["files"]) == names - {"manifest.json"}
    assert not list(tiny_artifact.parent.glob(".tmp-*"))


def test_artifact_loads_in_transformers_with_equal_logits(tiny_artifact):
    ours = load_artifact(tiny_artifact)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tiny_artifact).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_artifact)
    enc = tok(
        ["the king is [MASK]", "a longer sentence about the queen and her [MASK] court"],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        expected = hf(**enc).logits
        got = ours.model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]).logits
    assert (expected - got)[enc["attention_mask"].bool()].abs().max() < 1e-4


def test_altered_or_missing_file_is_refused_and_named(tmp_path, tiny_artifact, tiny_tokenizer):
    model = load_artifact(tiny_artifact).model
    folder = save_artifact(model, tiny_tokenizer, tmp_path / "step-1")
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.safetensors"):
        load_artifact(folder)
    folder = save_artifact(model, tiny_tokenizer, tmp_path / "step-2")
    (folder / "vocab.txt").unlink()
    with pytest.raises(ArtifactError, match=r"vocab\.txt is missing"):
        load_artifact(folder)


def test_run_folder_resolves_to_latest_export(tmp_path, tiny_artifact, tiny_tokenizer):
    model = load_artifact(tiny_artifact).model
    export = tmp_path / "run" / "export"
    save_artifact(model, tiny_tokenizer, export / "step-10", metadata={"step": 10})
    save_artifact(model, tiny_tokenizer, export / "step-20", metadata={"step": 20})
    with pytest.raises(ArtifactError, match="no exported model"):
        resolve_artifact_dir(tmp_path / "run")  # no `latest` yet: nothing is complete as far as we know
    update_latest(export, export / "step-20")
    assert resolve_artifact_dir(tmp_path / "run") == export / "step-20"
    assert load_artifact(tmp_path / "run").step == 20
    with pytest.raises(ArtifactError, match="does not exist"):
        resolve_artifact_dir(tmp_path / "nope")


def test_a_rewritten_folder_replaces_the_old_one_atomically(tmp_path, tiny_artifact, tiny_tokenizer):
    model = load_artifact(tiny_artifact).model
    save_artifact(model, tiny_tokenizer, tmp_path / "a", metadata={"step": 1})
    save_artifact(model, tiny_tokenizer, tmp_path / "a", metadata={"step": 2})
    assert load_artifact(tmp_path / "a").step == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_transformers_save_pretrained_folder_loads(tmp_path, tiny_artifact, tiny_config):
    torch.manual_seed(3)
    hf = transformers.BertForMaskedLM(transformers.BertConfig(**tiny_config.to_dict())).eval()
    hf.save_pretrained(tmp_path / "hf")
    transformers.AutoTokenizer.from_pretrained(tiny_artifact).save_pretrained(tmp_path / "hf")
    ours = load_artifact(tmp_path / "hf")
    assert ours.manifest is None
    ids = torch.tensor([[2, 10, 11, 4, 12, 3]])
    with torch.no_grad():
        assert torch.allclose(ours.model(ids).logits, hf(input_ids=ids).logits, atol=1e-4)


def test_config_with_unknown_key_is_refused(tmp_path, tiny_artifact):
    folder = _plain_copy(tiny_artifact, tmp_path / "copy")
    config = json.loads((folder / "config.json").read_text())
    config["num_experts"] = 8
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="num_experts"):
        load_artifact(folder)


def test_unreadable_weights_are_a_clear_error(tmp_path, tiny_artifact):
    folder = _plain_copy(tiny_artifact, tmp_path / "copy")
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ArtifactError, match="safetensors"):
        load_artifact(folder)


def test_model_is_not_modified_by_saving(tiny_artifact, tmp_path, tiny_tokenizer):
    model: BertForMaskedLM = load_artifact(tiny_artifact).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save_artifact(model, tiny_tokenizer, tmp_path / "x")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_export_without_its_manifest_is_refused(tmp_path, tiny_artifact):
    """Deleting manifest.json does not switch verification off (a flipped byte went unnoticed)."""
    folder = tmp_path / "copy"
    shutil.copytree(tiny_artifact, folder)
    (folder / "manifest.json").unlink()
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"written by MicroBERT .* manifest\.json is missing"):
        load_artifact(folder)


def test_plain_transformers_folder_loads_with_an_unverified_log_line(tmp_path, tiny_artifact, caplog):
    folder = _plain_copy(tiny_artifact, tmp_path / "plain")
    with caplog.at_level(logging.WARNING, logger="microbert.checkpoint"):
        assert load_artifact(folder).manifest is None
    assert any("unverified" in r.getMessage() and str(folder) in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name", ["../elsewhere", "../../elsewhere/step-1", "ABSOLUTE", ".", "step-1/.."])
def test_latest_may_only_name_a_folder_inside_export(tmp_path, tiny_artifact, name):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(tiny_artifact, elsewhere)
    shutil.copytree(tiny_artifact, elsewhere / "step-1")
    export = tmp_path / "run" / "export"
    shutil.copytree(tiny_artifact, export / "step-1")
    (export / "latest").write_text((str(elsewhere) if name == "ABSOLUTE" else name) + "\n")
    with pytest.raises(ArtifactError, match="directly inside"):
        load_artifact(tmp_path / "run")


def test_latest_naming_a_link_out_of_export_is_refused(tmp_path, tiny_artifact):
    export = tmp_path / "run" / "export"
    export.mkdir(parents=True)
    (export / "step-9").symlink_to(tiny_artifact, target_is_directory=True)
    (export / "latest").write_text("step-9\n")
    with pytest.raises(ArtifactError, match="leads outside"):
        resolve_artifact_dir(tmp_path / "run")
