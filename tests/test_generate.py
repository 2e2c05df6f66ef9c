"""Generation: KV cache, greedy equal to transformers, sampling functions, stops, TP, the CLI."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import megaevo  # noqa: E402
from megaevo import cli  # noqa: E402
from megaevo.inference import SamplingParams, apply_repetition_penalty, filter_top_k_top_p, sample  # noqa: E402
from megaevo.inference.kv_cache import KVCache  # noqa: E402
from megaevo.model.args import ModelArgs  # noqa: E402
from megaevo.model.llama import LlamaStage  # noqa: E402

from dist_utils import run_distributed  # noqa: E402
from test_convert_hf import write_tokenizer  # noqa: E402

VOCAB = 300
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, initializer_range=0.3,
             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
PROMPTS = [[5, 17, 33, 9, 120], [7, 250], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A random tiny Llama built by transformers, saved with a word-level tokenizer."""
    out = tmp_path_factory.mktemp("gen") / "llama"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE)).float().eval()
    model.save_pretrained(out)
    write_tokenizer(out, VOCAB)
    return out, model


@pytest.fixture(scope="module")
def model(hf_model):
    return megaevo.load(hf_model[0])


def test_kv_cache_decode_equals_full_forward():
    args = ModelArgs(vocab_size=VOCAB, hidden_size=64, ffn_hidden_size=96, num_layers=2, num_heads=4,
                     num_kv_heads=2, max_seq_len=64)
    stage = LlamaStage(args, seed=3).eval()
    x = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = stage(x)
        cache = KVCache.for_model(stage, 3, 24)
        steps = [stage(x[:, :7], kv_cache=cache)]
        for t in range(7, 24):
            steps.append(stage(x[:, t:t + 1], position_ids=torch.full((3, 1), t), kv_cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 24


@pytest.mark.parametrize("pack", [False, True])
def test_decode_steps_on_inference_weights_equal_the_cached_forward(pack):
    """Decode steps on the inference-only copies of the projections (packed for the batch size where MKL
    is there) give the logits of the model's own cached forward, step after step."""
    from megaevo.model.decode import MIN_PACK_STEPS, decode_linears, mkl_packed_gemm_available, packed_batch_sizes

    args = ModelArgs(vocab_size=VOCAB, hidden_size=64, ffn_hidden_size=96, num_layers=2, num_heads=4,
                     num_kv_heads=2, max_seq_len=64, qkv_bias=True, tie_embeddings=True)
    chunk = LlamaStage(args, seed=4).eval()
    x = torch.randint(0, VOCAB, (3, 26), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        caches = [KVCache.for_model(chunk, 3, 26) for _ in range(2)]
        for cache in caches:
            chunk(x[:, :6], kv_cache=cache, last_only=True)
        linears = decode_linears(chunk, 3, MIN_PACK_STEPS if pack else 1)
        for t in range(6, 26):
            pos = torch.full((3, 1), t)
            plain = chunk(x[:, t:t + 1], position_ids=pos, kv_cache=caches[0])[:, -1, :VOCAB]
            fast = chunk(x[:, t:t + 1], position_ids=pos, kv_cache=caches[1], linears=linears)[:, -1]
            torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    assert packed_batch_sizes(chunk) == ([3] if pack and mkl_packed_gemm_available() else [])


def test_load_hf_matches_transformers_logits(hf_model, model):
    _, hf = hf_model
    x = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        torch.testing.assert_close(model.forward(x), hf(x).logits, rtol=1e-4, atol=1e-4)
    labels = torch.tensor([PROMPTS[2][1:] + [-100]])
    lp = model.logprobs(x, labels)
    ref = torch.log_softmax(model.forward(x), -1)[0, :-1].gather(-1, labels[0, :-1, None]).squeeze(-1)
    torch.testing.assert_close(lp[0, :-1], ref, rtol=1e-5, atol=1e-5)
    assert lp[0, -1].item() == 0.0
    assert model.tokenizer is not None and model.eos_ids[0] == 2


def test_greedy_equals_transformers_and_logprobs_match_forward(hf_model, model):
    _, hf = hf_model
    params = SamplingParams(max_new_tokens=20, stop_token_ids=())
    outs = model.generate(PROMPTS, params)
    for prompt, (c,) in zip(PROMPTS, outs):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
        assert c.token_ids == ref
        assert c.prompt_token_ids == prompt and c.finish_reason == "length"
        seq = torch.tensor([prompt + c.token_ids])
        full = torch.log_softmax(model.forward(seq)[0], -1)
        expect = full[len(prompt) - 1:-1].gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(c.logprobs), expect, rtol=1e-4, atol=1e-4)


def test_batch_and_padding_do_not_change_greedy(model):
    params = SamplingParams(max_new_tokens=12, stop_token_ids=())
    batched = model.generate(PROMPTS, params)
    alone = [model.generate([p], params)[0] for p in PROMPTS]
    assert [c[0].token_ids for c in batched] == [c[0].token_ids for c in alone]


def test_repetition_penalty_and_top_k_top_p_reference():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0], [1.0, 1.0, 0.0, -0.5, 4.0]])
    out = apply_repetition_penalty(logits, [[0, 1], [4]], 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0, -2.0], [1.0, 1.0, 0.0, -0.5, 2.0]]
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, [0, 1]] = mask[1, 4] = True
    assert torch.equal(apply_repetition_penalty(logits, mask, 2.0), out)
    # the same as transformers' processors
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    ids = torch.tensor([[0, 1], [4, 4]])
    assert torch.equal(RepetitionPenaltyLogitsProcessor(2.0)(ids, logits.clone()), out)
    top_k = filter_top_k_top_p(logits, top_k=2)
    assert torch.isinf(top_k).sum(-1).tolist() == [3, 2]  # row 2: the tie at 1.0 keeps both
    assert torch.equal(top_k, TopKLogitsWarper(2)(ids, logits.clone()))
    for p in (0.3, 0.7, 0.95):
        assert torch.equal(filter_top_k_top_p(logits, top_p=p), TopPLogitsWarper(p)(ids, logits.clone()))
    both = filter_top_k_top_p(logits, top_k=3, top_p=0.8)
    ref = TopPLogitsWarper(0.8)(ids, TopKLogitsWarper(3)(ids, logits.clone()))
    assert torch.equal(both, ref)
    # greedy takes the argmax after the penalty; logprobs come from the raw logits
    tokens, lp = sample(logits, SamplingParams(repetition_penalty=2.0), seen=[[3], []])
    assert tokens.tolist() == [0, 4]
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1)[[0, 1], [0, 4]])


