"""GPT-2 model: sizes, presets, padding, init, and Hugging Face checkpoint parity."""
import json

import pytest
import torch

from gpt2.model import GPT, GPTConfig

TINY = dict(block_size=32, vocab_size=100, n_layer=2, n_head=2, n_embd=64)


def test_124m_parameter_count():
    with torch.device("meta"):  # no memory, no init cost
        model = GPT(GPTConfig())
    assert model.num_params() == 124_439_808  # OpenAI's checkpoint
    assert model.num_params(padded=True) == 124_439_808 + (50304 - 50257) * 768
    assert model.config.padded_vocab_size == 50304
    assert model.lm_head.weight is model.transformer.wte.weight


# (n_layer, n_head, n_embd, block_size), and OpenAI's parameter counts for the four GPT-2 sizes
PRESETS = {"gpt2": (12, 12, 768, 1024, 124_439_808), "gpt2-medium": (24, 16, 1024, 1024, 354_823_168),
           "gpt2-large": (36, 20, 1280, 1024, 774_030_080), "gpt2-xl": (48, 25, 1600, 1024, 1_557_611_200),
           "small": (6, 6, 384, 512, None), "tiny": (4, 4, 128, 256, None)}


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets(name):
    n_layer, n_head, n_embd, block_size, params = PRESETS[name]
    cfg = GPTConfig.preset(name)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size) == (n_layer, n_head, n_embd, block_size, 50257)
    if params:  # the closed form of num_params(): no model needed
        C, L = n_embd, n_layer
        assert cfg.vocab_size * C + block_size * C + L * (12 * C * C + 13 * C) + 2 * C == params
    over = GPTConfig.preset(name, n_layer=1, block_size=64)  # overrides win, the rest stays
    assert (over.n_layer, over.n_head, over.n_embd, over.block_size) == (1, n_head, n_embd, 64)
    with pytest.raises(ValueError, match="unknown model preset"):
        GPTConfig.preset("gpt5")
    with pytest.raises(ValueError, match=r"n_embd \(100\) must be divisible by n_head \(3\)"):
        GPTConfig(n_embd=100, n_head=3)


@pytest.mark.parametrize("vocab, padded", [(1, 128), (100, 128), (128, 128), (256, 256), (257, 384), (50257, 50304)])
def test_padded_vocab_size(vocab, padded):
    assert GPTConfig(vocab_size=vocab).padded_vocab_size == padded  # the next multiple of 128, itself if one


def test_init_scales_residual_projections():
    model = GPT(GPTConfig.preset("small"))
    for block in model.transformer.h:
        for proj in (block.attn.c_proj, block.mlp.c_proj):  # both residual projections: 0.02 / sqrt(2 n_layer)
            assert abs(proj.weight.std().item() - 0.02 / (2 * 6) ** 0.5) < 5e-4
        for lin in (block.attn.c_attn, block.mlp.c_fc):
            assert abs(lin.weight.std().item() - 0.02) < 5e-4
        for lin in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            assert torch.count_nonzero(lin.bias) == 0
        for ln in (block.ln_1, block.ln_2):
            assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)
    for emb in (model.transformer.wte, model.transformer.wpe):  # embeddings: 0.02 too (not nn.Embedding's 1.0)
        assert abs(emb.weight.std().item() - 0.02) < 5e-4 and abs(emb.weight.mean().item()) < 5e-4


def test_forward_shapes_and_padding_never_wins():
    model = GPT(GPTConfig(**TINY))
    idx = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        model.lm_head.weight[100:] = 10.0  # padded rows: huge logits if they leaked
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 9, 100)  # sliced to the real vocab
    assert torch.isfinite(loss) and loss.item() < 10  # padded logits excluded from the loss
    assert model(idx)[1] is None
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("spec", ["torch", "torch,linear_cross_entropy=torch"])
def test_loss_excludes_padded_columns_and_ignored_targets(spec):
    """Both loss paths (full logits + cross_entropy, and linear_cross_entropy, which never builds the logits)
    give the float64 cross-entropy of the real-vocab logits, with forward's ignore_index honored. The padded
    lm_head rows are random and large here (a constant row would give ~0 logits: LayerNorm output has zero mean)."""
    from numerics import assert_close

    model = GPT(GPTConfig(**TINY), kernels=spec)
    with torch.no_grad():
        model.lm_head.weight[100:] = 3 * torch.randn(28, 64)
    idx = torch.randint(0, 100, (2, 9))
    targets = idx.roll(-1, dims=1)
    targets[0, :4] = -100
    targets[1, -1] = -100
    with torch.no_grad():
        logits = model(idx)[0]  # no targets: logits on both paths
        expect = torch.nn.functional.cross_entropy(logits.double().view(-1, 100), targets.view(-1), ignore_index=-100)
        baseline = torch.nn.functional.cross_entropy(logits.view(-1, 100), targets.view(-1), ignore_index=-100)
        out, loss = model(idx, targets, ignore_index=-100)
    assert (out is None) == ("linear_cross_entropy" in spec)
    assert_close(loss, expect, baseline, atol=1e-5, name="loss")


