"""Generation: the KV cache is exact, greedy equals transformers' greedy, sampling is reproducible and
never picks a padded vocab id; the loader reads our checkpoints and Hugging Face directories."""
import contextlib
import io

import pytest
import torch
import torch.nn as nn

from conftest import requires_cuda
from gpt2 import generate as gen
from gpt2.model import GPT, GPTConfig, KVCache, sample_next
from numerics import assert_close

CFG = dict(block_size=48, vocab_size=300, n_layer=2, n_head=4, n_embd=32)  # 300 -> 384 padded


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


def random_model(seed=0, **kw):
    """float64 with wide weights: logits far apart compared with rounding, so argmax is stable, and
    greedy text that does not collapse into one repeated id."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**dict(CFG, **kw))).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
            else:
                p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def model():
    return random_model()


def prompt(B=3, T=5, seed=1):
    return torch.randint(0, 300, (B, T), generator=torch.Generator().manual_seed(seed))


def test_cache_logits_match_forward(model):
    idx = prompt(2, 30)
    full = model(idx)[0]  # (B, T, V)
    cache = KVCache(model.config, 2)
    for a, b in [(0, 7), (7, 8), (8, 20), (20, 21), (21, 30)]:  # prefill, single steps, chunks
        last = model.forward_cached(idx[:, a:b], cache)
        assert cache.pos == b
        assert (last - full[:, b - 1]).abs().max().item() < 1e-10
    with pytest.raises(ValueError, match="KV cache full: position 49 exceeds block_size 48"):
        model.forward_cached(prompt(2, 19), cache)


def test_greedy_with_and_without_cache(model):
    idx = prompt()
    cached = model.generate(idx, 40, temperature=0)
    assert cached.shape == (3, 45) and torch.equal(cached[:, :5], idx)
    assert torch.equal(cached, model.generate(idx, 40, temperature=0, use_cache=False))
    assert all(len(set(row[5:].tolist())) > 8 for row in cached)  # a real sequence, not one repeated id


def test_top_k_1_is_greedy(model):
    idx = prompt()
    greedy = model.generate(idx, 20, temperature=0)
    for temperature in (1.0, 0.7):
        assert torch.equal(model.generate(idx, 20, temperature=temperature, top_k=1), greedy)


def test_fixed_seed_same_samples(model):
    idx = prompt()
    sample = lambda seed, **kw: model.generate(idx, 30, top_p=0.95, generator=torch.Generator().manual_seed(seed), **kw)  # noqa: E731
    a = sample(7)
    assert torch.equal(a, sample(7))
    assert torch.equal(a, sample(7, use_cache=False))  # the cache changes nothing when sampling either
    assert not torch.equal(a, sample(8))
    assert not torch.equal(a, model.generate(idx, 30, temperature=0))


def test_never_samples_padded_ids(model):
    V = model.config.vocab_size

    class Leaky(nn.Module):  # the lm_head with padded columns that would win every draw
        def __init__(self, head):
            super().__init__()
            self.head = head

        def forward(self, x):
            out = self.head(x).clone()
            out[..., V:] = 1e4
            return out

    head = model.lm_head
    model.lm_head = Leaky(head)
    try:
        assert model.lm_head(torch.zeros(1, 32, dtype=torch.float64)).argmax().item() >= V  # the trap is armed
        idx = prompt()
        for use_cache in (True, False):
            for kw in (dict(temperature=0), dict(temperature=2.0), dict(top_k=50), dict(top_p=0.99)):
                g = torch.Generator().manual_seed(0)
                out = model.generate(idx, 12, use_cache=use_cache, generator=g, **kw)
                assert out.max().item() < V, (use_cache, kw)
    finally:
        model.lm_head = head


def test_greedy_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                  initializer_range=0.5, bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(cfg).double().eval()
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path)).double().eval()
    idx = prompt(2, 6)
    expect = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=30, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    got = ours.generate(idx, 30, temperature=0)
    assert expect.shape == got.shape == (2, 36)
    assert torch.equal(got, expect)
    assert all(len(set(row[6:].tolist())) > 8 for row in got)  # not a collapsed, easy-to-match sequence


def test_eos_stops_and_repeats():
    model = random_model()
    idx = prompt(2, 4)
    greedy = model.generate(idx, 10, temperature=0)
    eos = greedy[0, 6].item()  # row 0 produces it at its third new token
    out = model.generate(idx, 10, temperature=0, eos=eos)
    assert torch.equal(out[0, :7], greedy[0, :7]) and (out[0, 7:] == eos).all()
    alone = model.generate(idx[:1], 10, temperature=0, eos=eos)
    assert alone.shape == (1, 7)  # every row done: generation ends early


def test_block_size_is_a_clear_error(model):
    with pytest.raises(ValueError, match=r"prompt \(5 tokens\) \+ max_new_tokens \(44\) = 49 exceeds block_size 48"):
        model.generate(prompt(), 44)
    assert model.generate(prompt(), 43, temperature=0).shape == (3, 48)  # exactly block_size is fine


def test_sample_next_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draw = lambda **kw: {sample_next(logits, generator=g, **kw).item() for _ in range(300)}  # noqa: E731
    assert draw() == {0, 1, 2, 3}
    assert draw(top_k=2) == {0, 1}
    assert draw(top_p=0.7) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    assert draw(top_p=0.5) == {0}
    assert draw(top_p=0.96) == {0, 1, 2, 3}
    assert draw(top_k=3, top_p=0.9) == {0, 1, 2}
    assert sample_next(logits, temperature=0).item() == 0
    for bad in (dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            sample_next(logits, **bad)


def _save_ckpt(path, model, prefix=""):
    """As gpt2/train.py writes them: weights, config, and Python objects (RNG states) beside them."""
    import numpy as np

    sd = {prefix + k: v for k, v in model.state_dict().items()}
    torch.save({"model": sd, "config": model.config.to_dict(), "kernels": "torch", "step": 1,
                "rng": [{"numpy": np.random.get_state()}]}, path)


def test_load_model_checkpoints_and_run_dirs(tmp_path):
    early, late = random_model(seed=1), random_model(seed=2)
    _save_ckpt(tmp_path / "ckpt_000010.pt", early)
    _save_ckpt(tmp_path / "ckpt_000200.pt", late, prefix="_orig_mod.")  # a compiled model's state_dict
    same = lambda a, b: all(torch.equal(x, y.to(x.dtype)) for x, y in zip(a.state_dict().values(), b.state_dict().values()))  # noqa: E731
    assert same(gen.load_model(str(tmp_path / "ckpt_000010.pt")), early)
    assert same(gen.load_model(str(tmp_path)), late)  # the highest step
    torch.save({"model": {}}, tmp_path / "zzz_not_a_ckpt.pt")  # ckpt_*.pt win over other .pt files
    assert same(gen.load_model(str(tmp_path)), late)
    (tmp_path / "latest").write_text("ckpt_000010.pt\n")
    assert same(gen.load_model(str(tmp_path)), early)
    loaded = gen.load_model(str(tmp_path), kernels="torch", device="cpu")
    assert not loaded.training and loaded.config == early.config
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint here"):
        gen.load_model(str(empty))
    torch.save({"weights": 1}, empty / "other.pt")
    with pytest.raises(ValueError, match="not a checkpoint of ours"):
        gen.load_model(str(empty))


class Recorder(io.StringIO):
    def __init__(self):
        super().__init__()
        self.flushes = 0

    def flush(self):
        self.flushes += 1


def test_cli_streams_greedy_text(tmp_path):
    model = random_model(vocab_size=50257, n_embd=16)  # block_size 48  # the real vocab, so any token decodes
    _save_ckpt(tmp_path / "ckpt_000001.pt", model.float())
    out = Recorder()
    samples = gen.main(["--model", str(tmp_path), "--prompt", "Hello, world", "--max-new-tokens", "8",
                        "--temperature", "0"], out=out)
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    idx = torch.tensor([enc.encode("Hello, world")])
    expect = model.generate(idx, 8, temperature=0, eos=enc.eot_token)[0, idx.shape[1]:].tolist()
    expect = expect[: expect.index(enc.eot_token)] if enc.eot_token in expect else expect
    assert samples == [expect]
    assert out.getvalue().startswith("Hello, world")
    assert out.getvalue().rstrip("\n") == "Hello, world" + enc.decode(expect)
    assert out.flushes >= len(expect)  # one write per token: streamed, not printed at the end
    two = gen.main(["--model", str(tmp_path), "--max-new-tokens", "4", "--num-samples", "2", "--seed", "3"], out=Recorder())
    with pytest.raises(SystemExit):  # argparse error: block_size is 48
        gen.main(["--model", str(tmp_path), "--max-new-tokens", "48"], out=Recorder())
    assert len(two) == 2 and two == gen.main(["--model", str(tmp_path), "--max-new-tokens", "4", "--num-samples", "2",
                                              "--seed", "3"], out=Recorder())


def test_decode_speed_runs(model):
    assert gen.decode_tokens_per_sec(model, 2, new_tokens=8) > 0
    assert gen.decode_tokens_per_sec(model, 2, new_tokens=8, use_cache=False) > 0


@requires_cuda
def test_cuda_cached_path_with_triton_kernels_bf16():
    """On a GPU: the cached path (our LayerNorm/GELU kernels, SDPA with the offset mask) under bf16
    autocast is within 2x the error of the plain torch forward in bf16, both against float64."""
    from kernels import BackendUnavailable

    cfg = GPTConfig.preset("small")
    torch.manual_seed(0)
    try:
        model = GPT(cfg, kernels="triton").cuda().eval()
    except BackendUnavailable as e:
        pytest.skip(str(e))
    plain = GPT(cfg, kernels="torch").cuda().eval()
    plain.load_state_dict(model.state_dict())
    idx = torch.randint(0, cfg.vocab_size, (4, 200), device="cuda")
    with torch.no_grad():
        ref64 = plain.double()(idx)[0]
        plain.float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            baseline = plain(idx)[0].float()
            cache = KVCache(cfg, 4)
            for a, b in [(0, 150), (150, 151), (151, 152), (152, 200)]:
                last = model.forward_cached(idx[:, a:b], cache).float()
                assert_close(last, ref64[:, b - 1], baseline[:, b - 1], atol=1e-2, name=f"logits at {b - 1}")
        out = model.generate(idx[:, :8], 32, top_k=50, generator=torch.Generator("cuda").manual_seed(0))
    assert out.shape == (4, 40) and out.max().item() < cfg.vocab_size


def test_cli_missing_model_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        gen.main(["--model", str(tmp_path / "nothing_here"), "--max-new-tokens", "2"], out=Recorder())
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: ") and "nothing_here" in err


@pytest.mark.parametrize("flag, value, message", [("--max-new-tokens", "-1", "--max-new-tokens: must be >= 0, got -1"),
                                                  ("--num-samples", "0", "--num-samples: must be >= 1, got 0"),
                                                  ("--num-samples", "-2", "--num-samples: must be >= 1, got -2"),
                                                  ("--num-samples", "x", "--num-samples: expected an integer >= 1, got 'x'")])
def test_cli_rejects_negative_counts(tmp_path, capsys, flag, value, message):
    """Used to be accepted silently (nothing generated, or no sample at all); argparse refuses before loading a model."""
    with pytest.raises(SystemExit) as e:
        gen.main(["--model", str(tmp_path / "nothing_here"), flag, value], out=Recorder())
    assert e.value.code == 2 and message in capsys.readouterr().err


# ---- sampling arguments and CLI paths that no test pinned (found by mutation testing) --------------------

def test_temperature_scales_logits_before_softmax_and_top_p(monkeypatch):
    """The distribution sample_next draws from is softmax(logits / T), and top-p's nucleus is taken on that
    tempered distribution: probabilities (0.5, 0.3, 0.15, 0.05) at T=0.5 are (0.685, 0.247, 0.062, 0.007),
    so top_p=0.6 keeps id 0 alone (at T=1 it keeps 0 and 1)."""
    seen = []
    real = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda probs, *a, **k: (seen.append(probs.double()), real(probs, *a, **k))[1])
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    for T in (0.5, 1.0, 2.0):
        seen.clear()
        sample_next(p.log().float(), temperature=T, generator=torch.Generator().manual_seed(0))
        want = p ** (1 / T) / (p ** (1 / T)).sum()
        torch.testing.assert_close(seen[0], want, rtol=1e-5, atol=1e-6)
    seen.clear()
    sample_next(p.log().float(), temperature=0.5, top_p=0.6)
    sample_next(p.log().float(), temperature=1.0, top_p=0.6)
    assert seen[0].tolist() == [[1.0, 0.0, 0.0, 0.0]]
    torch.testing.assert_close(seen[1], torch.tensor([[0.625, 0.375, 0.0, 0.0]], dtype=torch.float64))


def test_find_checkpoint_prefers_trainer_checkpoints(tmp_path):
    for name in ("ckpt_000010.pt", "ckpt_000200.pt", "export_999999.pt"):
        (tmp_path / name).write_bytes(b"")
    assert gen.find_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt_000200.pt")  # not the higher export_*
    other = tmp_path / "other"
    other.mkdir()
    for name in ("model_5.pt", "model_40.pt", "final.pt"):
        (other / name).write_bytes(b"")
    assert gen.find_checkpoint(str(other)) == str(other / "model_40.pt")
    (other / "latest").write_text("no_such_file.pt\n")  # names nothing: `latest` is the checkpoint itself
    assert gen.find_checkpoint(str(other)) == str(other / "latest")


def test_load_checkpoint_strips_ddp_prefix(tmp_path):
    model = random_model(seed=3)
    _save_ckpt(tmp_path / "ddp.pt", model, prefix="module.")
    loaded = gen.load_model(str(tmp_path / "ddp.pt"))
    assert all(torch.equal(a, b.to(a.dtype)) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_load_model_from_args_dtype(tmp_path):
    import argparse

    _save_ckpt(tmp_path / "ckpt_1.pt", random_model())
    args = lambda **kw: argparse.Namespace(**dict(dict(model=str(tmp_path), kernels="torch", device="cpu", dtype=None), **kw))  # noqa: E731
    model, device, autocast = gen.load_model_from_args(args())
    assert device == "cpu" and not model.training
    assert isinstance(autocast, contextlib.nullcontext)  # float32 on the CPU unless asked
    _, _, autocast = gen.load_model_from_args(args(dtype="bfloat16"))
    assert isinstance(autocast, torch.autocast) and autocast.fast_dtype == torch.bfloat16


@pytest.fixture(scope="module")
def eot_model_dir(tmp_path_factory):
    """A checkpoint whose every next token is <|endoftext|> (50256): ln_f outputs a constant u, and u is
    aligned with the (tied) embedding row of 50256, far above every other logit."""
    model = random_model(vocab_size=50257, n_embd=16).float()
    u = torch.randn(16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(u)
        model.transformer.wte.weight[50256] = 10 * u
    path = tmp_path_factory.mktemp("eot")
    _save_ckpt(path / "ckpt_000001.pt", model)
    return str(path)


def test_cli_stops_at_endoftext_and_block_size_bounds(eot_model_dir):
    out = Recorder()
    assert gen.main(["--model", eot_model_dir, "--prompt", "Hi", "--max-new-tokens", "5"], out=out) == [[]]
    assert out.getvalue() == "Hi\n"  # <|endoftext|> ends the sample and is not printed
    # 1 prompt token (<|endoftext|>) + 47 = block_size 48: allowed; 48 is not; 0 new tokens is allowed.
    assert gen.main(["--model", eot_model_dir, "--max-new-tokens", "47"], out=Recorder()) == [[]]
    with pytest.raises(SystemExit) as e:
        gen.main(["--model", eot_model_dir, "--max-new-tokens", "48"], out=Recorder())
    assert e.value.code == 2
    out = Recorder()
    assert gen.main(["--model", eot_model_dir, "--prompt", "Hi", "--max-new-tokens", "0"], out=out) == [[]]
    assert out.getvalue() == "Hi\n"


@pytest.fixture(scope="module")
def cli_model_dir(tmp_path_factory):
    model = random_model(vocab_size=50257, n_embd=16).float()
    path = tmp_path_factory.mktemp("cli")
    _save_ckpt(path / "ckpt_000001.pt", model)
    return str(path), model


def test_cli_sampling_flags_reach_the_sampler(cli_model_dir, monkeypatch):
    """--seed, --top-k and --no-cache are passed on; a long prompt is used whole."""
    import tiktoken

    path, model = cli_model_dir
    text = "The quick brown fox jumps over the lazy dog, again and again"
    idx = torch.tensor([tiktoken.get_encoding("gpt2").encode(text)])
    greedy = model.generate(idx, 6, temperature=0)[0, idx.shape[1]:].tolist()
    run = lambda *flags: gen.main(["--model", path, "--prompt", text, "--max-new-tokens", "6", *flags], out=Recorder())  # noqa: E731
    assert run("--temperature", "0") == [greedy]
    assert run("--top-k", "1", "--temperature", "1.5") == [greedy]
    a = run("--seed", "3")
    assert a == run("--seed", "3") and a != run("--seed", "4") and a != [greedy]
    monkeypatch.setattr(GPT, "forward_cached", lambda *a, **k: pytest.fail("--no-cache used the KV cache"))
    assert run("--no-cache", "--seed", "3") == a  # the cache changes nothing but the speed


@pytest.mark.parametrize("kernels, message", [("torch,layer_norm=cuda", "not implemented by backend 'cuda'"),
                                              ("tpu", "unknown backend 'tpu'")])
def test_cli_bad_kernels_is_one_error_line(cli_model_dir, capsys, kernels, message):
    with pytest.raises(SystemExit) as e:
        gen.main(["--model", cli_model_dir[0], "--kernels", kernels, "--max-new-tokens", "2"], out=Recorder())
    err = capsys.readouterr().err  # (after the note our checkpoints print on how they are unpickled)
    assert e.value.code == 1 and "Traceback" not in err, err
    assert err[err.index("\nerror: "):].count("error: ") == 1 and message in err, err
