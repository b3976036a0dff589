"""Visual layouts: every visual token maps back to the right place on the original image."""

import pytest
import torch

from transprune import adapters


@pytest.fixture
def layout_of(tiny_model, make_inputs, sample_image):
    """(family, width, height) -> (the adapter's layout of one image, its visual-token count)."""
    return lambda family, width, height: _layout(tiny_model, make_inputs, sample_image, family, width, height)


def _layout(tiny_model, make_inputs, sample_image, family, width, height):
    model, processor = tiny_model(family)
    inputs = make_inputs(processor, [sample_image(width, height)], ["Describe the image"])
    count = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    return adapters.for_model(model).visual_layout(model, processor, (width, height), count), count


def test_llava_grid_follows_resize_and_center_crop(layout_of):
    layout, count = layout_of("llava", 200, 120)
    assert count == 144 and layout.boxes.shape == (144, 4)
    # Short side 120 -> 168 (x1.4), width 280, centred 168 crop: x from 40 to 160 in original pixels.
    torch.testing.assert_close(layout.boxes[0], torch.tensor([40.0, 0.0, 50.0, 10.0]))
    torch.testing.assert_close(layout.boxes[-1], torch.tensor([150.0, 110.0, 160.0, 120.0]))
    widths = layout.boxes[:, 2] - layout.boxes[:, 0]
    torch.testing.assert_close(widths, torch.full((144,), 10.0))


def test_llava_next_maps_base_and_anyres_grid_with_newlines(layout_of):
    layout, count = layout_of("llava_next", 200, 120)
    assert layout.boxes.shape == (count, 4)
    base = layout.segment == 0
    assert int(base.sum()) == 64
    assert layout.segments == ["base", "high-res"]
    base_boxes = layout.boxes[base]
    assert base_boxes[:, 0].min() == 0 and base_boxes[:, 2].max() == 200 and base_boxes[:, 3].max() == 120
    fine = layout.boxes[~base]
    newline = fine.isnan().any(dim=1)
    rows = int(newline.sum())
    cols = int((~newline).sum()) // rows
    assert rows * (cols + 1) == count - 64
    # Each row ends with its newline token; the placed cells tile the image row-major.
    assert newline.view(rows, cols + 1)[:, -1].all() and not newline.view(rows, cols + 1)[:, :-1].any()
    placed = fine[~newline].view(rows, cols, 4)
    assert placed[0, 0, 0] == 0 and placed[-1, -1, 2] == 200 and placed[-1, -1, 3] == 120
    assert cols / rows > 1  # landscape image -> wider than tall grid


def test_qwen_cells_are_merged_28px_patches_scaled_to_the_image(tiny_model, make_inputs, sample_image, layout_of):
    model, processor = tiny_model("qwen2_5_vl")
    inputs = make_inputs(processor, [sample_image(200, 120)], ["Describe the image"])
    t, h, w = inputs["image_grid_thw"][0].tolist()
    layout, count = layout_of("qwen2_5_vl", 200, 120)
    assert count == t * h * w // 4 and layout.boxes.shape == (count, 4)
    assert layout.boxes[:, 2].max() == 200 and layout.boxes[:, 3].max() == 120
    cell_width = 200 / (w // 2)
    torch.testing.assert_close(layout.boxes[0], torch.tensor([0.0, 0.0, cell_width, 120 / (h // 2)]))


def test_onevision_layout_counts_match(layout_of):
    layout, count = layout_of("llava_onevision", 200, 120)
    assert layout is not None and layout.boxes.shape == (count, 4)


def test_wrong_token_count_gives_no_layout(tiny_model):
    model, processor = tiny_model("llava_next")
    assert adapters.for_model(model).visual_layout(model, processor, (200, 120), 7) is None
