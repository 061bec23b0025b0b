"""Real training clients as tests: the optimizers inside PyTorch Lightning and the Hugging Face Trainer.

Each client drives the optimizer through its own loop — gradient accumulation, gradient clipping,
LR schedulers, checkpoint/resume, a second ``fit`` — and the tests check values: the loss falls, the
closed form did the updates, a Lightning fit equals the hand-written loop bit for bit, and a resumed
fit equals the uninterrupted one bit for bit.

The clients are installed by the test extra (``pip install -e '.[test]'``, what CI runs); a test
skips (``pytest.importorskip``) only in an environment without them.
"""

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pmptrain

CLIP = 0.5  # gradient clipping threshold; the tests check that it is reached
N_SAMPLES, BATCH = 256, 32  # 8 batches per epoch, 4 optimizer steps with accumulate_grad_batches=2
STEPS_PER_EPOCH = N_SAMPLES // BATCH // 2


def _unit_state(sd, name):
    """The record of unit ``name`` in an optimizer state_dict (on its primary parameter's index)."""
    return sd["state"][sd["pmptrain"]["units"][name]["index"]]


@pytest.fixture(autouse=True)
def _restore_global_state():
    """The clients change process-wide state (Lightning's ``deterministic=True`` turns on
    ``torch.use_deterministic_algorithms`` and sets environment variables; both seed the global
    RNGs): put it back so that the other test files do not depend on the order they run in."""
    env = dict(os.environ)
    det = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    rng = torch.get_rng_state()
    yield
    torch.use_deterministic_algorithms(det, warn_only=warn_only)
    torch.set_rng_state(rng)
    for k in set(os.environ) - set(env):
        del os.environ[k]
    os.environ.update(env)


def _assert_same(a, b, where="state"):
    """Recursive exact equality of (nested) state-dict data."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# ====================================================================== PyTorch Lightning


def _classification_data():
    """A fixed, learnable 3-class problem: labels from a random linear teacher."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_SAMPLES, 8, generator=g)
    y = (x @ torch.randn(8, 3, generator=g)).argmax(1)
    return torch.utils.data.TensorDataset(x, y)


def _mlp():
    return nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.Tanh(), nn.Linear(32, 3))


def _binary_mlp():
    net = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3))
    return pmptrain.discretize_(net, "binary", keep=("first", "last"), scale="tensor")


def _emsa_with(**curvature):
    """A LightningModule's ``configure_optimizers`` factory: E-MSA with a decay and a no-decay group
    (each Linear's weight and bias in different groups; the LayerNorm takes its per-channel closed
    form), the given curvature options and a per-step StepLR."""
    def factory(module):
        decay = [p for p in module.parameters() if p.ndim == 2]
        no_decay = [p for p in module.parameters() if p.ndim < 2]
        opt = pmptrain.EMSA(module, [{"params": decay, "weight_decay": 1e-2}, {"params": no_decay}],
                            lr=0.5, rho=1.0, fallback_lr=1e-2, **curvature)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
    return factory


#: running statistics (so the optimizer has a real state to checkpoint)
_emsa_and_schedule = _emsa_with(stat_decay=0.5)
#: amortised curvature: statistics captured every 3rd step, the steps in between solved with them
_emsa_amortised_and_schedule = _emsa_with(stat_every=3)


def _discrete_msa(module):
    return pmptrain.DiscreteMSA(module, rho=0.5, fallback_lr=1e-2)


_LIGHTNING = {}


def _lightning():
    """``(pl, Classifier)``; skips the test when Lightning is not installed."""
    if not _LIGHTNING:
        try:
            import lightning.pytorch as pl
        except ImportError:
            pl = pytest.importorskip("pytorch_lightning")

        class Classifier(pl.LightningModule):
            """``net`` (built under seed 0, so every instance starts from the same weights) trained
            with the optimizer that ``make_optimizer(self)`` returns; records every batch loss."""

            def __init__(self, make_optimizer, make_net=_mlp):
                super().__init__()
                torch.manual_seed(0)
                self.net = make_net()
                self.make_optimizer = make_optimizer
                self.losses = []

            def training_step(self, batch, batch_idx):
                x, y = batch
                loss = F.cross_entropy(self.net(x), y)
                self.losses.append(loss.item())
                return loss

            def configure_optimizers(self):
                return self.make_optimizer(self)

            def train_dataloader(self):
                return torch.utils.data.DataLoader(_classification_data(), batch_size=BATCH, shuffle=False)

        _LIGHTNING.update(pl=pl, Classifier=Classifier)
    return _LIGHTNING["pl"], _LIGHTNING["Classifier"]


