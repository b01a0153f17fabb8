"""Real checkpoints with each RoPE type, in both config layouts, against transformers' logits.

tests/data/rope_<layout>_<type>/ were saved by transformers 5.24's own save_pretrained
(tools/make_rope_reference.py): `v5` as written (`rope_parameters`), `legacy` rewritten into the
pre-5 layout (`rope_theta` + `rope_scaling`). Each runs through the HF loader, and through
`convert` then the GGUF loader, and must give transformers' logits.
"""

import numpy as np
import pytest

from llamacpu.checkpoint import load_checkpoint
from llamacpu.convert import convert_model
from llamacpu.loaders.gguf import read_metadata
from llamacpu.model import Model

FOLDERS = [f"rope_{layout}_{kind}" for kind in ("default", "linear", "llama3") for layout in ("legacy", "v5")]
ATOL = 1e-4  # f32 against transformers' f32 (measured differences are about 1e-6)


def _logits(source, ref) -> np.ndarray:
    ck = load_checkpoint(source)
    model = Model(ck.config, ck.tensors)
    ids = ref["input_ids"].astype(np.int64)
    return model.forward(ids, model.new_cache(len(ids)), all_logits=True)[ref["positions"]]


@pytest.mark.parametrize("name", FOLDERS)
def test_hf_folder_matches_transformers(data_dir, name):
    ref = np.load(data_dir / name / "reference.npz")
    np.testing.assert_allclose(_logits(data_dir / name, ref), ref["logits"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", FOLDERS)
def test_converted_gguf_matches_transformers(data_dir, name, tmp_path):
    ref = np.load(data_dir / name / "reference.npz")
    out = tmp_path / f"{name}.gguf"
    convert_model(data_dir / name, out, "f32")
    np.testing.assert_allclose(_logits(out, ref), ref["logits"], atol=ATOL, rtol=0)
    # What llama.cpp reads (its convert_hf_to_gguf.py writes the same): linear scaling as keys,
    # Llama-3 scaling as the rope_freqs tensor, and the theta from either layout.
    meta = read_metadata(out)
    kind = name.rsplit("_", 1)[1]
    assert meta["llama.rope.freq_base"] == {"default": 100000.0, "linear": 10000.0, "llama3": 500000.0}[kind]
    assert meta.get("llama.rope.scaling.type") == ("linear" if kind == "linear" else None)
    assert meta.get("llama.rope.scaling.factor") == (4.0 if kind == "linear" else None)
    assert ("rope_freqs" in load_checkpoint(out).tensors) == (kind == "llama3")


@pytest.mark.parametrize("kind", ["default", "linear", "llama3"])
def test_both_layouts_read_as_the_same_model(data_dir, kind):
    legacy, v5 = (load_checkpoint(data_dir / f"rope_{layout}_{kind}").config for layout in ("legacy", "v5"))
    assert legacy == v5
    assert (v5.rope_scaling.rope_type if v5.rope_scaling else "default") == kind
