"""FillMaskPredictor against transformers' pipeline("fill-mask") on the same artifact."""

import random

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders

from microbert.errors import InputError
from microbert.predict import (
    FillMaskFormatter,
    FillMaskPredictor,
    GroupOutput,
    InputGroup,
    ModelOutput,
    PreparedInput,
    top_k,
)
from microbert.tokenizer import train_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "To be or not to [MASK], that is the question.",
    "The king is dead, long live the [MASK]!",
    "I [MASK] thee, good [MASK], of thy love.",
    "[MASK]",
    "Friends, Romans, countrymen, lend me your [MASK]; I come to bury Caesar, not to praise him.",
]


@pytest.fixture(scope="module")
def predictor(tiny_artifact):
    return FillMaskPredictor.from_pretrained(tiny_artifact)


@pytest.fixture(scope="module")
def pipe(tiny_artifact):
    return transformers.pipeline("fill-mask", model=str(tiny_artifact), device="cpu")


def _assert_same(ours, theirs):
    if theirs and isinstance(theirs[0], list):
        assert isinstance(ours[0], list) and len(ours) == len(theirs)
        for o, t in zip(ours, theirs, strict=True):
            _assert_same(o, t)
        return
    assert [c["token"] for c in ours] == [c["token"] for c in theirs]
    assert [c["token_str"] for c in ours] == [c["token_str"] for c in theirs]
    assert [c["sequence"] for c in ours] == [c["sequence"] for c in theirs]
    for o, t in zip(ours, theirs, strict=True):
        assert abs(o["score"] - t["score"]) < 1e-4


@pytest.mark.parametrize("text", TEXTS)
def test_matches_the_pipeline(predictor, pipe, text):
    _assert_same(predictor.predict(text)[0], pipe(text))


def test_top_k_and_targets_match_the_pipeline(predictor, pipe):
    text = TEXTS[0]
    _assert_same(predictor.predict(text, top_k=2)[0], pipe(text, top_k=2))
    _assert_same(predictor.predict(text, top_k=12)[0], pipe(text, top_k=12))
    targets = ["be", "king", "question"]
    _assert_same(predictor.predict(text, targets=targets)[0], pipe(text, targets=targets))
    _assert_same(
        predictor.predict(TEXTS[2], targets=targets, top_k=2)[0], pipe(TEXTS[2], targets=targets, top_k=2)
    )


def test_shapes(predictor):
    one, several = predictor.predict([TEXTS[0], TEXTS[2]])
    assert len(one) == 5 and set(one[0]) == {"score", "token", "token_str", "sequence"}
    assert [c["score"] for c in one] == sorted((c["score"] for c in one), reverse=True)
    assert len(several) == 2 and all(len(per_mask) == 5 for per_mask in several)


def test_padding_invariance(predictor):
    alone = [predictor.predict(t)[0] for t in TEXTS]
    together = predictor.predict(TEXTS, batch_size=64)
    pairs = predictor.predict(TEXTS, batch_size=2)
    for a, b, c in zip(alone, together, pairs, strict=True):
        _assert_same(b, a)
        _assert_same(c, a)


def test_bad_input(predictor):
    with pytest.raises(InputError, match="no \\[MASK\\]"):
        predictor.predict("nothing to predict here")
    with pytest.raises(InputError, match="empty"):
        predictor.predict("   ")
    with pytest.raises(InputError, match="at most 128"):
        predictor.predict("word " * 200 + "[MASK]")
    with pytest.raises(InputError, match="targets"):
        predictor.predict(TEXTS[0], targets=[""])
    with pytest.raises(InputError, match="top_k"):
        predictor.predict(TEXTS[0], top_k=0)


def test_one_batch_of_mixed_requests_equals_each_alone(predictor):
    """The service batches inputs of different requests: top_k, targets and masks differ within a pass."""
    targets = predictor.target_ids(["be", "king", "question"])
    requests = [
        predictor.encode([TEXTS[0]], top_k=3),
        predictor.encode([TEXTS[2]], top_k=7, target_ids=targets),
        predictor.encode([TEXTS[4], TEXTS[3]], top_k=1),
    ]
    alone = [predictor.format(list(zip(r, predictor.run(r), strict=True))) for r in requests]
    batch = [p for r in requests for p in r]
    together = predictor.format(list(zip(batch, predictor.run(batch), strict=True)))
    flat_alone = [result for results in alone for result in results]
    for a, b in zip(flat_alone, together, strict=True):
        _assert_same(b, a)
    assert len(together[1]) == 2 and len(together[1][0]) == 3  # two masks, top_k capped at 3 targets