def _trainer(pl, root, max_epochs, callbacks=()):
    """A CPU Trainer with clipping, accumulation over 2 batches and a per-epoch ModelCheckpoint."""
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=root / "ckpt", filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, gradient_clip_val=CLIP, accumulate_grad_batches=2, deterministic=True,
        default_root_dir=root, callbacks=[ckpt, *callbacks],
    )
    return trainer, ckpt


def _mean(xs):
    return sum(xs) / len(xs)


def _hand_loop(module, epochs, autocast=False):
    """What ``_trainer(...).fit(module)`` computes, as the plain loop: zero_grad, ``(loss/2).backward()``
    for 2 batches, clip, step, ``sched.step()`` (forwards under bf16 autocast with ``autocast=True``,
    as Lightning's ``precision="bf16-mixed"``). The pre-clipping gradient norms."""
    cfg = module.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    params = [p for g in opt.param_groups for p in g["params"]]
    norms = []
    for _ in range(epochs):
        for i, batch in enumerate(module.train_dataloader()):
            if i % 2 == 0:  # (Lightning calls zero_grad between this forward and its backward)
                opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = module.training_step(batch, i)
            (loss / 2).backward()
            if i % 2 == 1:
                norms.append(float(torch.nn.utils.clip_grad_norm_(params, CLIP)))
                opt.step()
                sched.step()
    return norms


