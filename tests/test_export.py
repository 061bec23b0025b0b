"""Tests of pmptrain.export: packed export/load round trip (bit-identical outputs), corruption errors,
and the summary numbers checked by hand."""

import io
import struct

import pytest
import torch
from torch import nn

from pmptrain.discrete import on_grid
from pmptrain.export import PackedFileError, export_packed, load_packed, summary
from pmptrain.quant import discrete_parameters, discretize_


def make_mlp():
    return nn.Sequential(
        nn.Flatten(), nn.Linear(12, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5),
    )


def make_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(6 * 2 * 2, 3),
    )


def prepare(factory, seed, x, **kw):
    torch.manual_seed(seed)
    model = factory()
    discretize_(model, **kw)
    model.train()
    with torch.no_grad():  # populate BN running statistics, then perturb full-precision params
        for _ in range(3):
            model(x)
        for p in model.parameters():
            if not any(p is d.param for d in discrete_parameters(model)):
                p.add_(0.01 * torch.randn_like(p))
    return model.eval()


CASES = [
    ("mlp", make_mlp, torch.randn(7, 3, 4), dict(levels="binary", keep=("last",))),
    ("mlp-tensor-scale", make_mlp, torch.randn(7, 3, 4), dict(levels="ternary", keep=None, scale="tensor")),
    ("mlp-4bit-channel-trainable", make_mlp, torch.randn(7, 12),
     dict(levels=4, keep=None, scale="channel", train_scale=True)),
    ("cnn", make_cnn, torch.randn(5, 1, 6, 6), dict(levels="binary", keep=None)),
    ("cnn-channel-scale", make_cnn, torch.randn(5, 1, 6, 6),
     dict(levels=[-1.5, -0.5, 0.0, 0.5, 1.5], keep=("first",), scale="channel")),
]