def test_bucketed_rows_as_cuda_graphs_use_them_give_the_same_answers(tiny_artifact, predictor):
    """CUDA graphs pad rows and mask slots to powers of two; on a CPU the same shapes run eagerly."""
    padded = FillMaskPredictor.from_pretrained(tiny_artifact, bucket_rows=True)
    assert padded.bucket_rows and not predictor.bucket_rows
    texts = TEXTS[:3]  # 3 rows -> 4, 4 masks -> 4; lengths bucketed to multiples of 8
    for a, b in zip(padded.predict(texts), predictor.predict(texts), strict=True):
        _assert_same(a, b)


def test_a_lone_surrogate_is_an_input_error(predictor):
    with pytest.raises(InputError, match="not valid Unicode"):
        predictor.predict("The \ud800 [MASK].")


@pytest.mark.parametrize("kind", ["wordpiece", "wordlevel"])
def test_spliced_sequences_equal_decoding_each_candidate(tiny_tokenizer, sample_texts, kind):
    """The formatter builds each candidate's `sequence` from token pieces; it must equal `decode`
    of the input with the candidate in place ([PAD]s dropped), with and without special tokens."""
    if kind == "wordlevel":
        tiny_tokenizer = train_tokenizer(sample_texts[:500], vocab_size=300, kind="wordlevel")
    formatter = FillMaskFormatter(tiny_tokenizer, clean_up_tokenization_spaces=True)
    assert formatter.pieces is not None
    size = tiny_tokenizer.get_vocab_size()
    continuing = [i for i in range(size) if tiny_tokenizer.id_to_token(i).startswith("##")]
    punctuation = [tiny_tokenizer.token_to_id(t) for t in (".", ",", "'", "!", "?", "s", "t")]
    pool = (
        list(range(5))
        + continuing[:50]
        + [t for t in punctuation if t is not None]
        + list(range(5, min(size, 200)))
    )
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 12))]
        position = rng.randrange(len(ids))
        candidates = [rng.choice(pool) for _ in range(6)]
        for skip in (True, False):
            spliced = formatter.pieces.sequences(ids, position, candidates, skip)
            decoded = []
            for token in candidates:
                row = [*ids[:position], token, *ids[position + 1 :]]
                decoded.append(tiny_tokenizer.decode([t for t in row if t != 0], skip_special_tokens=skip))
            assert spliced == decoded, (ids, position, candidates, skip)


def test_a_pad_candidate_is_dropped_from_the_sequence_as_the_pipeline_does(predictor, pipe):
    """The pipeline drops every [PAD] from a candidate's sequence, the candidate included."""
    targets = ["[PAD]", "king"]
    _assert_same(predictor.predict(TEXTS[2], targets=targets)[0], pipe(TEXTS[2], targets=targets))


def test_a_decoder_that_is_not_piecewise_decodes_each_candidate(tiny_tokenizer):
    """Metaspace writes a token differently by what precedes it: no splicing, one decode per candidate."""
    tokenizer = Tokenizer.from_str(tiny_tokenizer.to_str())
    tokenizer.decoder = decoders.Metaspace()
    formatter = FillMaskFormatter(tokenizer, clean_up_tokenization_spaces=False)
    assert formatter.pieces is None
    ids = np.array([2, 40, 4, 41, 4, 3])
    candidates = np.array([[50, 51], [52, 0]])
    prepared = PreparedInput(ids=ids, mask_positions=np.array([2, 4]), top_k=2)
    (result,) = formatter.format([(prepared, ModelOutput(np.ones((2, 2), np.float32), candidates))])
    expected = [
        [tokenizer.decode([2, 40, 50, 41, 4, 3], skip_special_tokens=False),
         tokenizer.decode([2, 40, 51, 41, 4, 3], skip_special_tokens=False)],
        [tokenizer.decode([2, 40, 4, 41, 52, 3], skip_special_tokens=False),
         tokenizer.decode([2, 40, 4, 41, 3], skip_special_tokens=False)],
    ]  # fmt: skip
    assert [[c["sequence"] for c in per_mask] for per_mask in result] == expected