@pytest.mark.parametrize("factory", [_emsa_and_schedule, _emsa_amortised_and_schedule], ids=["running", "amortised"])
def test_lightning_fit_equals_the_hand_written_loop(tmp_path, factory):
    """Two epochs of ``Trainer.fit`` (accumulation, clipping, per-step StepLR) give bit for bit the
    weights of the plain loop ``zero_grad / (loss/2).backward() ×2 / clip / step / sched.step`` (Lightning
    zeroes the gradients after the first micro-batch's forward: its pending captures must survive):
    Lightning drives EMSA exactly as documented, and the loss falls."""
    pl, Classifier = _lightning()
    pl.seed_everything(0, verbose=False)
    model = Classifier(factory)
    trainer, _ = _trainer(pl, tmp_path, max_epochs=2)
    trainer.fit(model)
    opt = trainer.optimizers[0]
    assert isinstance(opt, pmptrain.EMSA)
    steps = 2 * STEPS_PER_EPOCH
    assert trainer.global_step == steps
    assert len(model.losses) == 2 * steps  # two batches per step
    assert _mean(model.losses[-4:]) < 0.75 * _mean(model.losses[:4]), model.losses
    info = opt.last_step
    assert not info["skipped"] and opt.skipped_steps == 0
    assert info["controlled"] == 3  # both Linear layers and the LayerNorm by their closed forms
    assert info["fallback"] == 0
    assert info["hamiltonian_gain"] > 0
    sd = opt.state_dict()
    units = sd["pmptrain"]["units"]
    assert {n: u["rule"] for n, u in units.items()} == {
        "net.0": "emsa", "net.3": "emsa", "net.1": "emsa-channel"}
    assert _unit_state(sd, "net.0")["step"] == _unit_state(sd, "net.3")["step"] == steps
    assert _unit_state(sd, "net.1")["step"] == steps
    # the schedule stepped once per optimizer step: StepLR(3, 0.7) after 8 steps
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(0.5 * 0.7 ** (steps // 3))

    ref = Classifier(factory)
    norms = _hand_loop(ref, epochs=2)
    assert max(norms) > CLIP  # the clipping acted on some steps
    assert ref.losses == model.losses
    for (k, v), (k2, v2) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


def test_lightning_resume_is_bit_exact(tmp_path):
    """1 epoch, then ``fit(ckpt_path=...)`` for 1 more, equals an uninterrupted 2-epoch fit bit for
    bit: the weights, the E-MSA running statistics and eigenbases, the Adam fallback state, the step
    counters and the LR schedule all come back from the Lightning checkpoint."""
    pl, Classifier = _lightning()

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):  # after Lightning restored the checkpoint
            self.global_step = trainer.global_step
            self.state = copy.deepcopy(trainer.optimizers[0].state_dict())

    pl.seed_everything(0, verbose=False)
    full = Classifier(_emsa_and_schedule)
    trainer, _ = _trainer(pl, tmp_path / "full", max_epochs=2)
    trainer.fit(full)

    pl.seed_everything(0, verbose=False)
    first = Classifier(_emsa_and_schedule)
    trainer1, ckpt = _trainer(pl, tmp_path / "first", max_epochs=1)
    trainer1.fit(first)
    saved = trainer1.optimizers[0].state_dict()
    path = ckpt.best_model_path
    assert path.endswith("epoch=0.ckpt")
    raw = torch.load(path, weights_only=True)  # the optimizer state is plain data
    assert raw["global_step"] == STEPS_PER_EPOCH
    _assert_same(raw["optimizer_states"][0], saved, "checkpointed optimizer state")
    assert _unit_state(saved, "net.0")["step"] == STEPS_PER_EPOCH
    assert _unit_state(saved, "net.0")["running"]  # non-trivial state to restore

    pl.seed_everything(0, verbose=False)
    resumed = Classifier(_emsa_and_schedule)
    probe = Probe()
    trainer2, _ = _trainer(pl, tmp_path / "resumed", max_epochs=2, callbacks=[probe])
    trainer2.fit(resumed, ckpt_path=path)
    assert probe.global_step == STEPS_PER_EPOCH
    _assert_same(probe.state, saved, "restored optimizer state")
    assert trainer2.global_step == trainer.global_step == 2 * STEPS_PER_EPOCH
    opt = trainer2.optimizers[0]
    assert opt.skipped_steps == 0 and opt.last_step["controlled"] == 3
    assert _unit_state(opt.state_dict(), "net.0")["step"] == 2 * STEPS_PER_EPOCH
    assert resumed.losses == full.losses[len(first.losses):]
    for (k, v), (k2, v2) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    _assert_same(opt.state_dict(), trainer.optimizers[0].state_dict(), "final optimizer state")


def test_lightning_second_fit_replaces_the_optimizer(tmp_path):
    """A second ``fit`` on the same LightningModule builds a second EMSA on the same modules: it
    takes over the hooks (none is added), the first optimizer refuses to step, training goes on."""
    pl, Classifier = _lightning()
    model = Classifier(_emsa_and_schedule)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [len(m._forward_hooks) for m in linears] == [0, 0]

    trainer1, _ = _trainer(pl, tmp_path / "one", max_epochs=1)
    trainer1.fit(model)
    old = trainer1.optimizers[0]
    hooks = [len(m._forward_hooks) for m in linears]
    assert all(h >= 1 for h in hooks)
    first_losses, model.losses = model.losses, []

    trainer2, _ = _trainer(pl, tmp_path / "two", max_epochs=1)
    trainer2.fit(model)
    new = trainer2.optimizers[0]
    assert isinstance(new, pmptrain.EMSA) and new is not old
    assert [len(m._forward_hooks) for m in linears] == hooks
    with pytest.raises(RuntimeError, match="another pmptrain optimizer"):
        old.step()
    assert new.skipped_steps == 0 and not new.last_step["skipped"] and new.last_step["controlled"] == 3
    assert _mean(model.losses) < _mean(first_losses)  # the second fit went on from the first one

    # only the new optimizer records
    model.train()
    x, y = _classification_data()[:BATCH]
    F.cross_entropy(model.net(x), y).backward()
    assert new.capture.has_data() and not old.capture.has_data()


def test_lightning_discrete_msa(tmp_path):
    """DiscreteMSA on a binary middle layer inside Lightning (accumulation, clipping): the codes stay
    ±1, every step's reported flips are the codes that changed, and the loss falls."""
    pl, Classifier = _lightning()

    class FlipCounter(pl.Callback):
        def __init__(self):
            self.reported, self.changed, self._before = [], [], None

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # after backward and clipping
            self._before = codes.detach().clone()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self._before is None:
                return  # an accumulation batch: no step
            self.changed.append(int((codes != self._before).sum()))
            self.reported.append(trainer.optimizers[0].last_step["discrete"]["layers"]["net.2"]["flips"])
            self._before = None

    pl.seed_everything(0, verbose=False)
    model = Classifier(_discrete_msa, make_net=_binary_mlp)
    (dt,) = pmptrain.discrete_parameters(model.net)
    assert dt.name == "2"
    codes = dt.param
    initial = codes.detach().clone()
    counter = FlipCounter()
    trainer, _ = _trainer(pl, tmp_path, max_epochs=3, callbacks=[counter])
    trainer.fit(model)
    opt = trainer.optimizers[0]
    assert isinstance(opt, pmptrain.DiscreteMSA)
    rules = {r["unit"]: r["rule"] for r in opt.rule_table()}
    assert rules["net.2.parametrizations.weight.original"] == "discrete-msa"
    assert {rules[f"net.{i}.weight"] for i in (0, 4)} == {"fallback"}
    assert opt.skipped_steps == 0 and not opt.last_step["skipped"]
    assert len(counter.changed) == trainer.global_step == 3 * STEPS_PER_EPOCH
    assert counter.reported == counter.changed
    assert sum(counter.changed) > 0
    assert torch.equal(codes.detach().abs(), torch.ones_like(codes))
    assert 0 < int((codes != initial).sum()) <= sum(counter.changed)
    assert _mean(model.losses[-4:]) < 0.5 * _mean(model.losses[:4]), model.losses


def test_lightning_bf16_mixed_with_clipping(tmp_path):
    """``precision="bf16-mixed"`` (Lightning's mixed precision on CPU; ``"16-mixed"`` falls back to
    it there) with gradient clipping: the fit equals the plain loop under bf16 autocast."""
    pl, Classifier = _lightning()
    pl.seed_everything(0, verbose=False)
    model = Classifier(_emsa_and_schedule)
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, precision="bf16-mixed", gradient_clip_val=CLIP,
        accumulate_grad_batches=2, deterministic=True, default_root_dir=tmp_path)
    trainer.fit(model)
    opt = trainer.optimizers[0]
    assert trainer.global_step == 2 * STEPS_PER_EPOCH
    assert opt.skipped_steps == 0 and opt.last_step["controlled"] == 3
    assert _mean(model.losses[-4:]) < 0.75 * _mean(model.losses[:4]), model.losses
    ref = Classifier(_emsa_and_schedule)
    _hand_loop(ref, epochs=2, autocast=True)
    assert ref.losses == model.losses
    for (k, v), (k2, v2) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