@pytest.mark.parametrize("name, factory, x, kw", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("skeleton", ["plain", "discretized"])
def test_export_load_bit_identical(tmp_path, name, factory, x, kw, skeleton):
    model = prepare(factory, 0, x, **kw)
    y = model(x)
    path = tmp_path / "net.pmp"
    manifest = export_packed(model, path)
    assert path.exists() and not any(p.name.startswith(".pmppack") for p in tmp_path.iterdir())
    assert len(manifest["discrete"]) == len(discrete_parameters(model))

    torch.manual_seed(123)  # a different init: everything must come from the file
    fresh = factory()
    if skeleton == "discretized":
        discretize_(fresh, **kw)
    load_packed(path, fresh)
    fresh.eval()
    assert torch.equal(fresh(x), y)
    sd0, sd1 = model.state_dict(), fresh.state_dict()
    assert sd0.keys() == sd1.keys()
    for k in sd0:
        assert sd0[k].dtype == sd1[k].dtype and torch.equal(sd0[k], sd1[k]), k
    for d0, d1 in zip(discrete_parameters(model), discrete_parameters(fresh)):
        assert d0.name == d1.name and d0.grid == d1.grid and on_grid(d1.param, d1.grid)
        assert isinstance(d1.param, nn.Parameter)
        assert (d0.scale is None) == (d1.scale is None)
        if d0.scale is not None:
            assert isinstance(d0.scale, nn.Parameter) == isinstance(d1.scale, nn.Parameter)


def test_packed_size_is_small(tmp_path):
    torch.manual_seed(0)
    model = discretize_(nn.Sequential(nn.Linear(100, 80, bias=False)), keep=None)
    export_packed(model, tmp_path / "a.pmp")
    size = (tmp_path / "a.pmp").stat().st_size
    assert 1000 <= size < 1000 + 1200  # 8000 binary weights = 1000 bytes + header/manifest


def test_corrupt_files_raise(tmp_path):
    x = torch.randn(4, 12)
    model = prepare(make_mlp, 1, x, levels="binary", keep=None, scale="tensor")
    path = tmp_path / "m.pmp"
    export_packed(model, path)
    data = path.read_bytes()

    def load_bytes(b):
        p = tmp_path / "bad.pmp"
        p.write_bytes(b)
        load_packed(p, make_mlp())

    with pytest.raises(PackedFileError, match="truncated header"):
        load_bytes(data[:10])
    with pytest.raises(PackedFileError, match="truncated manifest"):
        load_bytes(data[:60])
    with pytest.raises(PackedFileError, match="truncated payload"):
        load_bytes(data[:-1])
    with pytest.raises(PackedFileError, match="trailing"):
        load_bytes(data + b"\0")
    with pytest.raises(PackedFileError, match="wrong magic"):
        load_bytes(b"NOTAPMP!" + data[8:])
    with pytest.raises(PackedFileError, match="version"):
        load_bytes(data[:8] + struct.pack("<I", 99) + data[12:])
    flipped = bytearray(data)
    flipped[-5] ^= 0x10  # inside the payload
    with pytest.raises(PackedFileError, match="payload checksum"):
        load_bytes(bytes(flipped))
    flipped = bytearray(data)
    flipped[60] ^= 0x01  # inside the manifest
    with pytest.raises(PackedFileError, match="manifest checksum"):
        load_bytes(bytes(flipped))
    assert issubclass(PackedFileError, ValueError)
    # the good file still loads
    load_packed(path, make_mlp())


def test_model_mismatch_raises_value_error(tmp_path):
    x = torch.randn(4, 12)
    model = prepare(make_mlp, 2, x, levels="binary", keep=None)
    export_packed(model, tmp_path / "m.pmp")
    with pytest.raises(ValueError, match="model"):
        load_packed(tmp_path / "m.pmp", make_cnn())
    other = discretize_(make_mlp(), levels="ternary", keep=None)
    with pytest.raises(ValueError, match="model: module '1' is discrete"):
        load_packed(tmp_path / "m.pmp", other)


def test_export_rejects_off_grid_weights(tmp_path):
    model = discretize_(nn.Sequential(nn.Linear(3, 2)), keep=None)
    with torch.no_grad():
        model[0].weight[0, 0] = 0.5
    with pytest.raises(ValueError, match="not on the binary grid"):
        export_packed(model, tmp_path / "x.pmp")
    assert not (tmp_path / "x.pmp").exists()


def test_summary_numbers_by_hand():
    model = nn.Sequential(nn.Linear(10, 20), nn.BatchNorm1d(20), nn.Linear(20, 3, bias=False), nn.Linear(3, 2))
    discretize_(model, levels="ternary", keep=("last",), exclude=[])
    # discrete: "0" (200 weights, 2 bits -> 50 B) and "2" (60 weights -> 15 B)
    buf = io.StringIO()
    table = summary(model, file=buf)
    rows = {r.name: r for r in table.rows}
    assert list(rows) == ["0", "0.bias", "1.weight", "1.bias", "2", "3.weight", "3.bias"]
    assert (rows["0"].bits, rows["0"].float32_bytes, rows["0"].packed_bytes) == (2, 800, 50)
    assert rows["0"].compression == 16.0 and rows["0"].grid == "ternary"
    assert (rows["2"].float32_bytes, rows["2"].packed_bytes) == (240, 15)
    assert (rows["0.bias"].bits, rows["0.bias"].packed_bytes) == (32, 80)
    assert rows["3.weight"].packed_bytes == 24 and rows["3.weight"].compression == 1.0
    fp = 20 + 20 + 20 + 6 + 2  # full-precision params
    assert table.total_float32_bytes == 4 * (200 + 60 + fp)
    assert table.total_packed_bytes == 50 + 15 + 4 * fp
    assert table.compression == pytest.approx(4 * (260 + fp) / (65 + 4 * fp))
    assert table.discrete_fraction == pytest.approx(260 / (260 + fp))
    text = buf.getvalue()
    assert text.strip() == str(table).strip()
    assert "ternary" in text and "total" in text and "16.0x" in text
    assert "SummaryTable" in repr(table)


def test_summary_with_scale_and_odd_sizes():
    model = discretize_(nn.Sequential(nn.Linear(7, 1, bias=False)), levels=3, keep=None, scale="tensor", train_scale=True)
    table = summary(model, file=io.StringIO())
    rows = {r.name: r for r in table.rows}
    assert rows["0"].packed_bytes == 3 and rows["0"].bits == 3  # ceil(7*3/8)
    assert rows["0.parametrizations.weight.0.alpha"].packed_bytes == 4


# --------------------------------------------------- all or nothing, malformed manifests (issue 10, finding 4)


def _rewrite_manifest(data: bytes, edit) -> bytes:
    """The file with its manifest edited by ``edit(manifest)`` and the manifest checksum recomputed
    (what a tool that "repairs" checksums produces)."""
    import hashlib
    import json

    from pmptrain.export import _HEADER
    magic, version, mlen, _ = _HEADER.unpack_from(data, 0)
    manifest = json.loads(data[_HEADER.size:_HEADER.size + mlen])
    edit(manifest)
    mbytes = json.dumps(manifest).encode()
    return (_HEADER.pack(magic, version, len(mbytes), hashlib.sha256(mbytes).digest()) + mbytes
            + data[_HEADER.size + mlen:])


def test_a_mismatching_model_is_left_untouched(tmp_path):
    x = torch.randn(4, 12)
    model = prepare(make_mlp, 2, x, levels="binary", keep=None)
    export_packed(model, tmp_path / "m.pmp")
    # the same Linear layers but a BatchNorm without affine parameters: every discrete weight fits,
    # so the layers would be discretised and overwritten before load_state_dict finds the mismatch
    torch.manual_seed(5)
    layers = list(make_mlp())
    layers[5] = nn.BatchNorm1d(16, affine=False)
    wrong = nn.Sequential(*layers)
    before = {k: v.clone() for k, v in wrong.state_dict().items()}
    with pytest.raises(ValueError, match="model"):
        load_packed(tmp_path / "m.pmp", wrong)
    assert not discrete_parameters(wrong)
    after = wrong.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("edit,match", [
    (lambda m: m["discrete"][0].__setitem__("offset", "0"), "offset"),
    (lambda m: m["discrete"][0].__setitem__("shape", [16, -12]), "shape"),
    (lambda m: m["discrete"][0].__setitem__("numel", "many"), "numel"),
    (lambda m: m["discrete"][0].pop("module"), "module"),
    (lambda m: m["discrete"][0].__setitem__("spec", [1, 2]), "spec"),
    (lambda m: m["discrete"][0].__setitem__("spec", {"grid": "nonsense"}), "bad spec"),
    (lambda m: m["discrete"][0].__setitem__("shape", [16, 13]), "inconsistent"),
    (lambda m: m["tensors"][0].__setitem__("dtype", "float7"), "dtype"),
    (lambda m: m["tensors"][0].__setitem__("nbytes", None), "nbytes"),
    (lambda m: m["tensors"].__setitem__(0, "x"), "not an object"),
    (lambda m: m.__setitem__("tensors", {"a": 1}), "not a list"),
    (lambda m: m.__setitem__("payload_nbytes", -3), "payload_nbytes"),
    (lambda m: m.pop("payload_sha256"), "payload_sha256"),
])
def test_malformed_manifest_fields_raise_packed_file_error(tmp_path, edit, match):
    x = torch.randn(4, 12)
    model = prepare(make_mlp, 1, x, levels="binary", keep=None, scale="tensor")
    export_packed(model, tmp_path / "m.pmp")
    bad = tmp_path / "bad.pmp"
    bad.write_bytes(_rewrite_manifest((tmp_path / "m.pmp").read_bytes(), edit))
    target = make_mlp()
    with pytest.raises(PackedFileError, match=match):
        load_packed(bad, target)
    assert not discrete_parameters(target)