def test_padded_rows_get_no_gradient():
    model = GPT(GPTConfig(**TINY))
    idx = torch.randint(0, 100, (2, 9))
    model(idx, idx)[1].backward()
    assert model.transformer.wte.weight.grad[100:].abs().max() == 0


def _hf_model(tmp_path, **kw):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(**{**dict(vocab_size=300, n_positions=64, n_embd=48, n_layer=2, n_head=4), **kw})
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # random LN params too, so a swapped weight/bias shows up
        for name, p in hf.named_parameters():
            if "ln" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    hf.save_pretrained(tmp_path)
    return hf


def test_hf_parity_logits_and_loss(tmp_path):
    # not GPT-2's 1e-5: the config's epsilon must reach every LayerNorm (embeddings have variance ~1e-3)
    hf = _hf_model(tmp_path, layer_norm_epsilon=1e-3)
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    assert ours.config.vocab_size == 300 and ours.config.padded_vocab_size == 384
    assert ours.config.layer_norm_eps == 1e-3
    assert ours.lm_head.weight is ours.transformer.wte.weight
    assert torch.count_nonzero(ours.transformer.wte.weight[300:]) == 0  # padded rows zeroed, not left random
    idx = torch.randint(0, 300, (3, 40))
    with torch.no_grad():
        expect = hf(idx, labels=idx)
        logits, _ = ours(idx)
        # HF shifts labels inside; compare the same next-token loss
        _, loss = ours(idx[:, :-1], idx[:, 1:])
    assert (logits - expect.logits).abs().max().item() <= 1e-5
    assert abs(loss.item() - expect.loss.item()) <= 1e-5


def test_hf_state_dict_without_prefix_and_with_mask_buffers(tmp_path):
    """A GPT2Model state dict (keys without "transformer.") and the causal-mask buffers older transformers
    saved (attn.bias, attn.masked_bias) load: the prefix is added, the buffers are skipped."""
    hf = _hf_model(tmp_path)
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    for i in range(2):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64, dtype=torch.bool)).view(1, 1, 64, 64)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    ours = GPT(GPTConfig(block_size=64, vocab_size=300, n_layer=2, n_head=4, n_embd=48)).eval()
    ours.load_hf_state_dict(sd, "hf.bin")
    idx = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert (ours(idx)[0] - hf(idx).logits).abs().max().item() <= 1e-5


def test_hf_errors_name_the_problem(tmp_path):
    _hf_model(tmp_path)
    from safetensors.torch import load_file, save_file

    sd = load_file(tmp_path / "model.safetensors")
    bad = dict(sd)
    bad["transformer.h.0.mlp.c_fc.weight"] = bad["transformer.h.0.mlp.c_fc.weight"][:, :10].contiguous()
    save_file(bad, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="c_fc.weight has shape"):
        GPT.from_pretrained(str(tmp_path))
    bad = dict(sd)
    bad["transformer.h.0.mlp.extra"] = torch.zeros(1)
    save_file(bad, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match="unknown key 'transformer.h.0.mlp.extra'"):
        GPT.from_pretrained(str(tmp_path))
    bad = {k: v for k, v in sd.items() if "ln_f" not in k}
    save_file(bad, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match="missing keys.*ln_f"):
        GPT.from_pretrained(str(tmp_path))
    bad = dict(sd)
    bad["lm_head.weight"] = bad["transformer.wte.weight"] + 1.0
    save_file(bad, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="ties the token embedding"):
        GPT.from_pretrained(str(tmp_path))
    save_file(sd, tmp_path / "model.safetensors")
    cfg = json.loads((tmp_path / "config.json").read_text())
    for key, value in (("tie_word_embeddings", False), ("scale_attn_by_inverse_layer_idx", True),
                       ("reorder_and_upcast_attn", True), ("add_cross_attention", True)):
        (tmp_path / "config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ValueError, match=f"{key}={value}"):
            GPT.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "activation_function": "gelu_pytorch_tanh"}))
    GPT.from_pretrained(str(tmp_path))  # the same tanh GELU under its other name
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin"):
        GPT.from_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["activation_function"] = "relu"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="activation_function 'relu'"):
        GPT.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        GPT.from_pretrained(str(tmp_path / "nope"))


def test_kernels_switch_whole_model():
    model = GPT(GPTConfig(**TINY), kernels="torch")
    assert model.kernels == "torch"
    assert all(block.mlp.ops is model.ops for block in model.transformer.h)