# ====================================================================== Hugging Face Trainer

VOCAB, SEQ = 32, 16
WARMUP = 3  # warm-up steps of the LambdaLR schedule


class _CountingSequences(torch.utils.data.Dataset):
    """Token sequences ``s, s+1, s+2, … (mod VOCAB)`` from random starts: the next token is a
    function of the current one, so a causal LM must learn it (loss from ln VOCAB towards 0)."""

    def __init__(self, n=128):
        g = torch.Generator().manual_seed(0)
        self.ids = (torch.randint(0, VOCAB, (n, 1), generator=g) + torch.arange(SEQ)) % VOCAB

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _hf_trainer(monkeypatch, out, *, tie=False, steps=30, stat_decay=0.0, stat_every=1, callbacks=(), **arguments):
    """``(model, opt, trainer)``: a tiny LlamaForCausalLM (built from a config under seed 0, nothing
    downloaded) with EMSA in ``transformers.Trainer`` — decay/no-decay groups, a warm-up LambdaLR,
    accumulation over 2 batches, clipping at 1.0, no checkpoints unless ``arguments`` ask."""
    for var, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("WANDB_DISABLED", "true"),
                       ("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_DISABLE_TELEMETRY", "1")):
        monkeypatch.setenv(var, value)
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers.Trainer needs it
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=SEQ, tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(config)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # the RMSNorm weights
    opt = pmptrain.EMSA(model, [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                        lr=1.0, fallback_lr=1e-2, stat_decay=stat_decay, stat_every=stat_every)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / WARMUP))
    kwargs = dict(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=16, gradient_accumulation_steps=2,
        max_grad_norm=1.0, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
        seed=0, dataloader_num_workers=0)
    kwargs.update(arguments)
    trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**kwargs),
                                   train_dataset=_CountingSequences(), optimizers=(opt, sched),
                                   callbacks=list(callbacks))
    return model, opt, trainer



