"""adallava: AdaLLaVA adaptive inference on transformers' LLaVA.

Importing the package is cheap; the model classes load transformers on first use:

    from adallava import AdaLlavaForConditionalGeneration, AdaLlavaConfig
"""

__all__ = ["AdaLlavaConfig", "AdaLlavaForConditionalGeneration"]


def __getattr__(name):
    if name == "AdaLlavaConfig":
        from .config import AdaLlavaConfig

        return AdaLlavaConfig
    if name == "AdaLlavaForConditionalGeneration":
        from .modeling import AdaLlavaForConditionalGeneration

        return AdaLlavaForConditionalGeneration
    raise AttributeError(name)