def test_triton_model_under_torch_compile_equals_eager(device):
    """The whole model with every Triton kernel (custom ops, incl. add_layer_norm and its backward with the
    residual gradient) traced by torch.compile (aot_eager: the graphs run the same kernels): bitwise the
    eager loss and gradients."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=64)
    eager = GPT(config, kernels="triton").to(device)
    traced = GPT(config, kernels="triton").to(device)
    traced.load_state_dict(eager.state_dict())
    idx = torch.randint(0, 64, (2, 16), device=device)
    compiled = torch.compile(traced, backend="aot_eager")
    losses = []
    for model in (eager, compiled):
        _, loss = model(idx, idx)
        loss.backward()
        losses.append(loss.detach())
    assert torch.isfinite(losses[0]) and torch.equal(losses[0], losses[1])
    grads = dict(traced.named_parameters())
    for name, p in eager.named_parameters():
        assert torch.equal(p.grad, grads[name].grad), name


@pytest.mark.parametrize("spec", ["torch", "torch,layer_norm=triton", "torch,linear_cross_entropy=torch",
                                  "torch,layer_norm=triton,linear_cross_entropy=triton"])
def test_layer_norms_write_the_autocast_dtype(spec, device, monkeypatch):
    """Under bf16 autocast every LayerNorm writes its output in bf16, the dtype of the matmul it feeds (no
    separate cast kernel); the residual stream stays fp32. Except ln_f before linear_cross_entropy, which
    scales its hidden gradient after its matmul: fp32 there, or that gradient would be rounded twice. Loss
    and gradients match the model with fp32 LayerNorm outputs, where the matmuls' autocast did the cast
    (bitwise with torch's LayerNorm: the same rounding)."""
    from gpt2 import model as M

    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=64)
    model = GPT(config, kernels=spec).to(device)
    idx = torch.randint(0, 64, (2, 16), device=device)
    outs = []  # (what, dtype) of every LayerNorm output, ln_2's (add_forward) included
    for m in model.modules():
        if isinstance(m, M.LayerNorm):
            m.register_forward_hook(lambda m, i, o: outs.append(("ln", o.dtype)))
    add = model.ops.add_layer_norm
    monkeypatch.setattr(model.ops, "add_layer_norm", lambda *a, **k: (lambda r: outs.append(("s", r[0].dtype))
                                                                      or outs.append(("add", r[1].dtype)) or r)(add(*a, **k)))
    runs = []
    for choice in (M.matmul_dtype, lambda x: None):  # the model's, then fp32 LayerNorm outputs
        monkeypatch.setattr(M, "matmul_dtype", choice)
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            _, loss = model(idx, idx)
        loss.backward()
        runs.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    bf16, fp32 = torch.bfloat16, torch.float32
    model_run, fp32_run = outs[:len(outs) // 2], outs[len(outs) // 2:]
    ln_f = fp32 if "linear_cross_entropy" in spec else bf16
    # block 0: ln_1 (plain), ln_2 (+ attn); block 1: ln_1 (+ block 0's mlp), ln_2 (+ attn); ln_f (+ block 1's mlp)
    assert model_run == [("ln", bf16)] + [("s", fp32), ("add", bf16)] * 3 + [("s", fp32), ("add", ln_f)], model_run
    assert fp32_run == [("ln", fp32)] + [("s", fp32), ("add", fp32)] * 4, fp32_run
    for a, b in zip(*runs):
        assert torch.isfinite(a).all()
        if "layer_norm=triton" not in spec:
            assert torch.equal(a, b)
        elif device == "cuda":  # the kernel's bf16 store rounds to nearest, as the cast does
            torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)
        else:  # the interpreter truncates bf16 stores (biased): close relative to each tensor's scale
            assert (a - b).abs().max() <= 2e-2 * b.abs().max() + 1e-6


@pytest.mark.parametrize("spec", ["torch", "triton", "triton,cross_entropy=cuda", "triton,linear_cross_entropy=triton"])
def test_meta_device_shape_inference(spec):
    """`with torch.device("meta")`: build the model and run forward + backward without memory or compute
    (shape and memory planning). Every backend's ops take their fake implementations there."""
    import kernels

    try:
        kernels.get_ops(spec)
    except kernels.BackendUnavailable as e:
        pytest.skip(str(e))
    with torch.device("meta"):
        model = GPT(GPTConfig.preset("tiny"), kernels=spec)
        idx = torch.zeros(2, 16, dtype=torch.long)
        logits, loss = model(idx, idx)
        loss.backward()
    V = model.config.vocab_size
    assert loss.is_meta and loss.shape == ()
    assert logits is None if "linear_cross_entropy" in spec else logits.shape == (2, 16, V)
    assert all(p.grad is not None and p.grad.is_meta and p.grad.shape == p.shape for p in model.parameters())


