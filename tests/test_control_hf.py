"""pmptrain.control on Hugging Face models built from tiny configs (GPT-2, Llama, BERT, ViT) and on
peft models: attach by names and by types, E-MSA trains the controls (or peft's adapters) and leaves
the frozen base bit-identical, export/load reproduces the outputs exactly. Skipped without
transformers / peft."""

import copy

import pytest
import torch

import pmptrain
from pmptrain import control

transformers = pytest.importorskip("transformers")


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16, bos_token_id=0,
                                  eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg), "GPT2Block", ["c_attn", "c_fc"]


def _llama():
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=40, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(cfg), "LlamaDecoderLayer", ["q_proj", "v_proj"]


def _bert():
    cfg = transformers.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                  vocab_size=40, max_position_embeddings=16, num_labels=3)
    return transformers.BertForSequenceClassification(cfg), "BertLayer", ["query", "value"]


def _vit():
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=32, num_labels=3)
    return transformers.ViTForImageClassification(cfg), "ViTLayer", [r"re:.*\.(query|value|q_proj|v_proj)"]


MODELS = {"gpt2": _gpt2, "llama": _llama, "bert": _bert, "vit": _vit}


def _inputs(name):
    g = torch.Generator().manual_seed(0)
    if name == "vit":
        return {"pixel_values": torch.randn(3, 1, 8, 8, generator=g)}, torch.tensor([0, 2, 1])
    ids = torch.randint(0, 40, (3, 10), generator=g)
    return {"input_ids": ids}, (torch.tensor([0, 2, 1]) if name == "bert" else ids)


def _loss(model, name, inputs, target):
    logits = model(**inputs).logits
    if name in ("gpt2", "llama"):
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 target[:, 1:].reshape(-1))
    return torch.nn.functional.cross_entropy(logits, target)


def _block_type(model, type_name):
    return next(type(m) for m in model.modules() if type(m).__name__ == type_name)


@pytest.mark.parametrize("kind", ["lora", "parallel", "binary"])
@pytest.mark.parametrize("name", list(MODELS))
def test_hf_models_by_names_and_types(name, kind, tmp_path):
    torch.manual_seed(0)
    base, block, linears = MODELS[name]()
    base.eval()  # no dropout: outputs comparable
    inputs, target = _inputs(name)
    targets = linears if kind == "lora" else _block_type(base, block)
    model = control.attach(copy.deepcopy(base), targets, kind=kind, rank=4)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base(**inputs).logits)
    assert len(control.controls(model)) == (4 if kind == "lora" else 2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = pmptrain.DiscreteMSA(model, rho=0.0, decay=0.0, fallback_lr=1e-2) if kind == "binary" \
        else pmptrain.EMSA(model, strict=True)
    for _ in range(2):
        opt.zero_grad()
        _loss(model, name, inputs, target).backward()
        opt.step()
    assert not opt.last_step["skipped"]
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]) and p not in opt.state, n
    path = tmp_path / "c.pmp"
    control.export_controls(model, path)
    fresh = control.load_controls(path, copy.deepcopy(base))
    with torch.no_grad():
        out, ref = fresh(**inputs).logits, model(**inputs).logits
    assert torch.equal(out, ref)
    assert not torch.equal(ref, base(**inputs).logits)


def test_merge_on_gpt2_conv1d_is_exact_in_float64():
    torch.manual_seed(0)
    base, _, _ = _gpt2()
    base = base.double().eval()
    model = control.attach(copy.deepcopy(base), ["c_attn", "c_fc"], kind="lora", rank=3)
    for _, c in control.controls(model):
        with torch.no_grad():
            c.B.weight.normal_()
    inputs, _ = _inputs("gpt2")
    with torch.no_grad():
        y = model(**inputs).logits
        control.merge(model)
        assert not control.controls(model)
        assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
        torch.testing.assert_close(model(**inputs).logits, y, rtol=1e-12, atol=1e-12)


def test_emsa_trains_peft_lora_adapters_and_leaves_the_base_alone():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base, _, _ = _llama()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = pmptrain.EMSA(model, strict=True)
    units = [r["unit"] for r in opt.rule_table()]
    assert units and all("lora_A" in u or "lora_B" in u for u in units)
    assert all("lora_" in k for k in opt.capture._entries)
    inputs, target = _inputs("llama")
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = _loss(model, "llama", inputs, target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