@pytest.mark.parametrize("rows", [2, 37, 300])
@pytest.mark.parametrize("k", [1, 5, 8])
def test_blockwise_top_k_equals_torch_topk(k, rows):
    """On a CPU the top-k of a wide row is taken among its best blocks: the same values and ids,
    the short last block (30,522 = 238 × 128 + 58) included."""
    torch.manual_seed(k)
    probs = (torch.randn(rows, 30522) * 3).softmax(dim=-1)
    probs[1, [30521, 30470, 5]] = torch.tensor([0.9, 0.8, 0.7])  # the best in the last, short block
    probs[-1] = -1.0  # a row of targets: everything else is -1, below any probability
    probs[-1, [17, 30000, 4242]] = torch.tensor([0.2, 0.5, 0.1])
    values, ids = top_k(probs, k)
    expected_values, expected_ids = probs.topk(k, dim=-1)
    assert torch.equal(values, expected_values)
    real = expected_values >= 0  # the -1 fillers tie, so their ids may differ
    assert torch.equal(ids[real], expected_ids[real])


def test_a_list_longer_than_a_sort_window_equals_each_alone(predictor):
    """`predict` tokenizes windows of a few batches and overlaps them with the model: same answers,
    in the texts' order."""
    texts = TEXTS * 3  # batch_size 1: windows of 4 texts, so four windows
    alone = [predictor.predict(t)[0] for t in texts]
    for a, b in zip(alone, predictor.predict(texts, batch_size=1), strict=True):
        _assert_same(b, a)


def test_an_error_in_a_later_window_names_its_index_and_text_checks_come_first(predictor):
    texts = [TEXTS[0]] * 6 + ["no mask here"]
    with pytest.raises(InputError, match="no \\[MASK\\]") as caught:
        predictor.predict(texts, batch_size=1)
    assert caught.value.index == 6
    # An empty text anywhere is reported before a missing mask in an earlier window, as before.
    with pytest.raises(InputError, match="empty") as caught:
        predictor.predict(["no mask here", *[TEXTS[0]] * 6, "  "], batch_size=1)
    assert caught.value.index == 7


def test_two_launches_in_flight_give_each_batch_its_own_results(predictor):
    """A launched batch's results are its own even when the next batch is launched before they are
    collected (a CUDA graph replays into the same output buffers)."""
    first, second = predictor.encode(TEXTS[:2]), predictor.encode(TEXTS[2:4])
    expected = predictor.run(first), predictor.run(second)
    pending = predictor.launch(first), predictor.launch(second)
    for want, got in zip(expected, map(predictor.collect, pending), strict=True):
        for w, g in zip(want, got, strict=True):
            assert np.array_equal(w.token_ids, g.token_ids) and np.allclose(w.scores, g.scores)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_with_cuda_graphs_launches_in_flight_keep_their_results(tiny_artifact):
    gpu = FillMaskPredictor.from_pretrained(tiny_artifact, device="cuda")
    # The same rows, lengths and masks in another order: one graph, replayed into the same buffers.
    first, second = gpu.encode(TEXTS[:2]), gpu.encode([TEXTS[1], TEXTS[0]])
    expected = gpu.run(first), gpu.run(second)
    assert gpu._graphs is not None and len(gpu._graphs.graphs) == 1
    pending = gpu.launch(first), gpu.launch(second)
    for want, got in zip(expected, map(gpu.collect, pending), strict=True):
        for w, g in zip(want, got, strict=True):
            assert np.array_equal(w.token_ids, g.token_ids) and np.allclose(w.scores, g.scores)


@pytest.mark.parametrize("kind", ["wordpiece", "wordlevel"])
def test_the_clean_up_scan_of_shared_text_and_edges_equals_cleaning_each_sequence(
    tiny_tokenizer, sample_texts, kind
):
    """`sequences(..., clean_up=True)` scans the text around the mask once and each candidate's piece
    with its edges: it must equal `clean_up_tokenization` of every spliced sequence."""
    from microbert.predict import clean_up_tokenization

    if kind == "wordlevel":  # no decoder: tokens joined by spaces, so " ." and " 's" appear often
        tiny_tokenizer = train_tokenizer(sample_texts[:500], vocab_size=300, kind="wordlevel")
    formatter = FillMaskFormatter(tiny_tokenizer, clean_up_tokenization_spaces=True)
    vocab = tiny_tokenizer.get_vocab()
    marks = [vocab[t] for t in (".", ",", "'", "!", "?", "s", "t", "n", "m", "ve", "re", "##s") if t in vocab]
    pool = list(range(5)) + marks * 4 + list(range(5, min(tiny_tokenizer.get_vocab_size(), 120)))
    rng = random.Random(1)
    cleaned = 0
    for _ in range(600):
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 10))]
        position = rng.randrange(len(ids))
        candidates = [rng.choice(pool) for _ in range(5)]
        for skip in (True, False):
            plain = formatter.pieces.sequences(ids, position, candidates, skip)
            expected = [clean_up_tokenization(text) for text in plain]
            assert formatter.pieces.sequences(ids, position, candidates, skip, True) == expected
            cleaned += expected != plain
    assert cleaned > 50  # the clean-up did change many of them: the test sees both paths


