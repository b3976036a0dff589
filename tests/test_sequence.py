"""The pruned-sequence state on its own: pure tensors, no model."""

import pytest
import torch

from transprune import masks, positions, sequence
from transprune import prompt as prompts
from transprune.masks import DenseMask, LayerMask, PaddingMask, SlidingWindowMask
from transprune.sequence import PrunedSequence

IMAGE, VIDEO, PAD = 7, 8, 0


def _batch():
    """Two left-padded prompts: [pad, t, I, I, I, I, q, q] and [t, t, I, I, V, V, t, q]."""
    input_ids = torch.tensor([[PAD, 1, IMAGE, IMAGE, IMAGE, IMAGE, 2, 3],
                              [1, 1, IMAGE, IMAGE, VIDEO, VIDEO, 2, 3]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1], [1] * 8])
    is_visual = (input_ids == IMAGE) | (input_ids == VIDEO)
    return input_ids, is_visual, mask


def _sequence():
    return PrunedSequence.start(prompts.read_prompt(*_batch()))


def test_read_prompt_finds_spans_instruction_and_last_token():
    prompt = prompts.read_prompt(*_batch())
    assert prompt.visual_positions[0].tolist() == [2, 3, 4, 5]
    assert prompt.visual_spans[0].tolist() == [0, 0, 0, 0]
    assert prompt.visual_spans[1].tolist() == [0, 0, 1, 1]          # image then video: two budgets
    assert prompt.instruction_positions[0].tolist() == [6, 7]
    assert prompt.last_position == [7, 7]
    assert not prompt.token_valid[0, 0] and prompt.length == 8


def test_span_starts_after_a_gap():
    positions = torch.tensor([2, 3, 6, 7])
    assert prompts.visual_spans(positions, torch.full((4,), IMAGE)).tolist() == [0, 0, 1, 1]


def test_a_prompt_ending_with_its_image_uses_the_last_token_as_instruction():
    ids = torch.tensor([[1, IMAGE, IMAGE]])
    prompt = prompts.read_prompt(ids, ids == IMAGE, None)
    assert prompt.instruction_positions[0].tolist() == [2]


def test_pruning_left_fills_shorter_rows_with_dummies():
    seq = _sequence()
    hidden = torch.arange(2 * 8, dtype=torch.float32).view(2, 8, 1)
    gather = seq.prune(3, [torch.tensor([1]), torch.tensor([0, 1, 3])])
    view = seq.view
    # Row 0 keeps pad, t, I3, q, q (5); row 1 keeps t, t, I2, I3, V5, t, q (7): two dummies in row 0.
    assert view.width == 7
    assert view.dummy[0].tolist() == [True, True, False, False, False, False, False]
    assert view.seq_index[0, 2:].tolist() == [0, 1, 3, 6, 7]
    assert view.seq_index[1].tolist() == [0, 1, 2, 3, 5, 6, 7]
    assert view.token_valid[0].tolist() == [False, False, False, True, True, True, True]
    assert view.removed.tolist() == [3, 1]
    assert view.slot_of_pos[0].tolist() == [2, 3, -1, 4, -1, -1, 5, 6]
    assert sequence.gather_slots(hidden, gather)[1, :, 0].tolist() == [8, 9, 10, 11, 13, 14, 15]
    # A second stage gathers from the first stage's slots.
    gather = seq.prune(5, [torch.tensor([1]), torch.tensor([0, 3])])
    assert gather[1].tolist() == [0, 1, 2, 4, 5, 6]
    assert seq.view_for_layer(3) is None and seq.view_for_layer(4) is seq.stages[0][1]
    assert seq.view_for_layer(6) is seq.view
    assert seq.cache_lengths(6) == [8, 8, 8, 7, 7, 6]


def test_positions_original_and_compact():
    seq = _sequence()
    seq.prune(1, [torch.tensor([1]), torch.tensor([0, 1, 3])])
    ids = torch.arange(8)[None]
    assert positions.prefill_positions(seq.view, ids, "original")[1].tolist() == [0, 1, 2, 3, 5, 6, 7]
    compact = positions.prefill_positions(seq.view, ids, "compact")
    assert compact[1].tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert compact[0, 2:].tolist() == [0, 1, 2, 3, 4]        # renumbered after the dummies
    mrope = torch.stack([ids, ids * 10, ids * 100])           # (3, 1, L)
    assert positions.prefill_positions(seq.view, mrope, "original")[2, 1].tolist() == [0, 100, 200, 300, 500, 600, 700]
    assert positions.decode_positions(seq.view, torch.tensor([[8], [8]])).tolist() == [[5], [7]]