def test_sampling_is_reproducible_with_a_seed(model):
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9, n=3, seed=7,
                            stop_token_ids=())
    a = model.generate(PROMPTS[:2], params)
    b = model.generate(PROMPTS[:2], params)
    assert [[c.token_ids for c in cs] for cs in a] == [[c.token_ids for c in cs] for cs in b]
    assert all(len(cs) == 3 for cs in a)
    assert len({tuple(c.token_ids) for c in a[0]}) > 1  # n samples differ


def test_stops_eos_strings_and_length(model):
    free = model.generate([PROMPTS[0]], SamplingParams(max_new_tokens=12, stop_token_ids=()))[0][0]
    words = free.text.split()
    stop = " ".join(words[3:5])  # completed by the 5th token
    cut = model.generate([PROMPTS[0]], SamplingParams(max_new_tokens=12, stop=("zzz", stop),
                                                      stop_token_ids=()))[0][0]
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[:free.text.index(stop)]
    assert cut.token_ids == free.token_ids[:5]
    tok = free.token_ids[4]
    by_id = model.generate([PROMPTS[0]], SamplingParams(max_new_tokens=12, stop_token_ids=(tok,)))[0][0]
    first = free.token_ids.index(tok)
    assert by_id.finish_reason == "stop" and by_id.token_ids == free.token_ids[:first + 1]
    assert by_id.text == model.tokenizer.decode(free.token_ids[:first])
    capped = model.generate([PROMPTS[0]], SamplingParams(max_new_tokens=12, max_length=8, stop_token_ids=()))[0][0]
    assert capped.finish_reason == "length" and capped.token_ids == free.token_ids[:3]
    text = model.generate(["w5 w17 w33"], SamplingParams(max_new_tokens=3, add_bos=True, stop_token_ids=()))[0][0]
    assert text.prompt_token_ids == [1, 5, 17, 33] and len(text.token_ids) == 3


def test_a_prompt_with_no_room_warns_with_its_row_and_length(model, caplog):
    long = [(7 * i) % VOCAB for i in range(SHAPE["max_position_embeddings"] + 2)]
    with caplog.at_level("WARNING", logger="megaevo"):
        out = model.generate([PROMPTS[0], long], SamplingParams(max_new_tokens=4, stop_token_ids=()))
    assert len(out[0][0].token_ids) == 4
    assert out[1][0].token_ids == [] and out[1][0].finish_reason == "length"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "1 of 2 prompt(s)" in warnings[0] and "model.max_seq_len=128" in warnings[0]
    assert "row 1: 130 tokens" in warnings[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="megaevo"):
        model.generate([PROMPTS[0]], SamplingParams(max_new_tokens=4, max_length=5, stop_token_ids=()))
    assert "within max_length=5 (row 0: 5 tokens)" in caplog.text


# ---------------------------------------------------------------- generation on the training model
GEN_PROMPTS = [[5, 17, 33, 9], [7, 250, 3], [1, 2, 3, 4, 5], [300, 301]]