@pytest.mark.parametrize("autocast", [False, True])
def test_residual_adds_are_fused_into_the_next_layer_norm(autocast, monkeypatch):
    """Every residual add is done by the LayerNorm that reads the sum (ops.add_layer_norm): x + attn by ln_2,
    x + mlp by the next block's ln_1 or by ln_f; only block 0's ln_1 is a plain LayerNorm. With the torch
    backend that is the same two PyTorch ops per add: logits, loss and every gradient are bitwise those of
    GPT-2 written the usual way (x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))), in fp32 and under bf16 autocast."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=64, n_layer=3, n_head=2, n_embd=64)
    model = GPT(config, kernels="torch")
    idx = torch.randint(0, 64, (2, 16))
    calls = []
    for name in ("layer_norm", "add_layer_norm"):
        fn = getattr(model.ops, name)
        monkeypatch.setattr(model.ops, name, lambda *a, fn=fn, name=name, **k: calls.append(name) or fn(*a, **k))

    def unfused(model, idx):
        t = model.transformer
        x = t.wte(idx) + t.wpe(torch.arange(idx.shape[1]))
        for b in t.h:
            x = x + b.attn(b.ln_1(x))
            x = x + b.mlp(b.ln_2(x))
        logits = model.lm_head(t.ln_f(x))
        loss = model.ops.cross_entropy(logits.view(-1, logits.shape[-1]), idx.reshape(-1), -1, config.vocab_size)
        return logits[..., :config.vocab_size], loss

    runs = []
    for forward in (lambda m, i: m(i, i), unfused):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits, loss = forward(model, idx)
        loss.backward()
        runs.append([logits.detach(), loss.detach()] + [p.grad.clone() for p in model.parameters()])
        if not runs[1:]:
            assert calls == ["layer_norm"] + ["add_layer_norm"] * (2 * config.n_layer), calls
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_forward_cached_fuses_the_residual_adds_too(monkeypatch):
    """The KV-cache path adds its residuals the same way as forward: block 0's ln_1 plain, every other add in
    the LayerNorm after it (ln_2, the next ln_1, ln_f), and the same logits as forward at the last position."""
    from gpt2.model import KVCache

    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=64, n_layer=3, n_head=2, n_embd=64)
    model = GPT(config, kernels="torch").double().eval()
    idx = torch.randint(0, 64, (2, 9))
    full = model(idx)[0]
    calls = []
    for name in ("layer_norm", "add_layer_norm"):
        fn = getattr(model.ops, name)
        monkeypatch.setattr(model.ops, name, lambda *a, fn=fn, name=name, **k: calls.append(name) or fn(*a, **k))
    cache = KVCache(config, 2)
    for a, b in [(0, 5), (5, 6), (6, 9)]:
        calls.clear()
        last = model.forward_cached(idx[:, a:b], cache)
        assert calls == ["layer_norm"] + ["add_layer_norm"] * (2 * config.n_layer), calls
        assert (last - full[:, b - 1]).abs().max().item() < 1e-12


def test_a_model_without_blocks():
    """n_layer = 0 (embeddings, ln_f, lm_head): no residual is pending, ln_f is a plain LayerNorm, in forward
    and in the KV-cache path alike."""
    from gpt2.model import KVCache

    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=64, n_layer=0, n_head=2, n_embd=64)
    model = GPT(config, kernels="torch").double().eval()
    idx = torch.randint(0, 64, (2, 7))
    full = model(idx)[0]
    last = model.forward_cached(idx, KVCache(config, 2))
    assert (last - full[:, -1]).abs().max().item() < 1e-12


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "add"])
def test_pending_forward_keeps_the_dtype_when_asked(residual):
    """LayerNorm.pending_forward: (x + r, ln(x + r)), or (x, ln(x)) when no residual is pending (None); under
    autocast ln's output is in the matmul dtype (bf16), or in x's dtype (fp32) with keep_dtype, either way."""
    from gpt2.model import LayerNorm
    from kernels import get_ops

    torch.manual_seed(0)
    ln = LayerNorm(64, 1e-5, get_ops("torch"))
    x, r = torch.randn(3, 64), torch.randn(3, 64)
    s_want = x + r if residual else x
    for keep_dtype, dtype in ((False, torch.bfloat16), (True, torch.float32)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            s, y = ln.pending_forward(x, r if residual else None, keep_dtype=keep_dtype)
        assert torch.equal(s, s_want) and y.dtype == dtype, (keep_dtype, y.dtype)
        want = torch.nn.functional.layer_norm(s_want, (64,), ln.weight, ln.bias, 1e-5)
        assert torch.allclose(y.float(), want, atol=1e-2 if dtype == torch.bfloat16 else 1e-6)