def test_rotary_rows_follow_the_slots():
    seq = _sequence()
    seq.prune(1, [torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2])])
    cos = torch.arange(8, dtype=torch.float32)[None, :, None].expand(1, 8, 4)
    gathered, = positions.gather_rotary(seq.view, (cos,))
    assert gathered[1, :, 0].tolist() == seq.view.seq_index[1].float().tolist()


def test_dense_mask_is_causal_and_dummies_attend_only_to_themselves():
    seq = _sequence()
    seq.prune(1, [torch.tensor([1]), torch.tensor([0, 1, 3])])
    mask = DenseMask.prefill(seq.view, None)
    assert mask.shape == (2, 1, 7, 7) and mask.dtype == torch.bool
    assert torch.equal(mask[1, 0], torch.ones(7, 7, dtype=torch.bool).tril())
    assert mask[0, 0, 0].tolist() == [True] + [False] * 6
    assert mask[0, 0, 1].tolist() == [False, True] + [False] * 5
    assert mask[0, 0, 6].tolist() == [False, False] + [True] * 5


def test_dense_mask_gathers_rows_and_columns_of_the_full_mask():
    seq = _sequence()
    seq.prune(1, [torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2])])
    full = torch.randn(2, 1, 8, 8)
    mask = DenseMask.prefill(seq.view, full)
    index = seq.view.seq_index
    assert torch.equal(mask[0, 0], full[0, 0])                          # row 0 kept everything
    assert torch.equal(mask[1, 0, 2:, 2:], full[1, 0][index[1, 2:]][:, index[1, 2:]])
    blocked = torch.finfo(full.dtype).min
    assert mask[1, 0, 2, 0] == blocked and mask[1, 0, 0, 0] == 0.0     # dummy column blocked, dummy row self


def test_unpadded_unpruned_batches_keep_no_mask():
    seq = PrunedSequence.start(prompts.read_prompt(torch.tensor([[1, IMAGE, IMAGE, 2]]),
                                                    torch.tensor([[False, True, True, False]]), None))
    seq.prune(1, [torch.tensor([1])])
    assert DenseMask.prefill(seq.view, None) is None
    assert PaddingMask.prefill(seq.view, None) is None
    assert DenseMask.decode(seq.view, None, 2, 1) is None


def test_padding_mask_is_the_valid_tokens():
    seq = _sequence()
    seq.prune(1, [torch.tensor([1]), torch.tensor([0, 1, 3])])
    assert torch.equal(PaddingMask.prefill(seq.view, torch.ones(2, 8)), seq.view.token_valid.long())
    assert PaddingMask.gap_free_position_ids and not DenseMask.gap_free_position_ids


def test_decode_masks_cover_the_cached_slots_and_the_decoded_tokens():
    seq = _sequence()
    seq.prune(1, [torch.tensor([1]), torch.tensor([0, 1, 3])])
    # Two tokens decoded before this step, one new: 8 + 3 columns unpruned.
    padding = torch.ones(2, 11, dtype=torch.long)
    padding[0, 0] = 0
    decoded = PaddingMask.decode(seq.view, padding, 2, 1)
    assert decoded.shape == (2, 7 + 3)
    assert decoded[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1, 1]
    dense = DenseMask.decode(seq.view, None, 2, 1)
    assert dense.shape == (2, 1, 1, 10)
    assert dense[0, 0, 0].tolist() == [False, False] + [True] * 8
    full = torch.zeros(2, 1, 1, 11)
    gathered = DenseMask.decode(seq.view, full, 2, 1)
    assert gathered.shape == (2, 1, 1, 10) and gathered[0, 0, 0, 0] == torch.finfo(full.dtype).min
    assert PaddingMask.decode(seq.view, None, 2, 1)[0].tolist() == [0, 0] + [1] * 8