def _generate(stage, state, params):
    from megaevo.inference.generate import generate_rows

    stage.rope_tables(next(stage.parameters()).device)  # outside inference mode, as RL rollouts build them
    return generate_rows(stage, state, GEN_PROMPTS, params)


def _assert_same_generation(got, want):
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), rtol=0, atol=1e-5)


def test_generation_follows_optimizer_steps_and_loads(tmp_path):
    """The training model generates what a fresh model holding its weights generates, after optimizer
    updates and after loading a checkpoint: no packed or cached copy of a weight outlives a change."""
    from megaevo.model.decode import MIN_PACK_STEPS, mkl_packed_gemm_available, packed_batch_sizes
    from megaevo.stages import build_stage
    from megaevo.training.trainer import Trainer
    from helpers import config, make_data

    cfg = config(make_data(tmp_path / "data"), tmp_path / "run", **{
        "train.iters": 3, "train.eval_interval": 0, "checkpoint.interval": 1, "model.max_seq_len": 64,
        "optim.lr": 3e-2})
    trainer = Trainer(cfg, build_stage)
    stage, state = trainer.actor.chunks[0], trainer.state
    params = SamplingParams(max_new_tokens=MIN_PACK_STEPS + 8, stop_token_ids=())  # greedy, long enough to pack
    before = _generate(stage, state, params)
    if mkl_packed_gemm_available():  # the decode weights were packed for this batch and are cached
        assert len(GEN_PROMPTS) in packed_batch_sizes(stage)
    trainer.fit()  # three optimizer updates
    checkpoints = tmp_path / "run" / "checkpoints"
    after = _generate(stage, state, params)
    _assert_same_generation(after, _generate(*_loaded(checkpoints / "iter_0000003"), params))
    assert [c.token_ids for c in after] != [c.token_ids for c in before]  # the updates changed the greedy tokens
    trainer.load_weights(checkpoints / "iter_0000001")
    _assert_same_generation(_generate(stage, state, params), _generate(*_loaded(checkpoints / "iter_0000001"), params))


def _loaded(path):
    m = megaevo.load(path)
    return m.chunk, m.state


def test_an_unknown_dtype_is_a_user_error(hf_model):
    from megaevo.errors import UserError

    with pytest.raises(UserError, match=r"megaevo\.load: unknown dtype 'fp64' \(use one of .*bf16"):
        megaevo.load(hf_model[0], dtype="fp64")


def test_tp_is_refused_in_one_process(hf_model):
    with pytest.raises(ValueError, match="torchrun"):
        megaevo.load(hf_model[0], tp=2)
    with pytest.raises(ValueError, match="pipeline"):
        megaevo.load(hf_model[0], pp=2)


def test_cli_generate_json_on_a_checkpoint(hf_model, model, tmp_path, capsys):
    from megaevo.convert import import_hf

    import_hf(hf_model[0], tmp_path / "ckpt", progress=False)
    rc = cli.main(["generate", "--load", str(tmp_path / "ckpt"), "--prompt", "w5 w17 w33 w9 w120",
                   "--prompt", "w7 w250", "--max-new-tokens", "6", "--json"])
    assert rc == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(rows) == 2
    expect = model.generate(PROMPTS[:2], SamplingParams(max_new_tokens=6))
    assert [r["token_ids"] for r in rows] == [c[0].token_ids for c in expect]
    assert set(rows[0]) >= {"prompt_token_ids", "token_ids", "text", "logprobs", "finish_reason"}


def _tp_worker(rank, world, path):
    m = megaevo.load(path)
    assert m.state.tp_size == 2
    greedy = m.generate(PROMPTS, SamplingParams(max_new_tokens=12, stop_token_ids=()))
    sampled = m.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.0, seed=3, n=2,
                                                 stop_token_ids=()))
    logits = m.forward(torch.tensor([PROMPTS[2]]))
    return {"greedy": [c[0].token_ids for c in greedy], "lp": [c[0].logprobs for c in greedy],
            "sampled": [[c.token_ids for c in cs] for cs in sampled], "logits": logits}


@pytest.mark.slow
def test_tp2_equals_tp1(hf_model, model):
    results = run_distributed(_tp_worker, 2, str(hf_model[0]))
    ref = model.generate(PROMPTS, SamplingParams(max_new_tokens=12, stop_token_ids=()))
    for r in results:
        assert r["greedy"] == [c[0].token_ids for c in ref]
        for lp, c in zip(r["lp"], ref):
            torch.testing.assert_close(torch.tensor(lp), torch.tensor(c[0].logprobs), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(r["logits"], model.forward(torch.tensor([PROMPTS[2]])), rtol=1e-4, atol=1e-4)
    assert results[0]["sampled"] == results[1]["sampled"]