def _hf_train(monkeypatch, tmp_path, tie, steps=30):
    """Train (see :func:`_hf_trainer`) and check what every run must show; the logged losses."""
    model, opt, trainer = _hf_trainer(monkeypatch, tmp_path, tie=tie, steps=steps)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == steps and len(logs) == steps
    # the warm-up schedule drove EMSA's lr (logged before each step's scheduler.step())
    assert [h["learning_rate"] for h in logs[:WARMUP]] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert opt.skipped_steps == 0 and not opt.last_step["skipped"]
    assert opt.last_step["hamiltonian_gain"] > 0
    assert max(h["grad_norm"] for h in logs) > 1.0  # the clipping acted
    # exactly one E-MSA step per Trainer step (accumulated micro-batches are not steps)
    sd = opt.state_dict()
    for name in sd["pmptrain"]["units"]:
        assert _unit_state(sd, name)["step"] == steps, name
    return model, opt, [h["loss"] for h in logs]


_NO_CLOSED_FORM = "error:module .* has no closed-form maximiser"  # LlamaRMSNorm is controlled too


@pytest.mark.filterwarnings(_NO_CLOSED_FORM)
def test_hf_trainer_llama(monkeypatch, tmp_path):
    """Untied Llama: the embedding, the 7 projections and lm_head by the closed form, the RMSNorm
    weights by the per-channel closed form; nothing falls back; the loss falls from ln(VOCAB)."""
    model, opt, losses = _hf_train(monkeypatch, tmp_path, tie=False)
    assert losses[-1] < 0.6 * losses[0], losses
    affine = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    assert len(affine) == 9  # embedding, 7 projections, lm_head
    table = opt.rule_table()
    assert {r["unit"] for r in table if r["rule"] == "emsa"} == affine
    norms = {n for n, m in model.named_modules() if type(m).__name__ == "LlamaRMSNorm"}
    assert len(norms) == 3 and {r["unit"] for r in table if r["rule"] == "emsa-channel"} == norms
    assert opt.last_step["controlled"] == len(affine) + len(norms)
    assert not [r for r in table if r["rule"] == "fallback"]