@pytest.mark.parametrize("name, builder", [("eager", DenseMask), ("sdpa", DenseMask), (None, DenseMask),
                                           ("flash_attention_2", PaddingMask),
                                           ("kernels-community/flash-attn", PaddingMask)])
def test_mask_builder_is_chosen_from_the_table(name, builder):
    assert masks.mask_builder(name) is builder


@pytest.mark.parametrize("name, layer_type, expected", [
    ("sdpa", "full_attention", DenseMask), ("eager", "sliding_attention", SlidingWindowMask),
    ("flash_attention_2", "full_attention", PaddingMask), ("flash_attention_2", "sliding_attention", PaddingMask)])
def test_each_backend_and_layer_type_has_a_builder(name, layer_type, expected):
    builder = masks.layer_builder(name, LayerMask(layer_type, 3 if layer_type == "sliding_attention" else None))
    assert builder is expected or isinstance(builder, expected)
    assert masks.layer_builder(name, LayerMask("sliding_attention", 3)) is masks.layer_builder(
        name, LayerMask("sliding_attention", 3))     # one builder per kind of layer: layers alike share masks
    with pytest.raises(ValueError, match="chunked_attention"):
        masks.layer_builder(name, LayerMask("chunked_attention"))


def _image_block_mask(length: int, block: range) -> torch.Tensor:
    """(1, 1, L, L) bool: causal, and the positions of `block` see each other both ways (Gemma 3)."""
    query, key = torch.arange(length)[:, None], torch.arange(length)[None, :]
    inside = torch.tensor([i in block for i in range(length)])
    return ((key <= query) | (inside[:, None] & inside[None, :]))[None, None]


def test_sliding_window_counts_slots_and_keeps_image_blocks():
    """Prompt [t, t, I, I, I, I, t, t]; the image sees itself both ways; keep I2 and I5 (positions 3, 5)."""
    ids = torch.tensor([[1, 1, IMAGE, IMAGE, IMAGE, IMAGE, 2, 3]])
    seq = PrunedSequence.start(prompts.read_prompt(ids, ids == IMAGE, None))
    seq.prune(1, [torch.tensor([1, 3])])                      # slots: t0 t1 I3 I5 t6 t7
    mask = SlidingWindowMask(3).prefill(seq.view, _image_block_mask(8, range(2, 6)))
    # A query sees keys fewer than 3 slots back (t6 sees I3: 4 positions back, 2 slots back), and
    # the kept image tokens see each other both ways.
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [1, 1, 1, 1, 0, 0],
                             [0, 1, 1, 1, 0, 0],
                             [0, 0, 1, 1, 1, 0],
                             [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected)
    additive = SlidingWindowMask(3).prefill(seq.view, _image_block_mask(8, range(2, 6)).float().log())
    assert torch.equal(additive[0, 0] == 0, expected)


def test_sliding_decode_masks_cover_only_the_layers_window():
    """Padded row 0 keeps 5 real slots of 7 (2 dummies): a window of 4 caches its last 3 entries."""
    seq = _sequence()
    seq.prune(1, [torch.tensor([1]), torch.tensor([0, 1, 3])])
    like = torch.ones(2, 1, 1, 4, dtype=torch.bool)           # whatever width the model sized it to
    decoded = SlidingWindowMask(4).decode(seq.view, like, 0, 1)
    assert decoded.shape == (2, 1, 1, 4) and bool(decoded.all())   # the last 3 slots are real tokens
    early = SlidingWindowMask(20).decode(seq.view, like, 2, 1)    # window not full: every slot, then 3 decoded
    assert early[0, 0, 0].tolist() == seq.view.token_valid[0].tolist() + [True] * 3
    # A full-attention mask the model sized against a pruned layer's cache: the layer's own columns.
    own = DenseMask.decode(seq.view, torch.ones(2, 1, 1, 10, dtype=torch.bool), 2, 1)
    assert own[0, 0, 0].tolist() == seq.view.token_valid[0].tolist() + [True] * 3


def test_select_keeps_each_spans_budget_in_order():
    seq = _sequence()
    score = torch.tensor([0.1, 0.9, 0.8, 0.2])                # sample 1: image 0,1 then video 2,3
    assert seq.select(1, score, 0.5).tolist() == [1, 2]       # one per span
    assert seq.select(0, torch.tensor([0.4, 0.3, 0.2, 0.1]), 0.5).tolist() == [0, 1]


