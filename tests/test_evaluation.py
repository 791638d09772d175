"""Metric functions on hand-made cases with known answers: a bigram 'model' whose next-token distribution is a
fixed table, and a word-level tokenizer that adds BOS, so every figure can be worked out by hand; the optimised
scoring and generation paths against plain forwards and ``generate`` on tiny random Llama and Gemma-3 models."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from hf_encore.evaluation import (
    TASKS,
    counterfact_scores,
    generation_entropy,
    known_facts,
    ngram_entropy,
    parse_answer,
    perplexity,
    retained_knowledge,
    score_continuations,
    weighted_f1,
    zsre_scores,
)
from hf_encore.evaluation.downstream import few_shot_prompts, load_task

from tiny_models import TINY_CORPUS, TINY_LAYERS, tiny_llama

WORDS = ["<bos>", "<pad>", "the", "capital", "of", "france", "is", "paris", "rome", "new", "york", "city", "a", "b"]
ID = {w: i for i, w in enumerate(WORDS)}


@pytest.fixture(scope="module")
def bos_tokenizer():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", ID["<bos>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>")
    assert fast("the capital")["input_ids"] == [ID["<bos>"], ID["the"], ID["capital"]]  # BOS is added
    return fast


class Bigram(torch.nn.Module):
    """logits[t] = table[token t]: the next-token distribution depends on the current token only. Seen as a causal
    LM's decoder and unembedding: the final hidden state is the one-hot current token and the unembedding tableᵀ."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)
        self.config = SimpleNamespace()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.table[input_ids])

    @property
    def base_model(self):
        def decoder(input_ids, **kwargs):
            return SimpleNamespace(last_hidden_state=torch.nn.functional.one_hot(input_ids, len(self.table)).float())
        return decoder

    def get_output_embeddings(self):
        return SimpleNamespace(weight=self.table.T, bias=None)


def bigram(transitions: dict[str, dict[str, float]]) -> Bigram:
    """Probabilities from each word (the rest of the mass spread evenly) as a logit table."""
    table = torch.full((len(WORDS), len(WORDS)), 1e-3)
    for src, dist in transitions.items():
        for dst, p in dist.items():
            table[ID[src], ID[dst]] = p
    table = table / table.sum(1, keepdim=True)
    return Bigram(table.log())


MODEL = {"of": {"france": 0.9}, "is": {"paris": 0.6, "rome": 0.3}, "new": {"york": 0.8}, "york": {"city": 0.7},
         "capital": {"of": 0.9}, "<bos>": {"the": 0.5}, "the": {"capital": 0.5, "new": 0.4}, "a": {"b": 0.9},
         "b": {"a": 0.9}}


def p(src, dst):
    return float(bigram(MODEL).table[ID[src]].softmax(-1)[ID[dst]])


def test_multi_token_continuation_is_scored_token_by_token(bos_tokenizer):
    model = bigram(MODEL)
    scores = score_continuations(model, bos_tokenizer, ["the capital of france is", "the"], ["paris", "new york city"])
    assert scores.token_logprobs[0].tolist() == pytest.approx([math.log(p("is", "paris"))], rel=1e-5)
    expected = [math.log(p("the", "new")), math.log(p("new", "york")), math.log(p("york", "city"))]
    assert scores.token_logprobs[1].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)  # float32 near 0
    assert scores.mean_nll[1].item() == pytest.approx(-sum(expected) / 3, rel=1e-5)
    # After "the", "capital" (0.5) beats "new" (0.4): the first of the three tokens is not the argmax.
    assert scores.token_correct[1].tolist() == [False, True, True]
    assert scores.token_accuracy[1].item() == pytest.approx(2 / 3)