@pytest.mark.filterwarnings(_NO_CLOSED_FORM)
def test_hf_trainer_llama_tied_embeddings(monkeypatch, tmp_path):
    """``tie_word_embeddings=True``: the embedding and lm_head share one weight, maximised jointly."""
    model, opt, losses = _hf_train(monkeypatch, tmp_path, tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied after training
    assert losses[-1] < 0.8 * losses[0], losses
    table = opt.rule_table()
    tied = [r for r in table if "embed_tokens" in r["unit"] or "lm_head" in r["unit"]]
    assert len(tied) == 1, tied
    (row,) = tied
    assert "model.embed_tokens" in row["unit"] and "lm_head" in row["unit"] and row["rule"] == "emsa"
    assert row["params"] == ["model.embed_tokens.weight"]
    assert opt.last_step["controlled"] == 11  # the tied pair, the 7 projections, the 3 RMSNorms


@pytest.mark.filterwarnings(_NO_CLOSED_FORM)
@pytest.mark.parametrize("kept", [{"stat_decay": 0.5}, {"stat_every": 3}], ids=["running", "amortised"])
def test_hf_trainer_resume_is_bit_exact(monkeypatch, tmp_path, kept):
    """``trainer.train(resume_from_checkpoint=...)`` from step 4 of 8 equals the uninterrupted run bit
    for bit; the Trainer's ``optimizer.pt`` (read with ``weights_only=True``) holds the E-MSA state —
    with running averages, and amortised (``stat_every=3``: step 4 resumes between two refreshes)."""
    transformers = pytest.importorskip("transformers")

    class Probe(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # after the Trainer loaded optimizer.pt
            self.state = copy.deepcopy(kwargs["optimizer"].state_dict())

    steps = 8
    full, full_opt, trainer = _hf_trainer(monkeypatch, tmp_path / "full", steps=steps, **kept,
                                          save_strategy="steps", save_steps=steps // 2)
    trainer.train()
    ckpt = tmp_path / "full" / f"checkpoint-{steps // 2}"
    saved = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    assert saved["pmptrain"]["optimizer"] == "EMSA"
    for name in saved["pmptrain"]["units"]:
        assert _unit_state(saved, name)["step"] == steps // 2, name
    assert _unit_state(saved, "lm_head")["running"]

    probe = Probe()
    resumed, opt, trainer2 = _hf_trainer(monkeypatch, tmp_path / "resumed", steps=steps, **kept,
                                         callbacks=[probe])
    trainer2.train(resume_from_checkpoint=str(ckpt))
    _assert_same(probe.state, saved, "restored optimizer state")
    assert trainer2.state.global_step == steps
    assert opt.skipped_steps == 0 and opt.last_step["controlled"] == 12
    _assert_same(opt.state_dict(), full_opt.state_dict(), "final optimizer state")
    for (k, v), (k2, v2) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


@pytest.mark.filterwarnings(_NO_CLOSED_FORM)
def test_hf_trainer_gradient_checkpointing(monkeypatch, tmp_path):
    """Activation (gradient) checkpointing re-runs each decoder layer's forward inside the backward pass:
    the captured statistics are those of the plain run, so the weights are the same bit for bit."""
    steps = 6
    calls = {"plain": 0, "gc": 0}

    def counter(key):
        def hook(module, args, output):
            calls[key] += 1
        return hook

    plain, _, trainer = _hf_trainer(monkeypatch, tmp_path / "plain", steps=steps)
    plain.model.layers[0].self_attn.q_proj.register_forward_hook(counter("plain"))
    trainer.train()
    transformers = pytest.importorskip("transformers")
    # transformers 5 renamed the option (the old name goes in v6)
    new_name = "activation_checkpointing" in transformers.TrainingArguments.__dataclass_fields__
    option = "activation_checkpointing" if new_name else "gradient_checkpointing"
    checkpointed, opt, trainer2 = _hf_trainer(monkeypatch, tmp_path / "gc", steps=steps, **{option: True})
    checkpointed.model.layers[0].self_attn.q_proj.register_forward_hook(counter("gc"))
    trainer2.train()
    assert getattr(checkpointed, "is_activation_checkpointing" if new_name else "is_gradient_checkpointing")
    assert calls == {"plain": 2 * steps, "gc": 4 * steps}  # every micro-batch's layer ran twice
    assert opt.skipped_steps == 0 and opt.last_step["controlled"] == 12
    for (k, v), (k2, v2) in zip(plain.state_dict().items(), checkpointed.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_strict_accepts_hf_gpt2_and_llama(arch, monkeypatch):
    """``EMSA(model, strict=True)`` on Hugging Face GPT-2 (Conv1D layers, tied embeddings, LayerNorm)
    and Llama (Linear projections, LlamaRMSNorm) built from small configs: every parameter gets a
    closed form and one step moves them all."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=2, vocab_size=64,
                                       max_position_embeddings=32)
        model = transformers.LlamaForCausalLM(cfg)
    opt = pmptrain.EMSA(model, strict=True)
    rules = [r["rule"] for r in opt.rule_table()]
    assert "fallback" not in rules
    if arch == "gpt2":
        assert rules.count("emsa") >= 2 * 4 + 2  # 4 Conv1D per block, wte+lm_head tied, wpe
        assert any("wte" in r["unit"] and "lm_head" in r["unit"] for r in opt.rule_table())
    ids = torch.randint(0, 64, (2, 16))
    before = [p.detach().clone() for p in model.parameters()]
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert not opt.last_step["skipped"] and opt.last_step["fallback"] == 0
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