def test_ttv_accumulates_onto_the_alive_tokens():
    seq = _sequence()
    values = torch.arange(16, dtype=torch.float32).view(2, 8)
    seq.add_ttv(values)
    seq.prune(1, [torch.tensor([1, 3]), torch.tensor([0, 1, 2, 3])])
    seq.add_ttv(torch.ones(2, seq.view.width))
    assert seq.ttv_acc[0].tolist() == [2.0, 4.0, 4.0, 6.0]
    assert seq.ttv_acc[1].tolist() == [11.0, 12.0, 13.0, 14.0]


def test_query_slots_are_instruction_and_last_token():
    seq = _sequence()
    assert seq.query_slots().tolist() == [[6, 7], [6, 7]]


def test_inserted_tokens_follow_their_span_and_borrow_a_position():
    """Sample 1 keeps image token 1 and video token 3 and gets one new token per span: each sits right
    after its span's visual tokens, borrows its anchor's position and is alive (indices 4, 5)."""
    seq = _sequence()
    hidden = torch.arange(2 * 8, dtype=torch.float32).view(2, 8, 1)
    gather = seq.prune(3, [torch.tensor([1]), torch.tensor([1, 3])], [None, torch.tensor([0, 2])])
    view = seq.view
    # Sample 1: [t, t, I1, new(I0's position 2), V3, new(V2's position 4), t, q]
    assert view.seq_index[1].tolist() == [0, 1, 3, 2, 5, 4, 6, 7]
    assert view.visual_index[1].tolist() == [-1, -1, 1, 4, 3, 5, -1, -1]
    assert view.inserted[1].tolist() == [False, False, False, True, False, True, False, False]
    assert seq.alive[1].tolist() == [1, 3, 4, 5] and seq.candidate_spans(1).tolist() == [0, 1, 0, 1]
    assert view.removed.tolist() == [3, 0]                               # net of the inserted ones
    assert seq.candidate_slots(1).tolist() == [2, 4, 3, 5]
    assert view.slot_of_pos[1].tolist() == [0, 1, -1, 2, -1, 4, 6, 7]   # borrowed positions stay unmapped
    tokens = [None, torch.tensor([[100.0], [200.0]])]
    pruned = seq.insert_rows(sequence.gather_slots(hidden, gather), tokens)
    assert pruned[1, :, 0].tolist() == [8, 9, 11, 100, 13, 200, 14, 15]
    # Compact positions renumber by slot; original ones take the borrowed position.
    ids = torch.arange(8)[None]
    assert positions.prefill_positions(view, ids, "compact")[1].tolist() == list(range(8))
    assert positions.prefill_positions(view, ids, "original")[1].tolist() == [0, 1, 3, 2, 5, 4, 6, 7]
    # A second stage keeps the inserted tokens in their slots (still inserted: masks follow slot order).
    seq.prune(5, [torch.tensor([1]), torch.tensor([1, 4, 5])])
    assert seq.view.seq_index[1, -6:].tolist() == [1, 3, 2, 4, 6, 7]
    assert seq.view.inserted[1].tolist() == [False, False, False, True, True, False, False]
    assert not seq.view.in_prompt_order


@pytest.mark.parametrize("like", [None, torch.bool, torch.float32])
def test_a_view_with_inserted_tokens_gets_a_causal_mask_over_its_slots(like):
    seq = _sequence()
    seq.prune(3, [torch.tensor([1]), torch.tensor([1, 3])], [None, torch.tensor([0, 2])])
    view = seq.view
    model_mask = None if like is None else torch.zeros(2, 1, 8, 8, dtype=like)
    mask = DenseMask.prefill(view, model_mask)
    allowed = mask if mask.dtype == torch.bool else mask == 0
    width = view.width
    for b in range(2):
        for q in range(width):
            for k in range(width):
                valid_q, valid_k = bool(view.token_valid[b, q]), bool(view.token_valid[b, k])
                expected = (k <= q and valid_k) if valid_q else k == q
                assert bool(allowed[b, 0, q, k]) == expected
    assert mask.dtype == (torch.bool if like is None else like)