def test_continuation_scores_unembed_only_the_positions_they_read(tiny_tok, monkeypatch):
    """Only the positions that predict continuation tokens go through the unembedding (a few rows at a time), in
    several decoder passes, and the scores are those of full-logit passes of each sequence alone."""
    from hf_encore.editing import tracing
    from hf_encore.editing.prompt_format import PLAIN

    model, tokenizer = tiny_llama(0), tiny_tok
    prompts = ["The Eiffel Tower is located in the city of", "Paris is", "LeBron James plays the sport of",
               "The capital of Japan is the city of", "Water boils at"]
    continuations = ["Paris", "the capital of France", "basketball", "Tokyo", "100 degrees Celsius"]
    passes, unembedded = [], []
    handle = model.get_input_embeddings().register_forward_pre_hook(lambda module, args: passes.append(1))
    unembed = tracing.unembed
    monkeypatch.setattr(tracing, "unembed", lambda h, *a: (unembedded.append(h.shape[0]), unembed(h, *a))[1])
    vocab = model.get_output_embeddings().weight.shape[0]
    try:  # several decoder passes; at most 2 rows of logits at a time
        scores = score_continuations(model, tokenizer, prompts, continuations, max_tokens=12,
                                     max_logits=2 * vocab + 1)
    finally:
        handle.remove()
    assert len(passes) > 2 and max(unembedded) == 2
    assert sum(unembedded) == sum(len(PLAIN.target_ids(tokenizer, c)) for c in continuations)
    for i, (prompt, continuation) in enumerate(zip(prompts, continuations)):
        p_ids, t_ids = tokenizer(prompt)["input_ids"], PLAIN.target_ids(tokenizer, continuation)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p_ids + t_ids[:-1]])).logits[0, len(p_ids) - 1:].float()
        t = torch.tensor(t_ids)
        expected = logits.log_softmax(-1).gather(1, t.unsqueeze(1)).squeeze(1)
        assert scores.token_logprobs[i].tolist() == pytest.approx(expected.tolist(), abs=1e-4)
        assert scores.token_correct[i].tolist() == (logits.argmax(-1) == t).tolist()


def test_counterfact_scores_and_magnitudes(bos_tokenizer):
    model = bigram(MODEL)
    cases = [{"prompt": "the capital of {} is", "subject": "france", "target_new": "rome", "target_true": "paris",
              "rephrase_prompt": "of france is", "locality_prompt": "the capital of france is",
              "locality_ground_truth": "paris"}]
    scores = counterfact_scores(model, bos_tokenizer, cases)
    assert (scores["ES"], scores["PS"], scores["NS"]) == (0.0, 0.0, 1.0)  # the model still says paris
    assert scores["EM"] == pytest.approx(p("is", "rome") - p("is", "paris"), rel=1e-5)
    assert scores["NM"] == pytest.approx(p("is", "paris") - p("is", "rome"), rel=1e-5)
    assert scores["S"] == 0.0  # harmonic mean with a zero


def test_zsre_token_accuracy_on_a_multi_token_answer(bos_tokenizer):
    model = bigram(MODEL)
    records = [{"prompt": "the {} is", "subject": "capital", "target_new": "new york", "rephrase_prompt": "the",
                "locality_prompt": "a", "locality_ground_truth": "b a b"}]
    scores = zsre_scores(model, bos_tokenizer, records)
    assert scores["ES"] == 0.5  # after "is" the argmax is paris, not new; after "new" it is york
    assert scores["PS"] == 0.5  # after "the" the argmax is capital; then york
    assert scores["NS"] == 1.0


def test_known_facts_and_retention(bos_tokenizer):
    cases = [{"prompt": "the capital of {} is", "subject": "france", "target_true": "paris"},
             {"prompt": "the capital of {} is", "subject": "france", "target_true": "rome"},
             {"prompt": "{}", "subject": "new", "target_true": "york city"}]
    facts = known_facts(bigram(MODEL), bos_tokenizer, cases, limit=10)
    assert [f["target_true"] for f in facts] == ["paris", "york city"]
    assert retained_knowledge(bigram(MODEL), bos_tokenizer, facts) == 1.0
    forgetful = bigram({**MODEL, "is": {"rome": 0.9}})
    assert retained_knowledge(forgetful, bos_tokenizer, facts) == 0.5


def test_perplexity_matches_the_bigram_table(bos_tokenizer):
    model = bigram(MODEL)
    ppl = perplexity(model, bos_tokenizer, ["a b a b"], n_tokens=100, seq_len=16)
    nll = -(math.log(p("<bos>", "a")) + 2 * math.log(p("a", "b")) + math.log(p("b", "a"))) / 4
    assert ppl == pytest.approx(math.exp(nll), rel=1e-5)


