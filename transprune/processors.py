"""A checkpoint's processor, loadable without torchvision.

`AutoProcessor.from_pretrained` builds every part a processor class lists. For Qwen2.5-VL,
LLaVA-OneVision and Video-LLaVA that includes a video processor, and transformers' video
processors need torchvision, which does not install beside this project's pinned CPU torch: there
`AutoProcessor` raises "Qwen2VLVideoProcessor requires the Torchvision library". `load_processor`
then builds the same processor from the checkpoint's own files (image processor, tokenizer, chat
template, processor_config.json) with no video processor; `transprune.video` prepares video
frames itself for processors that carry none (`FramesVideoProcessor`), so video still works.
With a working torchvision (or a processor without a video part) the processor is exactly the one
`AutoProcessor` builds.
"""

from __future__ import annotations


def without_video_processor(processor_class):
    """`processor_class` constructible with video_processor=None.

    transformers checks every part's class, and the video-processor classes need torchvision
    even when no video processor is passed.
    """
    class ImageTextProcessor(processor_class):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None and "video" in argument_name:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    ImageTextProcessor.__name__ = ImageTextProcessor.__qualname__ = processor_class.__name__
    return ImageTextProcessor


def processor_class(model_type: str):
    """The transformers processor class `AutoProcessor` picks for a config's `model_type` (None if none)."""
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    name = PROCESSOR_MAPPING_NAMES.get(model_type)
    return getattr(transformers, name, None) if isinstance(name, str) else None


def has_video_part(cls) -> bool:
    return cls is not None and "video_processor" in cls.get_attributes()


def torchvision_works() -> bool:
    """Whether torchvision imports here (an installed torchvision built for another torch does not)."""
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():
        return False
    try:
        import torchvision  # noqa: F401
    except Exception:   # e.g. RuntimeError "operator torchvision::nms does not exist" beside a different torch
        return False
    return True


def load_processor(checkpoint: str, model_type: str, **kwargs):
    """The processor of `checkpoint` (a Hub id or a folder) whose config.json says `model_type`:
    `AutoProcessor`'s, or, where that fails for want of a working torchvision and the processor has a
    video part, the same processor without it. `kwargs` (e.g. do_image_splitting=False) override the
    checkpoint's processor settings, as AutoProcessor.from_pretrained's do."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(checkpoint, **kwargs)
    except (ImportError, RuntimeError) as error:
        # ImportError: torchvision absent; RuntimeError: a torchvision built for another torch.
        cls = processor_class(model_type)
        if "torchvision" not in str(error).lower() or not has_video_part(cls):
            raise
    return image_text_processor(cls, checkpoint, **kwargs)


def image_text_processor(cls, checkpoint: str, **image_kwargs):
    """`cls` built from `checkpoint`'s files as `from_pretrained` builds it, without its video processor."""
    from transformers import AutoImageProcessor, AutoTokenizer

    parts = dict(image_processor=AutoImageProcessor.from_pretrained(checkpoint, **image_kwargs),
                 tokenizer=AutoTokenizer.from_pretrained(checkpoint), video_processor=None)
    # processor_config.json's values and the chat template (chat_template.json / .jinja).
    processor_dict, _ = cls.get_processor_dict(checkpoint)
    args = [parts[name] for name in cls.get_attributes()]
    return without_video_processor(cls).from_args_and_dict(args, processor_dict)