def test_a_large_request_is_encoded_as_each_text_alone(predictor):
    """From 32 texts on, the encoder finds every mask of the request in one pass over one array."""
    texts = [TEXTS[i % len(TEXTS)] for i in range(40)]
    together = predictor.encode(texts, top_k=3)
    for text, p in zip(texts, together, strict=True):
        (alone,) = predictor.encode([text], top_k=3)
        assert np.array_equal(p.ids, alone.ids) and np.array_equal(p.mask_positions, alone.mask_positions)
        assert (p.top_k, p.target_ids) == (alone.top_k, alone.target_ids)
    for bad, match in (("no mask here", "no \\[MASK\\]"), ("word " * 200 + "[MASK]", "at most 128")):
        with pytest.raises(InputError, match=match) as caught:
            predictor.encode([*texts[:35], bad, *texts[35:]])
        assert caught.value.index == 35


def test_an_input_group_is_its_inputs_and_takes_and_splits_without_mixing_them(predictor):
    """`InputGroup` holds a request's inputs as four flat arrays; its views, gathers and parts must
    be exactly the inputs one by one, in the order asked for."""
    texts = TEXTS * 9  # 45 texts: the batch path of the encoder
    group = predictor.encoder.encode_group(texts, top_k=3)
    alone = [predictor.encode([t], top_k=3)[0] for t in texts]
    one_by_one = group.inputs()
    assert len(group) == len(texts) == len(one_by_one)
    for got, want in zip(one_by_one, alone, strict=True):
        assert np.array_equal(got.ids, want.ids) and np.array_equal(got.mask_positions, want.mask_positions)
    order = [7, 3, 44, 0, 3]
    for got, i in zip(group.take(order).inputs(), order, strict=True):
        assert np.array_equal(got.ids, alone[i].ids)
        assert np.array_equal(got.mask_positions, alone[i].mask_positions)
    parts = group.split(16)
    assert [len(p) for p in parts] == [16, 16, 13] and group.split(45) == [group]
    regrouped = InputGroup.of([p for part in parts for p in part.inputs()])
    for name in ("ids", "lengths", "mask_positions", "mask_counts"):
        assert np.array_equal(getattr(regrouped, name), getattr(group, name))
    # The parts' outputs joined are the whole group's, input by input.
    whole = predictor.collect_groups(predictor.launch_groups([group]))[0].outputs()
    joined = GroupOutput.joined(predictor.collect_groups(predictor.launch_groups(parts))).outputs()
    for a, b in zip(whole, joined, strict=True):
        assert np.array_equal(a.token_ids, b.token_ids) and np.allclose(a.scores, b.scores, atol=1e-6)
    assert predictor.encode([]) == [] and GroupOutput.joined([]).outputs() == []
    with pytest.raises(ValueError, match="share top_k"):
        InputGroup.of([alone[0], predictor.encode([texts[1]], top_k=2)[0]])


def test_groups_with_their_own_top_k_and_targets_share_a_pass(predictor):
    """A pass holds several requests' groups, each with its top_k and targets: each gets what it
    would alone."""
    first = predictor.encoder.encode_group(TEXTS[:3], top_k=4)
    second = predictor.encoder.encode_group(TEXTS[2:], top_k=2, target_ids=predictor.target_ids(["the", "a"]))
    together = predictor.collect_groups(predictor.launch_groups([first, second]))
    for group, output in zip((first, second), together, strict=True):
        (alone,) = predictor.collect_groups(predictor.launch_groups([group]))
        assert output.scores.shape == alone.scores.shape == (group.num_masks, group.top_k)
        assert np.array_equal(output.token_ids, alone.token_ids)
        assert np.allclose(output.scores, alone.scores, atol=1e-6)