def test_perplexity_bounds_tokens_per_pass_and_logits_held(bos_tokenizer, monkeypatch):
    """Fewer tokens per decoder pass, and the unembedding in chunks of a few rows: the same perplexity, and no chunk
    holds more logits than allowed (on Gemma-3's 262k vocabulary a pass's full logits would take GiBs)."""
    from hf_encore.editing import tracing

    model = bigram(MODEL)
    texts = ["a b a b " * 20]
    expected = perplexity(model, bos_tokenizer, texts, n_tokens=200, seq_len=8)
    logits_held = []
    unembed = tracing.unembed
    monkeypatch.setattr(tracing, "unembed", lambda h, *a: (logits_held.append(h.shape[0] * len(WORDS)),
                                                           unembed(h, *a))[1])
    ppl = perplexity(model, bos_tokenizer, texts, n_tokens=200, seq_len=8, max_tokens=16, max_logits=3 * len(WORDS))
    assert ppl == pytest.approx(expected, rel=1e-6)
    assert len(logits_held) > 20 and max(logits_held) == 3 * len(WORDS)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_perplexity_equals_the_full_logits_cross_entropy_of_a_real_decoder(bos_tokenizer, softcap):
    """On a (tiny, random) Gemma-3 — final norm, logit softcap — the NLL from final hidden states through the
    chunked unembedding is the cross-entropy of the model's own logits."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, initializer_range=0.5,
                              final_logit_softcapping=softcap, pad_token_id=ID["<pad>"])
    model = Gemma3ForCausalLM(config).eval()
    texts = ["the capital of france is paris a b", "new york city is a b a"]
    ppl = perplexity(model, bos_tokenizer, texts, n_tokens=200, seq_len=6, max_logits=2 * len(WORDS))
    nll, count = 0.0, 0
    for text in texts:  # each 6-token piece of each text alone, unpadded, through the model's own logits
        ids = bos_tokenizer(text)["input_ids"]
        for piece in (torch.tensor([ids[s: s + 6]]) for s in range(0, len(ids), 6) if len(ids[s: s + 6]) > 1):
            with torch.no_grad():
                logits = model(input_ids=piece).logits[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, piece[0, 1:], reduction="sum").item()
            count += piece.shape[1] - 1
    assert ppl == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert ppl > 1.5  # a random model: far from certain, so a wrong position or label would show


def test_ngram_entropy_and_fluency():
    expected = -(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3)  # bigrams (a b) ×2, (b a) ×1
    assert ngram_entropy("a b a b".split(), 2) == pytest.approx(expected)
    assert ngram_entropy("a a a a".split(), 3) == 0.0
    text = "x y z w"
    assert generation_entropy([text]) == pytest.approx((math.log2(3) + 2 * math.log2(2)) / 3)
    assert generation_entropy(["a a a a a"]) == 0.0  # a degenerate, repetitive generation


def test_weighted_f1_and_answer_parsing():
    assert weighted_f1([0, 0, 1, 1], [0, 0, 1, 1]) == 1.0
    # class 0: tp 1, fp 0, fn 1 → 2/3; class 1: tp 2, fp 1, fn 0 → 4/5; supports 2 and 2.
    assert weighted_f1([0, 0, 1, 1], [0, 1, 1, 1]) == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert weighted_f1([0, 1], [-1, -1]) == 0.0  # unparseable answers are wrong
    assert parse_answer(" Positive.", ("negative", "positive")) == 1
    assert parse_answer(" B) because", ("A", "B", "C", "D")) == 1
    assert parse_answer(" maybe", ("No", "Yes")) == -1


def test_few_shot_prompts_use_the_pool_and_test_after_it():
    items = [{"sentence": f"s{i}", "label": i % 2} for i in range(30)]
    prompts, gold = few_shot_prompts(TASKS["sst2"], items, n_shots=2, n_test=5)
    assert len(prompts) == 5 and gold == [0, 1, 0, 1, 0]
    assert prompts[0] == "Review: s0\nSentiment: negative\n\nReview: s1\nSentiment: positive\n\nReview: s10\nSentiment:"
    mmlu = [{"question": f"q{i}", "choices": ["w", "x", "y", "z"], "answer": i % 4} for i in range(12)]
    prompts, gold = few_shot_prompts(TASKS["mmlu"], mmlu, n_shots=1, n_test=5)
    assert gold == [2, 3] and prompts[0].startswith("Question: q0\nA. w\nB. x\nC. y\nD. z\nAnswer: A\n\n")


def test_greedy_answers_with_a_shared_prefix_match_generate(tiny_tok, shared_data):
    """The shared-prefix cache and the padding between prefix and item change nothing: same answers and first-step
    logits as transformers' own generate on each whole prompt."""
    from hf_encore.editing.tracing import common_prefix_length
    from hf_encore.evaluation.downstream import greedy_answers

    assert common_prefix_length([[1, 2, 3], [1, 2, 4, 5], [1, 2]]) == 2
    model, tokenizer = tiny_llama(0), tiny_tok
    task = TASKS["mmlu"]
    prompts, _ = few_shot_prompts(task, load_task("mmlu", shared_data / "downstream"), n_shots=2, n_test=5)
    candidates = [tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in task.label_words]
    texts, logits = greedy_answers(model, tokenizer, prompts, candidates, max_new_tokens=4, batch_size=3)
    assert logits.shape == (5, 4)
    for i, prompt in enumerate(prompts):
        batch = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**batch, do_sample=False, max_new_tokens=4, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=tokenizer.eos_token_id)
        expected = tokenizer.decode(out.sequences[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        assert texts[i] == expected
        torch.testing.assert_close(logits[i], out.logits[0][0, candidates].float(), rtol=1e-4, atol=1e-3)


def assert_greedy_answers_match_generate(model, tokenizer, prompts, batch_size):
    """greedy_answers (3 tokens, first-step logits of tokens 5 and 6) equals generate on each prompt alone."""
    from hf_encore.evaluation.downstream import greedy_answers

    texts, logits = greedy_answers(model, tokenizer, prompts, [5, 6], max_new_tokens=3, batch_size=batch_size)
    for i, prompt in enumerate(prompts):
        batch = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**batch, do_sample=False, max_new_tokens=3, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=tokenizer.eos_token_id)
        assert texts[i] == tokenizer.decode(out.sequences[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        torch.testing.assert_close(logits[i], out.logits[0][0, [5, 6]].float(), rtol=1e-4, atol=1e-4)


def test_greedy_answers_past_a_sliding_window_match_generate(tiny_tok, shared_data):
    """Gemma-3's sliding-window layers keep only the last window of the prefix cache: still the same answers."""
    from test_post_norm import tiny_gemma3

    tokenizer = tiny_tok
    model = tiny_gemma3(len(tokenizer))
    model.config.sliding_window = 16
    prompts, _ = few_shot_prompts(TASKS["sst2"], load_task("sst2", shared_data / "downstream"), n_shots=1, n_test=3)
    assert all(len(tokenizer(p)["input_ids"]) > 40 for p in prompts)
    assert_greedy_answers_match_generate(model, tokenizer, prompts, batch_size=2)


def test_greedy_answers_batch_items_that_fit_in_a_sliding_window(tiny_tok, shared_data):
    """Items whose tokens and answer fit in the window share batches whatever their lengths; longer ones still
    match generate."""
    from test_post_norm import tiny_gemma3

    tokenizer = tiny_tok
    model = tiny_gemma3(len(tokenizer))
    prompts, _ = few_shot_prompts(TASKS["sst2"], load_task("sst2", shared_data / "downstream"), n_shots=1, n_test=8)
    lengths = sorted(len(tokenizer(p)["input_ids"]) for p in prompts)
    model.config.sliding_window = lengths[len(lengths) // 2] + 3
    fitting = {n for n in lengths if n + 3 < model.config.sliding_window}
    assert len(fitting) > 1 and max(lengths) + 3 > model.config.sliding_window + 2  # both kinds, padding between
    assert_greedy_answers_match_generate(model, tokenizer, prompts, batch_size=8)


def test_downstream_and_norms_of_an_edited_model(tiny_tok, shared_data, tmp_path, monkeypatch):
    from hf_encore import EncoreConfig, get_encore_model
    from hf_encore.evaluation import downstream_scores, evaluate_task, weight_norms

    base, tokenizer = tiny_llama(0), tiny_tok
    scores = downstream_scores(base, tokenizer, shared_data / "downstream", tasks=("sst2", "mmlu"), n_shots=2,
                               n_test=6, progress=False)
    for name in ("sst2", "mmlu"):
        task = scores["tasks"][name]
        # Each task's figures are those of evaluate_task with the same shots and items.
        assert task["n"] == 6 and task == evaluate_task(base, tokenizer, TASKS[name], load_task(
            name, shared_data / "downstream"), n_shots=2, n_test=6)
    assert scores["mean_f1"] == pytest.approx((scores["tasks"]["sst2"]["f1"] + scores["tasks"]["mmlu"]["f1"]) / 2)

    monkeypatch.setenv("HF_ENCORE_CACHE", str(tmp_path))
    model = get_encore_model(base, EncoreConfig(layers=list(TINY_LAYERS), stats_n_tokens=2048, v_num_grad_steps=3,
                                                n_context_templates=2), tokenizer=tokenizer, corpus=TINY_CORPUS)
    assert all(v == {"norm_ratio": 1.0, "delta_norm": 0.0} for v in weight_norms(model).values())
    report = model.edit([{"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "football"}],
                        progress=False)
    norms = weight_norms(model)
    for layer_report in report.layers:
        assert norms[layer_report.layer]["delta_norm"] == pytest.approx(layer_report.delta_norm, rel=1e-5)
        assert norms[layer_report.layer]["norm_ratio"] == pytest.approx(layer_report.weight_norm_ratio, rel=1e-9)
